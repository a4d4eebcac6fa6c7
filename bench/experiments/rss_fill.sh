#!/usr/bin/env bash
# rss_fill.sh N: gateway RSS per entry after N distinct GETs ([store] capacity = 2000000), as run.sh
# fills it, for each of VARIANTS (binary names in BIN_DIR, default /tmp/ab, with demo-backend).
set -u
BIN=${BIN_DIR:-/tmp/ab}
B=$(cd "$(dirname "$0")/.." && pwd)
cd "$BIN"

N=$1
taskset -c 1 ./demo-backend --listen 127.0.0.1:0 > backend2.out 2>/dev/null &
BPID=$!
sleep 0.5
BA=$(sed -n 's/^demo-backend listening on //p' backend2.out)
curl -s -o /dev/null -X PUT --data '{"t":1}' http://$BA/docs/bench-tail
fill() { # url method count
  rm -f $BIN/done
  BENCH_METHOD=$2 BENCH_N=$3 BENCH_COUNT=$3 BENCH_DONE_FILE=$BIN/done taskset -c 1 wrk -t1 -c32 -d3600s -s $B/paths.lua "$1" > $BIN/fill.wrk 2>&1 &
  local wp=$!
  while [ ! -e $BIN/done ] && kill -0 $wp 2>/dev/null; do sleep 0.1; done
  kill -INT $wp 2>/dev/null; wait $wp
}
t0=$(date +%s); fill http://$BA/ PUT $N; echo "prefill $N in $(( $(date +%s) - t0 )) s"
printf '[server]\nthreads = 1\n[store]\ncapacity = 2000000\n' > gw2.toml
for v in $VARIANTS; do
  RUST_LOG=warn taskset -c 0 ./$v --config gw2.toml --upstream http://$BA --listen 127.0.0.1:18399 > rss-$v.log 2>&1 &
  gp=$!
  sleep 1
  taskset -c 1 wrk -t1 -c16 -d1s http://127.0.0.1:18399/docs/bench-tail > /dev/null 2>&1
  sleep 0.5
  r0=$(awk '/^VmRSS/ {print $2}' /proc/$gp/status)
  t0=$(date +%s); fill http://127.0.0.1:18399/ GET $N
  sleep 0.5
  r1=$(awk '/^VmRSS/ {print $2}' /proc/$gp/status)
  sleep 5
  r2=$(awk '/^VmRSS/ {print $2}' /proc/$gp/status)
  echo "$v: $N entries in $(( $(date +%s) - t0 )) s, RSS $r0 -> $r1 kB: $(awk -v a=$r0 -v b=$r1 -v n=$N 'BEGIN {printf "%.1f", (b - a) * 1024 / n}') B/entry; 5 s later $(awk -v a=$r0 -v b=$r2 -v n=$N 'BEGIN {printf "%.1f", (b - a) * 1024 / n}')"
  kill -INT $gp; wait $gp
done
kill $BPID

#!/usr/bin/env bash
# ab_pair.sh ROUNDS SECONDS scenario... (get put_cond stale stale0): CPU us per request of gateway builds
# side by side. VARIANTS="gwbase gwnew": binary names in BIN_DIR (default /tmp/ab), which also holds
# demo-backend; each variant on core 0, the backend and wrk on core 1, runs interleaved.
set -u
BIN=${BIN_DIR:-/tmp/ab}
B=$(cd "$(dirname "$0")/.." && pwd)
cd "$BIN"

ROUNDS=$1; D=$2; shift 2
declare -A PORT PID
taskset -c 1 ./demo-backend --listen 127.0.0.1:0 > backend.out 2>/dev/null &
BPID=$!
sleep 0.5
BA=$(sed -n 's/^demo-backend listening on //p' backend.out)
curl -s -o /dev/null -X PUT --data "{\"pad\":\"$(printf '%*s' 1000 '' | tr ' ' x)\"}" http://$BA/docs/bench-get
curl -s -o /dev/null -X PUT --data '{"p":1}' http://$BA/docs/bench-stale
for i in $(seq 0 63); do curl -s -o /dev/null -X PUT --data "{\"v\":1}" http://$BA/c/$i; done
printf '[server]\nthreads = 1\n' > gw.toml
i=0
for v in $VARIANTS; do
  port=$((18300 + i)); i=$((i + 1))
  RUST_LOG=warn taskset -c 0 ./$v --config gw.toml --upstream http://$BA --listen 127.0.0.1:$port > ab-$v.log 2>&1 &
  PID[$v]=$!; PORT[$v]=$port
done
sleep 1.5
for v in $VARIANTS; do curl -s -o /dev/null http://127.0.0.1:${PORT[$v]}/docs/bench-stale; curl -s -o /dev/null http://127.0.0.1:${PORT[$v]}/docs/bench-get; done
ticks() { awk '{sub(/^.*\) /,""); print $12+$13}' /proc/$1/stat; }
STALE='If-Match: "00000000-0000-0000-0000-000000000000"'
for r in $(seq $ROUNDS); do
 for s in "$@"; do
  for v in $VARIANTS; do
    url=http://127.0.0.1:${PORT[$v]}
    unset BENCH_BODY BENCH_MODE BENCH_PREFIX BENCH_DOCS
    case $s in
      get) args=("$url/docs/bench-get");;
      stale) export BENCH_BODY='{"v":3}'; args=(-s $B/put_fixed.lua -H "$STALE" "$url/docs/bench-stale");;
      stale0) export BENCH_BODY=; args=(-s $B/put_fixed.lua -H "$STALE" "$url/docs/bench-stale");;
      put_cond) export BENCH_MODE=etag BENCH_PREFIX=/c/ BENCH_DOCS=64; args=(-s $B/put_cond.lua "$url/");;
    esac
    taskset -c 1 wrk -t1 -c16 -d1s "${args[@]}" > /dev/null 2>&1
    t0=$(ticks ${PID[$v]})
    out=$(taskset -c 1 wrk -t1 -c16 -d${D}s "${args[@]}" 2>&1)
    t1=$(ticks ${PID[$v]})
    n=$(echo "$out" | awk '/requests in/{print $1}'); e=$(echo "$out" | awk -F': ' '/Non-2xx/{print $2}')
    echo "$r $s $v $n ${e:-0} $t0 $t1" | awk '{printf "%s %-8s %-9s %8d req %7.2f us/req  non2xx %d\n", $1, $2, $3, $4, ($7-$6)*10000/$4, $5}'
  done
 done
done
for v in $VARIANTS; do kill -INT ${PID[$v]}; done
kill $BPID

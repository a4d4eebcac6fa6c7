#!/usr/bin/env bash
# A/B of proxy variants on core 0, same backend/load on core 1: CPU us per request (utime+stime / requests)
# usage: ab.sh ROUNDS DURATION scenario... ; variants from VARIANTS env (name=command-with-@PORT@)
set -u
cd /tmp/prof
BA=$(cat backend.addr)
ROUNDS=$1; D=$2; shift 2
SCEN="$*"
declare -A PORT PID
i=0
cmd_of() {
  case $1 in
    bare) echo "bin/bare @BA@ 127.0.0.1:@PORT@";;
    baremi) echo "bin/bare-mi @BA@ 127.0.0.1:@PORT@";;
    gw*) echo "bin/$1 --config gw.toml --upstream http://@BA@ --listen 127.0.0.1:@PORT@";;
  esac
}
for v in $VARIANTS; do
  name=$v; cmd=$(cmd_of $v)
  port=$((18300 + i)); i=$((i + 1))
  if [ "$name" = nginx ]; then PORT[$name]=18201; NG=$(cat nginx.pid); PID[$name]="$NG $(cat /proc/$NG/task/$NG/children)"; continue; fi
  cmd=${cmd//@PORT@/$port}; cmd=${cmd//@BA@/$BA}
  RUST_LOG=warn taskset -c 0 $cmd > ab-$name.log 2>&1 &
  PID[$name]=$!; PORT[$name]=$port
done
sleep 1.5
for v in $VARIANTS; do name=$v; curl -s -o /dev/null http://127.0.0.1:${PORT[$name]}/docs/bench-stale; done
ticks() { for p in $1; do cat /proc/$p/stat; done | awk '{sub(/^.*\) /,""); t+=$12+$13} END{print t}'; }
busy0() { awk '$1=="cpu0"{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
STALE='If-Match: "00000000-0000-0000-0000-000000000000"'
for r in $(seq $ROUNDS); do
 for s in $SCEN; do
  for v in $VARIANTS; do
    name=$v; url=http://127.0.0.1:${PORT[$name]}
    case $s in
      get) args=("$url/docs/bench-get");;
      stale) export BENCH_BODY='{"v":3}'; args=(-s /work/main/bench/put_fixed.lua -H "$STALE" "$url/docs/bench-stale");;
      stale0) export BENCH_BODY=; args=(-s /work/main/bench/put_fixed.lua -H "$STALE" "$url/docs/bench-stale");;
      put_cond) export BENCH_MODE=etag; [[ $name == gw* ]] || BENCH_MODE=plain; args=(-s /work/main/bench/put_cond.lua "$url/");;
    esac
    taskset -c 1 wrk -t1 -c16 -d1s "${args[@]}" > /dev/null 2>&1
    t0=$(ticks "${PID[$name]}"); c0=$(busy0)
    out=$(taskset -c 1 wrk -t1 -c16 -d${D}s "${args[@]}" 2>&1)
    t1=$(ticks "${PID[$name]}"); c1=$(busy0)
    n=$(echo "$out" | awk '/requests in/{print $1}'); e=$(echo "$out" | awk -F': ' '/Non-2xx/{print $2}')
    echo "$r $s $name $n ${e:-0} $t0 $t1 $c0 $c1" | awk '{us=($7-$6)*10000/$4; busy=$10-$8; tot=$11-$9; oth=100*(busy-($7-$6))/tot; printf "%s %-8s %-8s %8d req %7.2f us/req  non2xx %d  others %.0f%%\n", $1, $2, $3, $4, us, $5, oth}'
  done
 done
done
for v in $VARIANTS; do name=$v; [ "$name" = nginx ] || kill -INT ${PID[$name]}; done

#!/usr/bin/env bash
# bench/run.sh: what the etag table costs, compared with nginx doing the same proxying without it.
#
#   ./bench/run.sh                  # everything, ~7-9 minutes on 2 cores; writes BENCHMARKS.md
#   DURATION=3 REPS=1 TABLE_N=100000 ./bench/run.sh    # a quick look
#
# One run:
#  1. installs what is missing (apt-get: nginx-light wrk jq curl; cargo install oha --locked) and builds
#     the release binaries (cargo build --release --bins);
#  2. starts, on loopback, the demo backend (pinned to core LOAD_CORE with the load generator), nginx
#     (bench/nginx.conf.template: 1 worker, access_log off, upstream keepalive 64, HTTP/1.1) and the
#     gateway ([server] threads = 1, RUST_LOG=warn), both proxies pinned to core PROXY_CORE, both in
#     front of the same backend;
#  3. CPU per request: utime+stime of the proxy process(es) (/proc/PID/stat; nginx: master + worker)
#     before/after a closed-loop wrk run (-t1 -c$CONNS, DURATION s after WARMUP s), divided by the
#     requests wrk completed; REPS repetitions, interleaved, medians reported. CPU time is what the proxy itself burnt,
#     so it is far less sensitive to other load on the machine than throughput; how much other load
#     there was is measured too (/proc/stat of the proxy's core minus the proxy's own time, and steal).
#     Scenarios (documents are created by PUTs directly on the backend first):
#       get         GET of one 1 KiB document                           direct, nginx, gateway
#       inm         GET If-None-Match: <current gateway etag> -> 304 from the table (nginx: see get)
#       stale       PUT If-Match: "00000000-0000-0000-0000-000000000000" + 7-byte body on an existing
#                   document: the gateway reads and drops the small body, answers 409 itself and keeps
#                   the connection; nginx forwards it (200)                            nginx, gateway
#       stale0      the same stale PUT with an empty body: 409 on a kept-alive connection   gateway
#       put_cond    conditional writes, all forwarded: per document GET once, then PUT If-Match:
#                   <etag of the previous answer> over and over (bench/put_cond.lua); nginx/direct get
#                   the same PUTs with a constant If-Match the backend ignores   direct, nginx, gateway
#       put_new     unconditional PUT to a new path every request (bench/paths.lua)  nginx, gateway
#  4. latency: oha -z LAT_DURATION -q RATE --latency-correction -c 16 (open loop) at 25% and 50% of the
#     saturation measured for nginx GETs, direct vs nginx vs gateway; proxy CPU per request there too;
#  5. table scaling: TABLE_N documents /r/0../r/N-1 are PUT on the backend directly, a fresh gateway
#     ([store] capacity = 2000000) is filled by GETs (bench/paths.lua, each path once) to 1k, 100k,
#     TABLE_N entries; RSS before/after -> bytes per entry; GET throughput and CPU per request cycling
#     over all entries at each size;
#  6. PROFILE=1 (default when perf works): perf record of the gateway during GET and 409 runs, top
#     symbols into BENCHMARKS.md;
#  7. prints the summary and writes BENCHMARKS.md (anything below the line "<!-- hand-written -->" in
#     an existing BENCHMARKS.md is kept).
#
# Environment: DURATION (4) WARMUP (1) REPS (3) CONNS (16) LAT_DURATION (10) TABLE_N (1000000)
#   TPUT_DURATION (5) BODY_SIZE (1024) PROXY_CORE (0) LOAD_CORE (1) PROFILE (auto) OUT (BENCHMARKS.md)
#   KEEP_WORK (0: remove the scratch directory) OHA (none: skip oha, closed-loop latency with wrk)
# Needs root or sudo only for apt-get, when something is missing. Only loopback traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
REPS=${REPS:-3}
CONNS=${CONNS:-16}
LAT_DURATION=${LAT_DURATION:-10}
TABLE_N=${TABLE_N:-1000000}
TPUT_DURATION=${TPUT_DURATION:-5}
BODY_SIZE=${BODY_SIZE:-1024}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
OUT=${OUT:-BENCHMARKS.md}
KEEP_WORK=${KEEP_WORK:-0}
STALE='"00000000-0000-0000-0000-000000000000"'
STRIDE=104729 # prime: i*STRIDE mod N visits every index for N = 1k, 100k, 1M
RUN_START=$(date +%s)

say() { printf '== %s\n' "$*" >&2; }
die() {
  printf 'bench/run.sh: %s\n' "$*" >&2
  exit 1
}

# --- tools ------------------------------------------------------------------------------------------
apt_missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx-light)
command -v wrk >/dev/null || apt_missing+=(wrk)
command -v jq >/dev/null || apt_missing+=(jq)
command -v curl >/dev/null || apt_missing+=(curl)
command -v taskset >/dev/null || apt_missing+=(util-linux)
if ((${#apt_missing[@]})); then
  say "installing ${apt_missing[*]}"
  SUDO=
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${apt_missing[@]}" >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

OHA_NOTE=""
if [ "${OHA:-}" = none ]; then
  OHA=""
  OHA_NOTE="oha not used (OHA=none); latency below is closed-loop (wrk --latency at -c$CONNS), not at a fixed rate"
else
  OHA=$(command -v oha || true)
  [ -n "$OHA" ] || [ ! -x "$HOME/.cargo/bin/oha" ] || OHA=$HOME/.cargo/bin/oha
fi
if [ -z "$OHA" ] && [ -z "$OHA_NOTE" ]; then
  say "installing oha (cargo install oha --locked)"
  if cargo install oha --locked >&2; then
    OHA=$HOME/.cargo/bin/oha
  else
    OHA_NOTE="cargo install oha --locked failed; latency below is closed-loop (wrk --latency at -c$CONNS), not at a fixed rate"
    OHA=""
  fi
fi

PERF_OK=0
if command -v perf >/dev/null && perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then PERF_OK=1; fi
PROFILE=${PROFILE:-$PERF_OK}

say "building release binaries"
cargo build --release --bins >&2
BIN=$ROOT/target/release
CLK_TCK=$(getconf CLK_TCK)

# --- scratch and processes ----------------------------------------------------------------------------
work=$(mktemp -d -t etag-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for _ in $(seq 40); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  # Whatever else this script started (a pid that was not recorded must not outlive it, nor block the
  # wait below: a demo backend holding 1M documents is 8 GB).
  pkill -KILL -P $$ 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$KEEP_WORK" = 1 ]; then say "scratch kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

wait_port() { # port what
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return; fi
    sleep 0.05
  done
  die "$2 not listening on port $1"
}

RESULTS=$work/results # one line per measured run
: >"$RESULTS"

# demo backend, on the load generator's core
RUST_LOG=warn taskset -c "$LOAD_CORE" "$BIN/demo-backend" --listen 127.0.0.1:0 >"$work/backend.out" 2>"$work/backend.err" &
BACKEND_PID=$!
pids+=("$BACKEND_PID")
for _ in $(seq 200); do
  grep -q 'listening on' "$work/backend.out" 2>/dev/null && break
  sleep 0.05
done
BACKEND_ADDR=$(sed -n 's/^demo-backend listening on //p' "$work/backend.out" | head -1)
[ -n "$BACKEND_ADDR" ] || die "demo-backend did not start: $(cat "$work/backend.err")"
BACKEND=http://$BACKEND_ADDR

# nginx
NGINX_PORT=$(free_port)
mkdir -p "$work/nginx-tmp"
chmod 777 "$work/nginx-tmp"
sed -e "s#@WORK@#$work#g" -e "s#@PORT@#$NGINX_PORT#g" -e "s#@BACKEND@#$BACKEND_ADDR#g" \
  bench/nginx.conf.template >"$work/nginx.conf"
taskset -c "$PROXY_CORE" "$NGINX" -e "$work/nginx-error.log" -p "$work" -c "$work/nginx.conf" >"$work/nginx.out" 2>&1 &
NGINX_PID=$!
pids+=("$NGINX_PID")
wait_port "$NGINX_PORT" nginx
NGINX_URL=http://127.0.0.1:$NGINX_PORT
sleep 0.3
NGINX_PIDS="$NGINX_PID $(cat "/proc/$NGINX_PID/task/$NGINX_PID/children" 2>/dev/null || pgrep -P "$NGINX_PID" | tr '\n' ' ')"

# the gateway
start_gateway() { # name config-text -> sets ${name}_PID ${name}_URL
  local name=$1 port pid
  port=$(free_port)
  printf '%b' "$2" >"$work/$name.toml"
  RUST_LOG=warn taskset -c "$PROXY_CORE" "$BIN/etag-gateway" --config "$work/$name.toml" \
    --upstream "$BACKEND" --listen "127.0.0.1:$port" >"$work/$name.out" 2>"$work/$name.err" &
  pid=$!
  pids+=("$pid")
  wait_port "$port" "etag-gateway ($name)"
  printf -v "${name}_PID" '%s' "$pid"
  printf -v "${name}_URL" '%s' "http://127.0.0.1:$port"
}
start_gateway GW '[server]\nthreads = 1\n'

pids_of() {
  case $1 in
    direct) echo "$BACKEND_PID" ;;
    nginx) echo "$NGINX_PIDS" ;;
    gateway) echo "$GW_PID" ;;
    gateway2) echo "$GW2_PID" ;;
    gateway3) echo "$GW3_PID" ;;
  esac
}
url_of() {
  case $1 in
    direct) echo "$BACKEND" ;;
    nginx) echo "$NGINX_URL" ;;
    gateway) echo "$GW_URL" ;;
    gateway2) echo "$GW2_URL" ;;
  esac
}

# --- measuring -----------------------------------------------------------------------------------------
proc_ut_st() { # "pids" -> "utime stime" in clock ticks, summed
  local p
  for p in $1; do cat "/proc/$p/stat" 2>/dev/null || true; done |
    awk '{sub(/^.*\) /, ""); u += $12; s += $13} END {print u + 0, s + 0}'
}
core_stat() { # -> "busy total steal" of PROXY_CORE then of LOAD_CORE, in ticks
  awk -v a="cpu$PROXY_CORE" -v b="cpu$LOAD_CORE" '
    $1 == a || $1 == b {busy = $2 + $3 + $4 + $7 + $8; tot = busy + $5 + $6 + $9; v[$1] = busy " " tot " " $9}
    END {print v[a], v[b]}' /proc/stat
}
now() { date +%s.%N; }
# Time the given processes spent runnable but waiting for a CPU (ns, all threads): how much other load
# got in the proxy's way. /proc/PID/task/TID/schedstat: runtime, run_delay, timeslices.
run_delay_ns() {
  local p
  for p in $1; do cat /proc/"$p"/task/*/schedstat 2>/dev/null || true; done | awk '{s += $2} END {printf "%.0f", s}'
}
# Machine-wide CPU pressure: microseconds during which some task waited for a CPU (PSI).
psi_us() { awk '/^some/ {sub(/total=/, "", $5); print $5}' /proc/pressure/cpu 2>/dev/null || echo 0; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# record NAME PROXY REP REQS SECS NON2XX SOCKERR WAITED% PSI% P0 P1 B0 B1 C0 C1  (P/B: "u s"; C: 6 numbers)
record() {
  local head="$1 $2 $3 $4 $5 $6 $7" waited=$8 psi=$9
  shift 9
  echo "$head $*" | awk -v tck="$CLK_TCK" -v waited="$waited" -v psi="$psi" '{
    name = $1; proxy = $2; rep = $3; reqs = $4; secs = $5; non2xx = $6; sockerr = $7
    pu = $10 - $8; ps = $11 - $9; bu = $14 - $12; bs = $15 - $13
    c0busy = $22 - $16; c0tot = $23 - $17; c0steal = $24 - $18
    c1busy = $25 - $19; c1tot = $26 - $20
    if (reqs <= 0) reqs = 1e-9
    if (c0tot <= 0) c0tot = 1e-9
    if (c1tot <= 0) c1tot = 1e-9
    us = 1e6 / tck / reqs
    printf "%s %s %s %d %.2f %.0f %.3f %.3f %.3f %.3f %.1f %.1f %.1f %.1f %s %s %.1f\n", name, proxy, rep, reqs, secs,
      reqs / (secs > 0 ? secs : 1e-9), (pu + ps) * us, pu * us, ps * us, (bu + bs) * us,
      100 * c0busy / c0tot, waited, 100 * c1busy / c1tot, 100 * c0steal / c0tot,
      non2xx, sockerr, psi
  }' >>"$RESULTS"
}
# fields of $RESULTS: 1 name 2 proxy 3 rep 4 requests 5 seconds 6 req/s 7 proxy CPU us/req 8 user us/req
# 9 sys us/req 10 backend CPU us/req 11 proxy-core busy % 12 proxy waited for a CPU, % of the run
# 13 load-core busy % 14 proxy-core steal % 15 status>=400 16 socket errors 17 machine CPU pressure (PSI some) %

COMMANDS=$work/commands
: >"$COMMANDS"

# measure NAME PROXY REP URL [wrk args]: a warm-up, then DURATION s of closed-loop load, CPU before/after
measure() {
  local name=$1 proxy=$2 rep=$3 url=$4
  shift 4
  local pids p0 p1 b0 b1 c0 c1 t0 t1 out reqs secs non2xx sockerr d0 d1 s0 s1 waited psi
  pids=$(pids_of "$proxy")
  if [ "$WARMUP" != 0 ]; then
    BENCH_RUN="$name-$rep-warm" taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$@" "$url" >/dev/null 2>&1 || true
  fi
  out=$work/$name-$proxy-$rep.wrk
  p0=$(proc_ut_st "$pids")
  b0=$(proc_ut_st "$BACKEND_PID")
  c0=$(core_stat)
  d0=$(run_delay_ns "$pids")
  s0=$(psi_us)
  t0=$(now)
  BENCH_RUN="$name-$rep" taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$@" "$url" >"$out" 2>&1 ||
    die "wrk failed ($name, $proxy): $(cat "$out")"
  t1=$(now)
  p1=$(proc_ut_st "$pids")
  b1=$(proc_ut_st "$BACKEND_PID")
  c1=$(core_stat)
  d1=$(run_delay_ns "$pids")
  s1=$(psi_us)
  waited=$(awk -v a="$d0" -v b="$d1" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.1f", (b - a) / 1e7 / (t1 - t0)}')
  psi=$(awk -v a="$s0" -v b="$s1" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.1f", (b - a) / 1e4 / (t1 - t0)}')
  reqs=$(awk '/ requests in / {print $1}' "$out")
  secs=$(awk '/ requests in / {sub(/s,$/, "", $4); print $4}' "$out")
  non2xx=$(awk -F': ' '/Non-2xx/ {print $2}' "$out")
  sockerr=$(awk '/Socket errors/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$out")
  [ -n "$sockerr" ] || sockerr=0
  [ -n "$reqs" ] || die "no result from wrk ($name, $proxy): $(cat "$out")"
  [ "$rep" != 1 ] || echo "$name/$proxy: $(env | grep '^BENCH_' | tr '\n' ' ')taskset -c $LOAD_CORE wrk -t1 -c$CONNS -d${DURATION}s $* $url" >>"$COMMANDS"
  record "$name" "$proxy" "$rep" "$reqs" "${secs:-$DURATION}" "${non2xx:-0}" "$sockerr" "$waited" "$psi" $p0 $p1 $b0 $b1 $c0 $c1
  tail -1 "$RESULTS" | awk '{printf "   %-9s %-8s rep %s: %8.0f req/s  %6.2f us CPU/req (waited for a CPU %s%% of the time, machine CPU pressure %s%%)\n", $1, $2, $3, $6, $7, $12, $17}' >&2
}

# --- documents, directly on the backend -----------------------------------------------------------------
say "backend $BACKEND, nginx $NGINX_URL, gateway $GW_URL; creating the documents"
doc=$(printf '%*s' $((BODY_SIZE - 30)) '' | tr ' ' x)
curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/json' --data "{\"path\":\"/docs/bench-get\",\"pad\":\"$doc\"}" "$BACKEND/docs/bench-get"
for p in /docs/bench-stale /docs/bench-tail; do
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/json' --data "{\"path\":\"$p\"}" "$BACKEND$p"
done
for i in $(seq 0 63); do
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/json' --data "{\"path\":\"/c/$i\",\"v\":1}" "$BACKEND/c/$i"
done
GET_BYTES=$(curl -fsS "$BACKEND/docs/bench-get" | wc -c)
# sanity: every path answers as expected
[ "$(curl -s -o /dev/null -w '%{http_code}' "$NGINX_URL/docs/bench-get")" = 200 ] || die "nginx does not proxy"
ETAG=$(curl -fsSi "$GW_URL/docs/bench-get" | tr -d '\r' | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')
[ -n "$ETAG" ] || die "the gateway gave no ETag"
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "If-None-Match: $ETAG" "$GW_URL/docs/bench-get")" = 304 ] || die "no 304 from the gateway"
curl -fsS -o /dev/null "$GW_URL/docs/bench-stale"
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT -H "If-Match: $STALE" --data '{"v":3}' "$GW_URL/docs/bench-stale")
[ "$code" = 409 ] || die "stale PUT answered $code, not 409"

# --- 1. CPU per request ----------------------------------------------------------------------------------
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
say "CPU per request: $REPS x ${DURATION}s per scenario and proxy (wrk -t1 -c$CONNS)"
for rep in $(seq "$REPS"); do
  for proxy in direct nginx gateway; do
    measure get "$proxy" "$rep" "$(url_of "$proxy")/docs/bench-get"
  done
  measure inm gateway "$rep" "$GW_URL/docs/bench-get" -H "If-None-Match: $ETAG"
  for proxy in nginx gateway; do
    BENCH_BODY='{"v":3}' measure stale "$proxy" "$rep" "$(url_of "$proxy")/docs/bench-stale" \
      -s bench/put_fixed.lua -H "If-Match: $STALE"
  done
  BENCH_BODY= measure stale0 gateway "$rep" "$GW_URL/docs/bench-stale" -s bench/put_fixed.lua -H "If-Match: $STALE"
  for proxy in direct nginx gateway; do
    mode=plain
    [ "$proxy" = gateway ] && mode=etag
    BENCH_MODE=$mode BENCH_PREFIX=/c/ BENCH_DOCS=64 measure put_cond "$proxy" "$rep" "$(url_of "$proxy")/" -s bench/put_cond.lua
  done
  for proxy in nginx gateway; do
    BENCH_METHOD=PUT BENCH_PREFIX="/w/$proxy-" BENCH_RUN_IN_PATH=1 BENCH_N=1000000000 measure put_new "$proxy" "$rep" "$(url_of "$proxy")/" -s bench/paths.lua
  done
done

# median over the repetitions: NAME PROXY FIELD (median, not mean: other load only ever adds)
MEDIAN_AWK='function median(a, c,   i, j, t) {
    for (i = 2; i <= c; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) {t = a[j]; a[j] = a[j - 1]; a[j - 1] = t}
    return (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
  }'
mean() {
  awk -v n="$1" -v p="$2" -v f="$3" "$MEDIAN_AWK"'
    $1 == n && $2 == p {v[++c] = $f} END {if (c) printf "%.6g", median(v, c); else print "nan"}' "$RESULTS"
}
calc() { awk "BEGIN {printf \"%.${2:-2}f\", $1}"; }

SAT=$(mean get nginx 6)
R25=$(calc "$SAT * 0.25" 0)
R50=$(calc "$SAT * 0.50" 0)

# --- 2. latency at fixed rates ---------------------------------------------------------------------------
LAT=$work/latency # proxy rate p50_ms p99_ms achieved_rps cpu_us_per_req
: >"$LAT"
if [ -n "$OHA" ]; then
  say "latency: oha at $R25 and $R50 req/s (25% / 50% of nginx's saturation, $SAT req/s)"
  for rate in "$R25" "$R50"; do
    for proxy in direct nginx gateway; do
      pids=$(pids_of "$proxy")
      p0=$(proc_ut_st "$pids")
      taskset -c "$LOAD_CORE" "$OHA" -z "${LAT_DURATION}s" -q "$rate" --latency-correction -c 16 --no-tui \
        --output-format json "$(url_of "$proxy")/docs/bench-get" >"$work/oha-$proxy-$rate.json" 2>"$work/oha-$proxy-$rate.err" ||
        die "oha failed: $(cat "$work/oha-$proxy-$rate.err")"
      p1=$(proc_ut_st "$pids")
      jq -r --arg p "$proxy" --arg r "$rate" --arg pu "$p0 $p1" --argjson tck "$CLK_TCK" '
        ($pu | split(" ") | map(tonumber)) as $t
        | ([.statusCodeDistribution[]?] | add // 0) as $n
        | "\($p) \($r) \(.latencyPercentiles.p50 * 1000) \(.latencyPercentiles.p99 * 1000) \(.summary.requestsPerSec) \(if $n > 0 then (($t[2] + $t[3] - $t[0] - $t[1]) / $tck * 1e6 / $n) else 0 end) \($n)"' \
        "$work/oha-$proxy-$rate.json" >>"$LAT"
      tail -1 "$LAT" | awk '{printf "   %-8s %6d req/s: p50 %.3f ms  p99 %.3f ms  (achieved %.0f req/s)\n", $1, $2, $3, $4, $5}' >&2
    done
  done
  echo "latency: taskset -c $LOAD_CORE oha -z ${LAT_DURATION}s -q RATE --latency-correction -c 16 --no-tui --output-format json URL/docs/bench-get" >>"$COMMANDS"
else
  say "latency: oha unavailable, closed loop with wrk --latency"
  for proxy in direct nginx gateway; do
    taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${LAT_DURATION}s" --latency "$(url_of "$proxy")/docs/bench-get" >"$work/lat-$proxy.wrk"
    awk -v p="$proxy" '/^ +50%/ {p50 = $2} /^ +99%/ {p99 = $2} / requests in / {n = $1} /Requests\/sec/ {r = $2}
      function ms(v) {if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v}
      END {print p, "closed", ms(p50), ms(p99), r, 0, n}' "$work/lat-$proxy.wrk" >>"$LAT"
  done
fi

# --- 3. table scaling --------------------------------------------------------------------------------------
# fill NAME CORE URL METHOD PREFIX START COUNT: each of <prefix>START..START+COUNT-1 once (bench/paths.lua)
fill() {
  local name=$1 core=$2 url=$3 method=$4 prefix=$5 start=$6 count=$7 wp t0
  local done_file=$work/$name.done
  rm -f "$done_file"
  t0=$(now)
  BENCH_METHOD=$method BENCH_PREFIX=$prefix BENCH_N=$count BENCH_START=$start BENCH_COUNT=$count \
    BENCH_DONE_FILE=$done_file taskset -c "$core" wrk -t1 -c32 -d3600s -s bench/paths.lua "$url" >"$work/$name.wrk" 2>&1 &
  wp=$!
  while [ ! -e "$done_file" ] && kill -0 "$wp" 2>/dev/null; do sleep 0.1; done
  kill -INT "$wp" 2>/dev/null || true
  wait "$wp" || true
  [ -e "$done_file" ] || die "fill $name did not finish: $(cat "$work/$name.wrk")"
  awk -v t0="$t0" -v t1="$(now)" -v c="$count" -v n="$name" 'BEGIN {printf "   %s: %d paths in %.1f s (%.0f/s)\n", n, c, t1 - t0, c / (t1 - t0)}' >&2
}

say "table scaling: $TABLE_N documents PUT directly on the backend"
fill prefill "$PROXY_CORE" "$BACKEND/" PUT /r/ 0 "$TABLE_N"
start_gateway GW2 '[server]\nthreads = 1\n[store]\ncapacity = 2000000\n'
taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d1s "$GW2_URL/docs/bench-get" >/dev/null 2>&1
sleep 0.5
RSS0=$(rss_kb "$GW2_PID")
SCALE=$work/scale # entries rss_kb fill_cpu_us_per_req req/s cpu_us/req
: >"$SCALE"
prev=0
for stage in 1000 100000 "$TABLE_N"; do
  ((stage > prev)) || continue
  ((stage <= TABLE_N)) || continue
  c0=$(proc_ut_st "$GW2_PID")
  fill "fill-$stage" "$LOAD_CORE" "$GW2_URL/" GET /r/ "$prev" $((stage - prev))
  c1=$(proc_ut_st "$GW2_PID")
  sleep 0.5
  rss=$(rss_kb "$GW2_PID")
  fill_us=$(echo "$c0 $c1" | awk -v n=$((stage - prev)) -v t="$CLK_TCK" '{printf "%.2f", ($3 + $4 - $1 - $2) / t * 1e6 / (n + 64)}')
  WARMUP=0 BENCH_N=$stage BENCH_STRIDE=$STRIDE DURATION=$TPUT_DURATION measure "table$stage" gateway2 1 "$GW2_URL/" -s bench/paths.lua
  echo "$stage $rss $fill_us $(tail -1 "$RESULTS" | awk '{print $6, $7, $12}')" >>"$SCALE"
  prev=$stage
done
for n in 1000 "$TABLE_N"; do
  WARMUP=0 BENCH_N=$n BENCH_STRIDE=$STRIDE DURATION=$TPUT_DURATION measure "direct$n" direct 1 "$BACKEND/" -s bench/paths.lua
done
# The throughput ratio from single runs taken minutes apart is mostly the machine's mood: a second
# gateway holding 1k entries, and REPS interleaved runs against both (medians).
say "throughput ratio: a gateway with 1000 entries vs the one with $TABLE_N, $REPS interleaved runs each"
start_gateway GW3 '[server]\nthreads = 1\n[store]\ncapacity = 2000000\n'
fill "fill3-1000" "$LOAD_CORE" "$GW3_URL/" GET /r/ 0 1000
for rep in $(seq "$REPS"); do
  WARMUP=0 BENCH_N=1000 BENCH_STRIDE=$STRIDE DURATION=$TPUT_DURATION measure tput1k gateway3 "$rep" "$GW3_URL/" -s bench/paths.lua
  WARMUP=0 BENCH_N=$TABLE_N BENCH_STRIDE=$STRIDE DURATION=$TPUT_DURATION measure tputN gateway2 "$rep" "$GW2_URL/" -s bench/paths.lua
done

# --- 4. profile --------------------------------------------------------------------------------------------
PROF=$work/profile
: >"$PROF"
if [ "$PROFILE" = 1 ]; then
  say "profiling the gateway (perf record -e cpu-clock -g)"
  for scen in get stale0 stale; do
    args=("$GW_URL/docs/bench-get")
    case $scen in
      stale0) args=("$GW_URL/docs/bench-stale" -s bench/put_fixed.lua -H "If-Match: $STALE") ;;
      stale) args=("$GW_URL/docs/bench-stale" -s bench/put_fixed.lua -H "If-Match: $STALE") ;;
    esac
    body='{"v":3}'
    [ "$scen" = stale0 ] && body=
    perf record -e cpu-clock -F 1999 -g -p "$GW_PID" -o "$work/perf-$scen.data" -- sleep "$DURATION" >/dev/null 2>&1 &
    perfpid=$!
    BENCH_BODY=$body taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${args[@]}" >/dev/null 2>&1
    wait "$perfpid" || true
    {
      echo "### perf: $scen (self time, top 30 symbols)"
      echo
      echo '```text'
      perf report -i "$work/perf-$scen.data" --stdio --no-children --sort dso,symbol 2>/dev/null |
        awk '/^ +[0-9.]+%/ && ++n <= 30' | cut -c1-150 || true
      echo '```'
      echo
    } >>"$PROF"
  done
fi

# --- 5. report ---------------------------------------------------------------------------------------------
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - RUN_START))

m() { mean "$1" "$2" "$3"; }
G_GET=$(m get gateway 7)
N_GET=$(m get nginx 7)
G_PUT=$(m put_cond gateway 7)
N_PUT=$(m put_cond nginx 7)
G_409=$(m stale gateway 7)
G_4090=$(m stale0 gateway 7)
ratio_get=$(calc "$G_GET / $N_GET" 3)
ratio_put=$(calc "$G_PUT / $N_PUT" 3)
ratio_409=$(calc "$G_409 / $G_GET" 3)
ratio_4090=$(calc "$G_4090 / $G_GET" 3)
p99() { awk -v p="$1" -v r="$2" '$1 == p && $2 == r {print $4}' "$LAT"; }
lat_cpu() { awk -v p="$1" -v r="$2" '$1 == p && $2 == r {printf "%.2f", $6}' "$LAT"; }
if [ -n "$OHA" ]; then
  added_p99=$(calc "$(p99 gateway "$R50") - $(p99 direct "$R50")" 3)
  added_p99_ng=$(calc "$(p99 nginx "$R50") - $(p99 direct "$R50")" 3)
else
  added_p99=$(calc "$(p99 gateway closed) - $(p99 direct closed)" 3)
  added_p99_ng=$(calc "$(p99 nginx closed) - $(p99 direct closed)" 3)
fi
scale_row() { awk -v n="$1" '$1 == n' "$SCALE"; }
RSS_N=$(scale_row "$TABLE_N" | awk '{print $2}')
bytes_entry=$(calc "($RSS_N - $RSS0) * 1024 / $TABLE_N" 1)
tput_1k=$(m tput1k gateway3 6)
tput_n=$(m tputN gateway2 6)
cpu_1k=$(m tput1k gateway3 7)
cpu_n=$(m tputN gateway2 7)
ratio_tput=$(calc "$tput_n / $tput_1k" 3)
ratio_cpu_scale=$(calc "$cpu_n / $cpu_1k" 3)
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN {ok = (op == "le") ? (v <= t) : (v >= t); print ok ? "**met**" : "**missed**"}'; }

noise=$(awk '$2 != "direct" && $1 !~ /^direct/ {s += $12; c++; if ($12 > mx) mx = $12; st += $14; p += $17} END {printf "%.1f %.1f %.1f %.1f", s / c, mx, st / c, p / c}' "$RESULTS")
read -r noise_mean noise_max steal_mean psi_mean <<<"$noise"

{
  echo "# Benchmarks: etag-gateway vs nginx"
  echo
  echo "Generated by \`./bench/run.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') in ${ELAPSED}s"
  echo "(DURATION=${DURATION}s x REPS=$REPS per CPU scenario, CONNS=$CONNS, LAT_DURATION=${LAT_DURATION}s, TABLE_N=$TABLE_N)."
  echo "Source: \`$(git rev-parse --short HEAD 2>/dev/null || echo '?')\`$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' plus uncommitted changes in src/ (others were editing concurrently)')."
  echo
  echo "## Targets"
  echo
  echo "| ratio | value | target | |"
  echo "|---|---|---|---|"
  echo "| gateway CPU per GET / nginx CPU per GET | $ratio_get ($G_GET / $N_GET us) | <= 0.95 | $(verdict "$ratio_get" 0.95 le) |"
  if [ -n "$OHA" ]; then
    fr50=$(calc "$(lat_cpu gateway "$R50") / $(lat_cpu nginx "$R50")" 3)
    fr25=$(calc "$(lat_cpu gateway "$R25") / $(lat_cpu nginx "$R25")" 3)
    echo "| the same at a fixed rate (oha, $R50 req/s; $R25 req/s) | $fr50 ($(lat_cpu gateway "$R50") / $(lat_cpu nginx "$R50") us); $fr25 | <= 0.95 | $(verdict "$fr50" 0.95 le) |"
  fi
  echo "| gateway CPU per forwarded conditional PUT / nginx CPU per PUT | $ratio_put ($G_PUT / $N_PUT us) | <= 1.0 | $(verdict "$ratio_put" 1.0 le) |"
  echo "| CPU per 409 / CPU per forwarded GET (stale PUT with a 7-byte body; kept alive) | $ratio_409 ($G_409 / $G_GET us) | <= 0.5 | $(verdict "$ratio_409" 0.5 le) |"
  echo "| CPU per 409 / CPU per forwarded GET (stale PUT, empty body; kept alive) | $ratio_4090 ($G_4090 / $G_GET us) | <= 0.5 | $(verdict "$ratio_4090" 0.5 le) |"
  if [ -n "$OHA" ]; then
    echo "| added p99 over direct at half saturation ($R50 req/s), gateway | $added_p99 ms (nginx: $added_p99_ng ms; at 25%, $R25 req/s: gateway $(calc "$(p99 gateway "$R25") - $(p99 direct "$R25")" 3), nginx $(calc "$(p99 nginx "$R25") - $(p99 direct "$R25")" 3) ms) | <= 1 ms | $(verdict "$added_p99" 1 le) |"
  else
    echo "| added p99 over direct, closed loop (oha unavailable) | $added_p99 ms (nginx: $added_p99_ng ms) | <= 1 ms | $(verdict "$added_p99" 1 le) |"
  fi
  echo "| table memory at $TABLE_N entries | $bytes_entry B/entry | <= 120 | $(verdict "$bytes_entry" 120 le) |"
  echo "| GET throughput, $TABLE_N entries / 1k entries | $ratio_tput ($tput_n / $tput_1k req/s; CPU/req ratio $ratio_cpu_scale) | >= 0.9 | $(verdict "$ratio_tput" 0.9 ge) |"
  echo
  echo "## Machine and noise"
  echo
  echo '```text'
  echo "nproc: $(nproc)"
  lscpu | awk 'NR <= 15'
  echo "kernel: $(uname -r)"
  echo "$("$NGINX" -v 2>&1)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  [ -z "$OHA" ] || echo "oha: $("$OHA" --version 2>&1 | head -1)"
  echo "rustc: $(rustc --version)"
  echo "load average (1 5 15 min) before: $LOAD0, after: $LOAD1"
  echo '```'
  echo
  echo "Both proxies run on core $PROXY_CORE (\`taskset -c $PROXY_CORE\`), the backend and the load generator on core $LOAD_CORE."
  echo "The machine was shared (other sessions compiling and benchmarking). During the CPU runs the proxy was runnable"
  echo "but waiting for its core **${noise_mean}%** of the time on average (worst run ${noise_max}%; \`run_delay\` from"
  echo "/proc/PID/task/*/schedstat), machine-wide CPU pressure (PSI \"some\") averaged ${psi_mean}%, hypervisor steal ${steal_mean}%."
  echo "Throughput and latency suffer from that; CPU time per request much less, since it counts only the proxy's own"
  echo "time (cache pollution and different batching still shift it by several percent: compare the range column)."
  echo
  echo "**A bias to know about.** About a quarter of each proxy's CPU time is the kernel waking the process at the other"
  echo "end of a loopback socket (\`sock_def_readable\` -> \`try_to_wake_up\`, an IPI to the other core, costly under KVM)."
  echo "It is cheap when the woken process is already running and dear when its core is idle. At saturation the slower"
  echo "proxy leaves the load core idle more often, so it pays more per wake-up: closed-loop CPU/req overstates the gap"
  echo "between a slow and a fast proxy somewhat. The fixed-rate runs (latency section) put both at the same rate and"
  echo "give a fairer CPU/req comparison."
  [ -z "$OHA_NOTE" ] || { echo; echo "**Latency:** $OHA_NOTE."; }
  echo
  echo "## CPU time per request (proxy process only)"
  echo
  echo "Closed loop, \`wrk -t1 -c$CONNS\`, ${DURATION}s per run after ${WARMUP}s of warm-up, $REPS runs each (interleaved); medians,"
  echo "and the range of CPU us/req over the runs. \"waited %\": share of the run during which the proxy was runnable but"
  echo "another process had its core (mean over the runs). Backend CPU is the demo backend's, per request, in the same runs."
  echo
  echo "| scenario | proxy | req/s | CPU us/req | range | user / sys us | backend us/req | status >= 400 | waited % |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for key in "get direct" "get nginx" "get gateway" "inm gateway" "stale nginx" "stale gateway" "stale0 gateway" \
    "put_cond direct" "put_cond nginx" "put_cond gateway" "put_new nginx" "put_new gateway"; do
    set -- $key
    awk -v n="$1" -v p="$2" "$MEDIAN_AWK"'
      $1 == n && $2 == p {c++; r[c] = $6; cpu[c] = $7; u[c] = $8; s[c] = $9; b[c] = $10; e += $15; o += $12; req += $4
        if (c == 1 || $7 < lo) lo = $7; if (c == 1 || $7 > hi) hi = $7}
      END {if (c) {m = median(cpu, c)
        printf "| %s | %s | %.0f | **%.2f** | %.2f - %.2f | %.2f / %.2f | %.2f | %d of %d | %.1f |\n", n, p, median(r, c), m, lo, hi,
          median(u, c), median(s, c), median(b, c), e, req, o / c}}' "$RESULTS"
  done
  echo
  echo "- **get**: GET of one ${GET_BYTES}-byte document. The gateway's entry exists, so each GET is a table lookup at start"
  echo "  and end (begin_read/finish_read), an ETag header inserted, the backend's ETag (none) removed."
  echo "- **inm**: GET with \`If-None-Match: <current etag>\`: the demo backend (no \`--validators\`) sends no validator, so the"
  echo "  gateway answers 304 from its table without touching the backend. nginx cannot; its reference is **get** (nginx"
  echo "  forwards If-None-Match and the backend, which has no ETag, answers 200)."
  echo "- **stale**: PUT \`If-Match: $STALE\` with a 7-byte body on an existing document. The gateway reads and drops the"
  echo "  body (a \`Content-Length\` of at most 16 KiB; larger or chunked bodies still close the connection) and answers 409"
  echo "  with the seed's JSON body on the kept-alive connection. nginx cannot refuse it; its figure is the same PUT forwarded (200)."
  echo "- **stale0**: the same with an empty body (\`Content-Length: 0\`): 409 on a kept-alive connection, the table check alone."
  echo "- **put_cond**: the conditional-write flow (bench/put_cond.lua): 64 documents, each read once with GET for its ETag,"
  echo "  then PUT \`If-Match: <ETag of the previous answer>\` over and over; every PUT passes, is reserved, forwarded and"
  echo "  settled with a fresh etag. Only the first 64 requests per run are GETs. nginx/direct: the same PUTs with a constant"
  echo "  If-Match that the backend ignores."
  echo "- **put_new**: unconditional PUT to a new path each request (a new table entry each time; last writer wins)."
  echo
  echo "## Latency at fixed request rates (GET, open loop)"
  echo
  if [ -n "$OHA" ]; then
    echo "nginx's saturation (closed loop, above): **$SAT req/s**; rates 25% = $R25 and 50% = $R50 req/s."
    echo "\`oha -z ${LAT_DURATION}s -q RATE --latency-correction -c 16 --no-tui\`, pinned to core $LOAD_CORE with the backend."
    echo
    echo "| rate req/s | target | p50 ms | p99 ms | added p99 vs direct ms | achieved req/s | proxy CPU us/req |"
    echo "|---|---|---|---|---|---|---|"
    for rate in "$R25" "$R50"; do
      d99=$(p99 direct "$rate")
      awk -v r="$rate" -v d="$d99" '$2 == r {printf "| %s | %s | %.3f | %.3f | %s | %.0f | %s |\n", r, $1, $3, $4, ($1 == "direct") ? "-" : sprintf("%.3f", $4 - d), $5, ($1 == "direct") ? "(backend) " sprintf("%.2f", $6) : sprintf("%.2f", $6)}' "$LAT"
    done
  else
    echo "oha was not available: closed loop (\`wrk -t1 -c$CONNS --latency\`, at saturation), which overstates latency."
    echo
    echo "| target | p50 ms | p99 ms | req/s |"
    echo "|---|---|---|---|"
    awk '{printf "| %s | %.3f | %.3f | %s |\n", $1, $3, $4, $5}' "$LAT"
  fi
  echo
  echo "## Table scaling"
  echo
  echo "A fresh gateway with \`[store] capacity = 2000000\`. $TABLE_N documents /r/0../r/$((TABLE_N - 1)) were first PUT on"
  echo "the backend directly (a 404 creates no entry). The gateway was filled with one GET per path (bench/paths.lua,"
  echo "each path once), RSS taken before ($RSS0 kB, after 1 s of warm-up) and after. Throughput: GETs cycling over"
  echo "all entries in a scattered order (index * $STRIDE mod N), \`wrk -t1 -c$CONNS\`, ${TPUT_DURATION}s, one run each."
  echo
  echo "| entries | RSS kB | bytes/entry (RSS delta / entries) | CPU us per filling GET (new entry) | GET req/s | CPU us/req | waited % |"
  echo "|---|---|---|---|---|---|---|"
  awk -v r0="$RSS0" '{printf "| %d | %d | %.1f | %.2f | %.0f | %.2f | %.1f |\n", $1, $2, ($2 - r0) * 1024 / $1, $3, $4, $5, $6}' "$SCALE"
  echo
  echo "The throughput ratio in the targets comes from a second fresh gateway filled with 1000 entries and"
  echo "$REPS interleaved runs against each (medians): $(m tput1k gateway3 6 | xargs printf '%.0f') req/s with 1000 entries"
  echo "($(m tput1k gateway3 7) us CPU/req), $(m tputN gateway2 6 | xargs printf '%.0f') req/s with $TABLE_N ($(m tputN gateway2 7) us CPU/req)."
  echo
  echo "The backend alone, same access pattern: $(m direct1000 direct 6 | xargs printf '%.0f') req/s over 1k documents,"
  echo "$(m "direct$TABLE_N" direct 6 | xargs printf '%.0f') req/s over $TABLE_N (backend CPU $(m direct1000 direct 10) / $(m "direct$TABLE_N" direct 10) us/req)."
  echo
  echo "## Commands"
  echo
  echo "Scratch files in a temp dir; nginx config from \`bench/nginx.conf.template\`; gateway: \`RUST_LOG=warn taskset -c $PROXY_CORE"
  echo "target/release/etag-gateway --config gw.toml --upstream $BACKEND --listen 127.0.0.1:PORT\` with \`[server] threads = 1\`."
  echo
  echo '```text'
  sed "s#$work#\$WORK#g" "$COMMANDS"
  echo '```'
  echo
  echo "Raw runs (fields: name proxy rep requests seconds req/s cpu_us user_us sys_us backend_us proxy_core_busy% waited% load_core_busy% steal% status>=400 socket_errors psi_some%):"
  echo
  echo '```text'
  cat "$RESULTS"
  echo '```'
  echo
  if [ -s "$PROF" ]; then
    echo "## Profile (generated)"
    echo
    echo "\`perf record -e cpu-clock -F 1999 -g -p <gateway>\` for ${DURATION}s of each load; \`perf report --no-children --sort dso,symbol\`."
    echo
    cat "$PROF"
  fi
} >"$work/report.md"

# keep the hand-written part of an existing report
MARK='<!-- hand-written -->'
if [ -f "$OUT" ] && grep -qF "$MARK" "$OUT"; then
  { echo; sed -n "/^$MARK\$/,\$p" "$OUT"; } >>"$work/report.md"
fi
cp "$work/report.md" "$OUT"

# --- summary on stdout -------------------------------------------------------------------------------------
sed -n '/^## Targets/,/^## Machine/p' "$OUT" | sed '$d'
sed -n '/^## CPU time per request/,/^## Commands/p' "$OUT" | sed '$d'
say "written $OUT (${ELAPSED}s)"

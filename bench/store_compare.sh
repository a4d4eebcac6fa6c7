#!/usr/bin/env bash
# Redis store vs memory store, side by side (issue: "Two gateway processes sharing one redis-server").
#
# Starts one demo backend, one gateway with the memory store and one with the Redis store (its own
# redis-server on a free loopback port, no persistence), all release builds, then measures:
#   (a) Redis round trips per request through the Redis gateway: EVALSHA + EVAL calls (one script
#       per contract step, so one round trip each) from `INFO commandstats`, before/after N requests,
#       for reads, unconditional writes, conditional writes (GET then PUT If-Match) and refused writes;
#       also the Redis commands run inside those scripts.
#   (b) Throughput, memory vs Redis, with `wrk -t1 -c16` for DURATION seconds each: the write path
#       (PUT to a new path every request, bench/put_distinct.lua) and the read path (GET one document).
#
# Needs: wrk, redis-server, redis-cli, curl (Debian: wrk redis-server redis-tools curl).
# Usage: bench/store_compare.sh        env: DURATION (s, default 10), CONNECTIONS (16), N (200)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
N=${N:-200}

for tool in wrk redis-server redis-cli curl cargo; do
  command -v "$tool" >/dev/null || { echo "store_compare: missing $tool" >&2; exit 1; }
done

echo "== building release binaries" >&2
cargo build --release --locked --bins >&2
BIN=target/release

work=$(mktemp -d -t store_compare.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A port nobody listens on (good enough for a bench on loopback).
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}

wait_port() { # port what
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "store_compare: $2 not listening on $1" >&2; exit 1
}

# --- processes --------------------------------------------------------------------------------
"$BIN/demo-backend" --listen 127.0.0.1:0 >"$work/backend.out" 2>"$work/backend.err" &
pids+=($!)
for _ in $(seq 200); do grep -q 'listening on' "$work/backend.out" 2>/dev/null && break; sleep 0.05; done
BACKEND="http://$(sed -n 's/^demo-backend listening on //p' "$work/backend.out" | head -1)"

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$RPORT" redis-server
rcli() { redis-cli -p "$RPORT" "$@"; }

start_gateway() { # name store-toml → prints the base URL
  local port
  port=$(free_port)
  printf '%s\n' "$2" >"$work/$1.toml"
  RUST_LOG=warn "$BIN/etag-gateway" --upstream "$BACKEND" --listen "127.0.0.1:$port" \
    --config "$work/$1.toml" >"$work/$1.out" 2>"$work/$1.err" &
  pids+=($!)
  wait_port "$port" "gateway ($1)"
  echo "http://127.0.0.1:$port"
}
MEM=$(start_gateway memory '[store]
kind = "memory"')
RED=$(start_gateway redis "[store]
kind = \"redis\"
url = \"redis://127.0.0.1:$RPORT\"")

echo "== machine: $(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   backend $BACKEND, memory gateway $MEM, redis gateway $RED (redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on $RPORT)"

# --- (a) round trips --------------------------------------------------------------------------
# Sum of calls of the commandstats lines matching a regex.
calls() {
  rcli info commandstats | tr -d '\r' |
    awk -F'[:=,]' -v re="$1" '$1 ~ re { s += $3 } END { print s + 0 }'
}
scripts() { calls '^cmdstat_(evalsha|eval)$'; }
inner() { calls '^cmdstat_' ; }

# curl config running N requests on one connection.
curl_many() { # url method body
  local cfg="$work/curl.cfg"
  : >"$cfg"
  for _ in $(seq "$N"); do printf 'url = "%s"\noutput = "/dev/null"\n' "$1" >>"$cfg"; done
  if [ "$2" = GET ]; then
    curl -s -K "$cfg"
  else
    curl -s -K "$cfg" -X "$2" -H 'Content-Type: application/json' ${4:+-H "If-Match: $4"} --data-binary "$3"
  fi
}

measure() { # label per-request-command...  (runs "$@", prints round trips per request)
  local label=$1; shift
  local s0 i0 s1 i1
  s0=$(scripts); i0=$(inner)
  "$@"
  s1=$(scripts); i1=$(inner)
  # inner: every command counted by commandstats, minus the scripts themselves and the two INFO
  # calls of this measurement.
  awk -v l="$label" -v n="$N" -v s="$((s1 - s0))" -v i="$((i1 - i0 - (s1 - s0) - 2))" \
    'BEGIN { printf "   %-38s %5.2f round trips (EVALSHA/EVAL) per request, %5.2f commands inside the scripts\n", l, s / n, i / n }'
}

# Warm up: scripts loaded (NOSCRIPT → EVAL once), identity adopted, the read document exists.
curl -s -o /dev/null -X PUT -H 'Content-Type: application/json' --data-binary '{"v":0}' "$RED/docs/rt-read"
curl -s -o /dev/null "$RED/docs/rt-read"
curl -s -o /dev/null -X PUT -H 'If-Match: "stale"' --data-binary '{}' "$RED/docs/rt-read"

writes_distinct() {
  local i
  for i in $(seq "$N"); do printf 'url = "%s/docs/rt-w-%s"\noutput = "/dev/null"\n' "$RED" "$i"; done >"$work/put.cfg"
  curl -s -K "$work/put.cfg" -X PUT -H 'Content-Type: application/json' --data-binary '{"v":1}'
}
conditional_writes() { # GET then PUT If-Match, N times; the reads' share is subtracted below
  local i etag
  for i in $(seq "$N"); do
    etag=$(curl -s -o /dev/null -D - "$RED/docs/rt-read" | tr -d '\r' | sed -n 's/^[Ee][Tt]ag: //p')
    curl -s -o /dev/null -X PUT -H 'Content-Type: application/json' -H "If-Match: $etag" \
      --data-binary "{\"v\":$i}" "$RED/docs/rt-read"
  done
}

echo "== (a) Redis round trips, N=$N requests each"
measure "GET (read path)" curl_many "$RED/docs/rt-read" GET
measure "PUT to new paths (no If-Match)" writes_distinct
measure "PUT If-Match stale (refused, 409)" curl_many "$RED/docs/rt-read" PUT '{"v":9}' '"stale"'
measure "GET + PUT If-Match (read-modify-write)" conditional_writes
echo "   (a write also clears the etag of every ancestor listing: one more round trip per ancestor;"
echo "    /docs/x has two, /docs and /)"
echo "   server time per call (µs), all of the above: $(rcli info commandstats | tr -d '\r' |
  awk -F'[:=,]' '$1 ~ /^cmdstat_(evalsha|eval|info|hmget|hset)$/ {
    for (i = 2; i < NF; i += 2) if ($i == "usec_per_call") printf "%s %s  ", substr($1, 9), $(i + 1) }')"
echo "   (every script runs INFO server once, to check the server's run_id)"

# --- (b) throughput ---------------------------------------------------------------------------
echo "== (b) throughput: wrk -t1 -c$CONNECTIONS -d${DURATION}s"
declare -A rps
run_wrk() { # label url [script]
  local out
  if [ -n "${3:-}" ]; then
    out=$(BENCH_PREFIX="$1-$RANDOM" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$3" "$2")
  else
    out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$2")
  fi
  rps[$1]=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
  local p50 p99 non2xx
  p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
  printf '   %-16s %10s req/s   p50 %8s   p99 %8s   non-2xx %s   (load avg %s)\n' \
    "$1" "${rps[$1]}" "$p50" "$p99" "${non2xx:-0}" "$(cut -d' ' -f1 /proc/loadavg)"
}
curl -s -o /dev/null -X PUT -H 'Content-Type: application/json' --data-binary '{"v":0}' "$MEM/docs/read"
curl -s -o /dev/null -X PUT -H 'Content-Type: application/json' --data-binary '{"v":0}' "$RED/docs/read"
redis_cpu() { rcli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { print s }'; }
redis_busy() { # label cpu-before: Redis CPU share and time per script during the last run
  rcli info commandstats | tr -d '\r' | awk -F'[:=,]' -v l="$1" -v c="$(awk -v a="$2" -v b="$(redis_cpu)" 'BEGIN { print b - a }')" -v d="$DURATION" '
    $1 == "cmdstat_evalsha" { for (i = 2; i < NF; i += 2) if ($i == "usec_per_call") u = $(i + 1); n = $3 }
    END { printf "     redis-server during %s: %.0f%% of a core, %d scripts, %s µs each\n", l, 100 * c / d, n, u }'
}
run_wrk write-memory "$MEM" bench/put_distinct.lua
rcli config resetstat >/dev/null; cpu0=$(redis_cpu)
run_wrk write-redis "$RED" bench/put_distinct.lua
redis_busy write-redis "$cpu0"
run_wrk read-memory "$MEM/docs/read"
rcli config resetstat >/dev/null; cpu0=$(redis_cpu)
run_wrk read-redis "$RED/docs/read"
redis_busy read-redis "$cpu0"
awk -v wm="${rps[write-memory]}" -v wr="${rps[write-redis]}" -v rm="${rps[read-memory]}" -v rr="${rps[read-redis]}" \
  'BEGIN { printf "   redis/memory: writes %.2f, reads %.2f\n", wr / wm, rr / rm }'
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

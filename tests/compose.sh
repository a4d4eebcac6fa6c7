#!/usr/bin/env bash
# Runs docker-compose.yml on this machine's Docker engine and checks it end to end:
#
#   1. the binaries are built on the host, and so is the compose torture test (tests/compose.rs):
#      ETAG_COMPOSE_PROFILE=debug (the default; what ./scripts/test.sh runs) takes target/debug, built by
#      `cargo test --no-run --test compose` with the same profile and features as the test suite's
#      `cargo build --all-targets`, so after it nothing is rebuilt; ETAG_COMPOSE_PROFILE=release takes
#      target/release (`cargo build --release --bins`, what the Dockerfile ships; a few minutes more);
#   2. images are made without any registry: root filesystems holding the host's binaries (debug info
#      stripped, as in the Dockerfile) and the shared libraries they link (ldd), /etc/passwd, bash for
#      the healthcheck (etag-gateway:local), and the host's redis-server and redis-cli
#      (etag-redis:local), turned into images with `docker import`, again only when their content
#      changed. docker-compose.local.yml points the services at them. (The Dockerfile and redis:7 need
#      a registry to pull their base images from; this machine has none.)
#   3. `up -d`: demo backend + gateway; waits until both are healthy (their own healthchecks);
#   4. the README's seed session through the gateway's published port: PUT, GET etag, PUT with the
#      unquoted etag -> 2xx, PUT with the old etag -> 409 with the seed's exact body, and the backend
#      (its published port) unchanged;
#   5. a clean restart of the gateway: SIGTERM through the init process, exit 0 within
#      stop_grace_period, and the etag handed out before it still current (the memory table's snapshot
#      on the gateway-state volume);
#   6. `--profile replicas up -d`: Redis + gateway-a + gateway-b; the lost-update torture across the
#      two replicas (cargo test --test compose, with ETAG_COMPOSE_GATEWAYS / ETAG_COMPOSE_BACKEND);
#   7. `down -v`, always (trap).
#
# Project name etagtest; host ports on 127.0.0.1 only, chosen free at each run. No Docker engine:
# prints "SKIP: no Docker engine" and exits 0 (an engine this user may not use, or no compose tool,
# is a failure, not a skip). ETAG_COMPOSE_LOAD_MS sets the torture's length (3000);
# ETAG_COMPOSE_PREBUILT=1 skips the cargo builds (uses target/<profile> and the test as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { printf '\n== [%3ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

profile=${ETAG_COMPOSE_PROFILE:-debug}
case $profile in
  debug | release) ;;
  *) fail "ETAG_COMPOSE_PROFILE is debug or release, not '$profile'" ;;
esac

if ! info=$(docker info 2>&1); then
  # Why: the first line naming an error (newer clients print it amid the client's own section).
  why=$(printf '%s\n' "$info" | grep -iE -m 1 'error|cannot|denied|not found|no such' || true)
  why=${why:-$(printf '%s\n' "$info" | grep -v '^\s*$' | tail -n 1)}
  # An engine that runs but refuses this user is not "no engine": say so instead of skipping.
  if printf '%s' "$info" | grep -qi 'permission denied'; then
    fail "a Docker engine runs but this user may not use it: $(printf '%s' "$info" | grep -i -m 1 'permission denied')"
  fi
  echo "SKIP: no Docker engine"
  echo "  (docker info: ${why:-failed})"
  exit 0
fi
if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  fail "a Docker engine runs, but neither docker-compose nor docker compose is installed (./scripts/setup.sh installs docker-compose)"
fi
project=etagtest
dc() { "${compose[@]}" -p "$project" -f docker-compose.yml -f docker-compose.local.yml "$@"; }
echo "compose: $("${compose[@]}" version 2>/dev/null | head -n1); engine: $(docker version -f '{{.Server.Version}}')"

# ---- ports -------------------------------------------------------------------------------------
# Below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by default): a port in it can
# be taken between this check and docker's bind by any outgoing connection on the machine (a test
# suite running next to this one), and docker-proxy's bind then fails with "address already in use".
# The check covers sockets in every state, not only listeners.
read -r ephemeral_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || ephemeral_low=32768
port_low=10000
port_span=$((ephemeral_low - port_low))
[ "$port_span" -ge 1000 ] || { port_low=1024; port_span=$((ephemeral_low - port_low)); }
[ "$port_span" -ge 100 ] || fail "ip_local_port_range starts at $ephemeral_low: no room for fixed ports below it"
taken=" "
# free_port VAR: sets VAR to a port no socket uses and no other VAR got (not in a subshell, so that
# $taken keeps what was handed out).
free_port() {
  local p
  while :; do
    p=$((port_low + (RANDOM * 32768 + RANDOM) % port_span))
    [[ $taken == *" $p "* ]] && continue
    [ -z "$(ss -Htan "sport = :$p")" ] || continue
    taken+="$p "
    printf -v "$1" '%s' "$p"
    return
  done
}
for v in ETAG_GATEWAY_PORT ETAG_ADMIN_PORT ETAG_BACKEND_PORT ETAG_GATEWAY_A_PORT ETAG_GATEWAY_B_PORT; do
  free_port "$v"
done
export ETAG_GATEWAY_PORT ETAG_ADMIN_PORT ETAG_BACKEND_PORT ETAG_GATEWAY_A_PORT ETAG_GATEWAY_B_PORT
gateway=http://127.0.0.1:$ETAG_GATEWAY_PORT
admin=http://127.0.0.1:$ETAG_ADMIN_PORT
backend=http://127.0.0.1:$ETAG_BACKEND_PORT
gateway_a=http://127.0.0.1:$ETAG_GATEWAY_A_PORT
gateway_b=http://127.0.0.1:$ETAG_GATEWAY_B_PORT

# ---- binaries ----------------------------------------------------------------------------------
bin=target/$profile
if [ -n "${ETAG_COMPOSE_PREBUILT:-}" ]; then
  step "ETAG_COMPOSE_PREBUILT: using $bin as it is"
elif [ "$profile" = release ]; then
  step "cargo build --release --locked --bins; cargo test --no-run --test compose"
  cargo build --release --locked --bins
  cargo test --locked --test compose --no-run 2>&1 | tail -n 2
else
  # Builds the bins too (integration tests need them), with the dev-dependencies' features like the
  # test suite's build: `cargo build --bins` alone would resolve other features and rebuild.
  step "cargo test --no-run --test compose (debug binaries in $bin)"
  cargo test --locked --test compose --no-run
fi
for b in etag-gateway demo-backend; do
  [ -x "$bin/$b" ] || fail "$bin/$b is missing"
done

# ---- images from local root filesystems --------------------------------------------------------
work=$(mktemp -d -t etag-compose.XXXXXX)
cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -n "${dc_up:-}" ]; then
    echo "---- containers ----"; dc --profile replicas ps
    echo "---- logs (tail) ----"; dc --profile replicas logs --no-color --tail=40
  fi
  if [ -n "${dc_up:-}" ]; then
    step "down -v"
    dc --profile replicas down -v --remove-orphans --timeout 20 2>&1 | tail -n 3
  fi
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then step "PASS"; else step "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

# rootfs DIR: an empty Debian-like tree (merged /usr), users root, etag (10001), redis (999).
rootfs() {
  local root=$1
  mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc/etag-gateway,var/lib/etag-gateway,tmp,data,proc,sys,dev}
  ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"
  ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"
  chmod 1777 "$root/tmp"
  printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
    'etag:x:10001:10001:etag-gateway:/nonexistent:/usr/sbin/nologin' \
    'redis:x:999:999:redis:/data:/usr/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'etag:x:10001:' 'redis:x:999:' >"$root/etc/group"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$root/etc/nsswitch.conf"
  : >"$root/etc/hosts"; : >"$root/etc/resolv.conf"
  chown 999:999 "$root/data"
  chown 10001:10001 "$root/var/lib/etag-gateway"
}

# install_bin ROOT SRC DEST: copies an executable and every shared library it links (as ldd finds
# them on this host) into ROOT; the file named SRC (symlinks followed) lands at DEST.
install_bin() {
  local root=$1 src=$2 dest=$3 lib
  install -D -m 0755 "$(readlink -f "$src")" "$root$dest"
  while read -r lib; do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

# import ROOT TAG CHANGES...: `docker import` of ROOT as TAG, unless TAG already holds this content.
import() {
  local root=$1 tag=$2 sum old
  shift 2
  # The content: every path with its type, owner, mode and link target, every file's bytes, and the
  # image settings.
  sum=$( (cd "$root" && find . -printf '%p %y %U:%G %m %l\n' | LC_ALL=C sort \
    && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; printf '%s\n' "$@") \
    | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f '{{index .Config.Labels "rootfs"}}' "$tag" 2>/dev/null)" = "$sum" ]; then
    echo "$tag: up to date ($sum)"
    return
  fi
  old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  local changes=(--change "LABEL rootfs=$sum")
  local c
  for c in "$@"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$root" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  echo "$tag: imported ($sum, $(du -sh "$root" | cut -f1))"
  [ -n "$old" ] && docker rmi "$old" >/dev/null 2>&1 || true
}

step "images: etag-gateway:local ($profile binaries), etag-redis:local (docker import of local root filesystems)"
g=$work/gateway
rootfs "$g"
install_bin "$g" "$bin/etag-gateway" /usr/local/bin/etag-gateway
install_bin "$g" "$bin/demo-backend" /usr/local/bin/demo-backend
# The Rust binaries carry debug info (profile.release debug = 1, and all of it in a debug build); the
# Dockerfile drops it too.
objcopy --strip-debug "$g/usr/local/bin/etag-gateway"
objcopy --strip-debug "$g/usr/local/bin/demo-backend"
install_bin "$g" "$(command -v bash)" /usr/bin/bash
install -m 0755 docker/http-healthcheck "$g/usr/local/bin/http-healthcheck"
install -m 0644 conf/gateway.toml "$g/etc/etag-gateway/example.toml"
# The system's CAs, as the Dockerfile's ca-certificates (for https:// upstreams).
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$g/etc/ssl/certs/ca-certificates.crt"
import "$g" etag-gateway:local \
  'ENV PATH=/usr/local/bin:/usr/bin:/bin' 'USER etag' 'EXPOSE 8080 9091' 'WORKDIR /' \
  'ENTRYPOINT ["etag-gateway"]' 'CMD ["--config", "/etc/etag-gateway/gateway.toml"]'

r=$work/redis
rootfs "$r"
install_bin "$r" "$(command -v redis-server)" /usr/bin/redis-server
install_bin "$r" "$(command -v redis-cli)" /usr/bin/redis-cli
import "$r" etag-redis:local \
  'ENV PATH=/usr/local/bin:/usr/bin:/bin' 'USER redis' 'WORKDIR /data' 'EXPOSE 6379' \
  'CMD ["redis-server"]'

# ---- the stack ---------------------------------------------------------------------------------
# health SERVICE...: waits until every service's container reports healthy (60 s at most).
health() {
  local svc id status deadline=$((SECONDS + 60))
  for svc in "$@"; do
    while :; do
      id=$(dc --profile replicas ps -q "$svc")
      status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null || echo missing)
      [ "$status" = healthy ] && break
      [ "$SECONDS" -lt "$deadline" ] || fail "$svc is $status after 60 s"
      sleep 0.5
    done
    echo "$svc: healthy"
  done
}

step "up -d (backend, gateway; ports: gateway $ETAG_GATEWAY_PORT, admin $ETAG_ADMIN_PORT, backend $ETAG_BACKEND_PORT)"
dc_up=1
dc --profile replicas down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
dc up -d --no-build 2>&1
health backend gateway
dc ps
# The processes: PID 1 of the container is the init (init: true), the gateway its child, both as the
# image's user etag (10001), not root.
top=$(docker top "$(dc ps -q gateway)" -eo uid,pid,ppid,args)
echo "$top"
echo "$top" | awk 'NR > 1 && $1 == 10001 && $4 == "etag-gateway" {found = 1} END {exit !found}' \
  || fail "etag-gateway does not run as uid 10001"
echo "$top" | awk 'NR > 1 && $1 != 10001 {bad = 1} END {exit bad}' || fail "a process runs as another user"
echo "$top" | grep -q 'docker-init -- etag-gateway' || fail "no init process in front of the gateway"

# ---- the seed's session through the gateway container ------------------------------------------
step "the seed's session through the gateway"
hdr=$work/headers
body=$work/body
# req METHOD URL [curl args...]: sets $status and $etag (ETag header without quotes), body in $body.
req() {
  local method=$1 url=$2
  shift 2
  status=$(curl --noproxy '*' -sS -o "$body" -D "$hdr" -w '%{http_code}' -X "$method" "$url" "$@")
  etag=$(tr -d '\r' <"$hdr" | sed -n 's/^[Ee][Tt][Aa][Gg]: *"\(.*\)"$/\1/p')
  printf '%s %s -> %s etag=%s %s\n' "$method" "${url#http://127.0.0.1:}" "$status" "${etag:-none}" "$(head -n 1 "$body" | head -c 240)"
}
doc=$gateway/docs/bobs_address
req PUT "$doc" -d "{ FirstName : 'Bob', LastName: 'Smith', Address: '4 Oak Ave.' }"
[ "$status" = 201 ] || fail "first PUT: $status"
req GET "$doc"
[ "$status" = 200 ] && [ -n "$etag" ] || fail "GET: $status, etag '$etag'"
[ "$(cat "$body")" = "{ FirstName : 'Bob', LastName: 'Smith', Address: '4 Oak Ave.' }" ] || fail "GET body"
old=$etag
req PUT "$doc" --header "If-Match:$old" -d "{ FirstName : 'Bob', LastName: 'Smith', Address: '5 Elm St.' }"
[ "$status" = 200 ] && [ -n "$etag" ] && [ "$etag" != "$old" ] || fail "PUT with the current etag: $status, etag '$etag'"
current=$etag
req PUT "$doc" --header "If-Match:$old" -d "{ FirstName : 'Bob', LastName: 'Smith', Address: '6 Pine Rd.' }"
[ "$status" = 409 ] || fail "PUT with the old etag: $status, expected 409"
expected="{\"url\":\"/docs/bobs_address\",\"actualETag\":\"$old\",\"expectedETag\":\"$current\",\"error\":\"PUT attempted on document 'bobs_address' using a non current etag\"}"
[ "$(cat "$body")" = "$expected" ] || fail "409 body: $(cat "$body")
expected:  $expected"
[ "$etag" = "$current" ] || fail "409 ETag header '$etag', expected '$current'"
req GET "$backend/docs/bobs_address"
[ "$(cat "$body")" = "{ FirstName : 'Bob', LastName: 'Smith', Address: '5 Elm St.' }" ] \
  || fail "the backend does not hold 5 Elm St."
req GET "$backend/__demo/log?path=/docs/bobs_address"
applied=$(grep -o '"seq"' "$body" | wc -l)
[ "$applied" = 2 ] || fail "the backend applied $applied writes, expected 2 (the stale one never reached it)"
echo "ok: 409 with the seed's body, the stale write never reached the backend (2 writes applied)"
req GET "$admin/metrics"
[ "$status" = 200 ] || fail "admin /metrics: $status"

# ---- a clean restart -----------------------------------------------------------------------------
step "restart the gateway: SIGTERM through the init, exit 0 within stop_grace_period, etags kept"
id=$(dc ps -q gateway)
s0=$SECONDS
dc stop gateway 2>&1
code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
echo "gateway stopped in $((SECONDS - s0)) s, exit code $code"
[ "$code" = 0 ] || fail "the gateway exited with $code (137 = SIGKILLed at the end of stop_grace_period)"
dc start gateway 2>&1
health gateway
# Read once: `docker logs | grep -q` fails under pipefail when grep exits early (SIGPIPE).
logs=$(docker logs "$id" 2>&1)
grep -E 'snapshot' <<<"$logs" || true
grep -qE 'restored from the snapshot.* entries=[1-9]' <<<"$logs" \
  || fail "the gateway did not restore its table from a snapshot"
# The etag handed out before the restart is still current (the snapshot in the gateway-state volume).
req PUT "$doc" --header "If-Match:$current" -d "{ FirstName : 'Bob', LastName: 'Smith', Address: '7 Birch Ln.' }"
[ "$status" = 200 ] || fail "PUT with the etag from before the restart: $status"

# ---- replicas sharing Redis ----------------------------------------------------------------------
step "--profile replicas up -d (redis, gateway-a on $ETAG_GATEWAY_A_PORT, gateway-b on $ETAG_GATEWAY_B_PORT)"
dc --profile replicas up -d --no-build 2>&1
health redis gateway-a gateway-b

step "lost-update torture across gateway-a and gateway-b (cargo test --test compose)"
rc=0
ETAG_COMPOSE_GATEWAYS="$gateway_a,$gateway_b" ETAG_COMPOSE_BACKEND="$backend" \
  cargo test --locked --test compose -- --nocapture >"$work/cargo-test.log" 2>&1 || rc=$?
grep -Ev '^\s*$|^ *(Finished|Running) ' "$work/cargo-test.log" || true
[ "$rc" -eq 0 ] || fail "cargo test --test compose: exit $rc"

# What the containers complained about (for the record; the checks above decide).
warnings=$(dc --profile replicas logs --no-color 2>&1 | grep -E ' (WARN|ERROR) ' || true)
echo "warnings and errors in the containers' logs: $(printf '%s' "$warnings" | grep -c . || true)"
[ -z "$warnings" ] || printf '%s\n' "$warnings" | tail -n 10

# No container crashed and was restarted behind our back (restart: unless-stopped).
restarts=$(docker inspect -f '{{.Name}} {{.RestartCount}}' $(dc --profile replicas ps -q) | awk '$2 != 0')
[ -z "$restarts" ] || fail "containers restarted: $restarts"

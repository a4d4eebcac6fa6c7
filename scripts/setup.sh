#!/usr/bin/env bash
# Installs what building and testing etag-gateway needs on Debian/Ubuntu, when it is missing:
# cmake (Pingora's zlib-ng build), a C compiler, pkg-config, curl, redis-server (the shared-store tests);
# for tests/compose.sh: ss (iproute2), objcopy (binutils), the CA bundle, and, where a Docker engine
# runs, docker-compose (never Docker itself).
set -euo pipefail
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v ss >/dev/null || missing+=(iproute2)
command -v objcopy >/dev/null || missing+=(binutils)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# docker-compose only where an engine runs (tests/compose.sh skips elsewhere), and without its
# Recommends (docker.io): the engine is the machine's business, not this script's.
nodeps=()
if docker info >/dev/null 2>&1 && ! command -v docker-compose >/dev/null \
  && ! docker compose version >/dev/null 2>&1; then
  nodeps+=(docker-compose)
fi
if [ $((${#missing[@]} + ${#nodeps[@]})) -gt 0 ]; then
  echo "setup: installing ${missing[*]} ${nodeps[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ${#nodeps[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${nodeps[@]}" >/dev/null
  fi
fi
# The TLS tests reach "localhost" by name; a bare system (a fresh chroot) may not resolve it.
if ! getent hosts localhost >/dev/null 2>&1; then
  echo "setup: localhost does not resolve; adding it to /etc/hosts" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "127.0.0.1 localhost" | $sudo tee -a /etc/hosts >/dev/null
fi

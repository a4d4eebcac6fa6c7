#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite: unit tests of the rules, end-to-end tests
# with the real gateway and demo backend on loopback, and the lost-update torture tests; then the
# compose stack on this machine's Docker engine (tests/compose.sh, from the debug binaries built here;
# it prints "SKIP: no Docker engine" where none runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --all-targets
cargo test --locked -- --nocapture --test-threads=2 "$@"
printf '\n==== tests/compose.sh: docker-compose.yml on the Docker engine (debug binaries) ====\n'
ETAG_COMPOSE_PROFILE=${ETAG_COMPOSE_PROFILE:-debug} ./tests/compose.sh

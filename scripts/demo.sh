#!/usr/bin/env bash
# Sets up what is missing, builds, and runs the gateway on :8080 in front of the bundled demo backend
# (127.0.0.1:3000), on the built-in defaults. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --release --bins
./target/release/demo-backend --listen 127.0.0.1:3000 &
backend=$!
trap 'kill $backend 2>/dev/null' EXIT
exec_status=0
./target/release/etag-gateway --upstream http://127.0.0.1:3000 "$@" || exec_status=$?
exit $exec_status

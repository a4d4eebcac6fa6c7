#!/usr/bin/env bash
# Sets up what is missing, then runs the whole test suite: unit tests of the rules, end-to-end tests
# with the real gateway and demo backend on loopback, and the lost-update torture tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked --all-targets
cargo test --locked -- --nocapture --test-threads=2 "$@"

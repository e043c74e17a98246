#!/usr/bin/env bash
# Runs the benchmark suite (benches/suite.rs) against real PostgreSQL and Redis, started or
# installed as for the tests. `--smoke` makes a short run whose numbers mean nothing: it only
# checks that every case runs, so it is built like the tests (unoptimised, reusing their build).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

if [[ " $* " == *" --smoke "* ]]; then
  cargo test --workspace --all-features --bench suite -- "$@"
else
  cargo bench --bench suite -- "$@"
fi

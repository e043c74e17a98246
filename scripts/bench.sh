#!/usr/bin/env bash
# Runs the benchmark suite (benches/suite.rs) against real PostgreSQL and Redis, started or
# installed as for the tests. `--smoke` makes a short run whose numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

cargo bench --bench suite -- "$@"

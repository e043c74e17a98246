#!/usr/bin/env bash
# Runs every test of the workspace against real PostgreSQL and Redis.
# Starts them when they are not running, and installs them first when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

cargo test --workspace --all-features "$@"

#!/usr/bin/env bash
# Benchmarks against a real cluster; each writes JSON figures under
# target/bench/. Times are figures to report, never test assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPUPOOL_TESTENV=${GPUPOOL_TESTENV:-$PWD/e2e/.state}
cargo build --release -q -p gpupool-operator -p gpupool-agent
cargo build -q -p gpupool-e2e --bins
testenv=target/debug/testenv
$testenv down >/dev/null
trap '$testenv down >/dev/null' EXIT
$testenv up --orgs 1 --agent target/release/gpupool-agent
target/debug/bench-agent --agent target/release/gpupool-agent --seconds "${AGENT_SECONDS:-120}"
target/debug/bench-operator --operator target/release/gpupool-operator --jobs "${JOBS:-1000}"
target/debug/bench-escrow

#!/usr/bin/env bash
# Benchmarks against real clusters; each writes JSON figures under
# target/bench/. Times are figures to report, never test assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPUPOOL_TESTENV=${GPUPOOL_TESTENV:-$PWD/e2e/.state}
cargo build --release -q -p gpupool-operator -p gpupool-agent
cargo build --release -q -p gpupool-operator --example bench_market
cargo build --release -q -p gpupool-e2e --bin bench-hole-punch
cargo build -q -p gpupool-e2e --bins
testenv=target/debug/testenv
$testenv down >/dev/null
trap '$testenv down >/dev/null' EXIT

# No cluster: the bid engine, and 200 real swarms in one process.
target/release/examples/bench_market --peers "${PEERS:-200}" --orders "${ORDERS:-40}" --out target/bench/market.json
# Hole punching through two real NATs (network namespaces; needs root and nft).
target/release/bench-hole-punch --rounds "${PUNCH_ROUNDS:-40}" --out target/bench/hole_punch.json

$testenv up --orgs 1 --agent target/release/gpupool-agent
target/debug/bench-agent --agent target/release/gpupool-agent --seconds "${AGENT_SECONDS:-120}"
target/debug/bench-operator --operator target/release/gpupool-operator --jobs "${JOBS:-1000}"
target/debug/bench-escrow

# Three organisations: placement across them. Every simulated node gets 16
# GPUs, so the lenders have room for the whole burst (48 A100 + 64 L40S) and
# the burst measures how fast the pipeline places, not a queue for GPUs;
# then 100 long leases held Running measure what running leases cost.
$testenv down >/dev/null
$testenv up --orgs 3 --agent target/release/gpupool-agent --gpus-per-node 16
GPUPOOL_GPUPOOL_OPERATOR_BIN=$PWD/target/release/gpupool-operator \
  target/debug/bench-pool --jobs "${POOL_JOBS:-100}" --burst "${POOL_BURST:-100}" \
    --steady "${POOL_STEADY:-100}" --steady-seconds "${POOL_STEADY_SECONDS:-120}" --out target/bench/pool.json

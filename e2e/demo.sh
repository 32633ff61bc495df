#!/usr/bin/env bash
# The gpupool tour: three organisations' real control planes with simulated
# GPU nodes, a local chain, and one operator per organisation joined into a
# pool over libp2p. acme applies a job that fits only elsewhere; the pool
# bids, acme opens a lease on chain, bravo runs it, and it is settled.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${GPUPOOL_TESTENV:-$PWD/e2e/.state}
export GPUPOOL_TESTENV=$state
bin=$(bash e2e/testenv/build.sh)
kubectl="$bin/kubectl"
testenv=target/debug/testenv
orgs=(acme bravo corvus)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
k() { local org=$1; shift; KUBECONFIG=$state/$org/admin.kubeconfig $kubectl "$@"; }

$testenv down >/dev/null
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: the clusters stay up; stop them with 'make testenv-down'"
  else
    $testenv down >/dev/null
  fi
}
trap cleanup EXIT

say "Starting three organisations (etcd, kube-apiserver, controller-manager, scheduler, kwok, agents) and anvil"
$testenv up --orgs 3 --agent target/debug/gpupool-agent

for org in "${orgs[@]}"; do
  say "$org's GPUs, as its agents report them"
  k "$org" get gpunodes
done

say "Starting one operator per organisation, each joining the pool on its own loopback port"
ports=(24101 24102 24103)
for i in 0 1 2; do
  org=${orgs[$i]}
  boot=()
  for j in 0 1 2; do [ "$j" = "$i" ] || boot+=("/ip4/127.0.0.1/tcp/${ports[$j]}"); done
  # acme also serves the Pool API, for renters without a cluster.
  api=()
  [ "$org" = acme ] && api=(--pool-api-addr 127.0.0.1:24110)
  KUBECONFIG=$state/$org/operator.kubeconfig POD_NAME=gpupool-operator-$org target/debug/gpupool-operator --org "$org" --metrics-addr 127.0.0.1:0 \
    --pool --p2p-listen "/ip4/127.0.0.1/tcp/${ports[$i]}" --bootstrap "$(IFS=,; echo "${boot[*]}")" \
    --policy-file "manifests/samples/policies/$org.yaml" \
    --chain-config "$state/chain/chain.json" --wallet-key-file "$state/chain/$org.key" \
    --chain-resync-seconds 1 --advert-every-ms 1000 --heartbeat-every-ms 1000 ${api[@]+"${api[@]}"} \
    >"$state/$org/logs/operator-demo.log" 2>&1 &
  pids+=($!)
  echo "  $org: /ip4/127.0.0.1/tcp/${ports[$i]}, prices $(grep -A1 model "manifests/samples/policies/$org.yaml" | tr -d '\n' | sed 's/- //; s/  */ /g')"
done

say "acme learns the other members from their signed adverts (PoolPeer)"
# A PoolPeer appears when a member is first heard from; its capacity with
# its first advert.
for _ in $(seq 1 60); do
  [ "$(k acme get poolpeers -o jsonpath='{.items[*].status.capacity[*].gpuProduct}' 2>/dev/null | wc -w)" -ge 2 ] && break
  sleep 0.5
done
k acme get poolpeers -o custom-columns='ORG:.spec.org,PEER:.spec.peerId,WALLET:.spec.wallet,CONNECTED:.status.connected,VIA:.status.via,GPUS:.status.capacity[*].gpuProduct,FREE:.status.capacity[*].free,PRICE:.status.capacity[*].pricePerGpuHour'

say "The same market through the gpupool CLI, cheapest first (gpupool market)"
KUBECONFIG=$state/acme/admin.kubeconfig target/debug/gpupool market | sed 's/^/  /'

chaincfg=$state/chain/chain.json
# Aligns whitespace-separated columns (no cell holds a space), for rows
# gathered from several one-row tables.
align() {
  awk '{ for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } if (NF > n) n = NF }
    END { for (r = 1; r <= NR; r++) { line = ""
      for (i = 1; i <= n; i++) line = line sprintf("%-" (w[i] + 2) "s", c[r, i])
      sub(/ +$/, "", line); print "  " line } }'
}
balances() {
  local first=1 out
  for org in "${orgs[@]}"; do
    out=$(target/debug/gpupool escrow balance --chain-config "$chaincfg" --wallet-key-file "$state/chain/$org.key")
    if [ "$first" = 1 ]; then echo "ORG $(head -n 1 <<<"$out")"; first=0; fi
    echo "$org $(tail -n 1 <<<"$out")"
  done | align
}
say "Token balances before"
balances

say "A bad AiJob is refused by the API server"
sed 's/count: 4/count: 0/' manifests/samples/aijob-pool.yaml | k acme apply -f - 2>&1 | sed 's/^/  /' || true

say "kubectl apply -f manifests/samples/aijob-pool.yaml   (in acme, which has no A100 or L40S)"
k acme apply -f manifests/samples/aijob-pool.yaml

say "Watching it: ordered, bid on, leased, running in another organisation, settled"
deadline=$((SECONDS + 180))
last=
while :; do
  phase=$(k acme get aijob eval-sweep -o jsonpath='{.status.phase}' 2>/dev/null || true)
  lease=$(k acme get aijob eval-sweep -o jsonpath='{.status.lease}' 2>/dev/null || true)
  line="$phase $lease"
  if [ "$line" != "$last" ]; then
    k acme get aijob eval-sweep -o custom-columns='NAME:.metadata.name,PHASE:.status.phase,WHERE:.status.runsOn.org,MODEL:.status.runsOn.gpuProduct,LEASE:.status.lease,MESSAGE:.status.message' --no-headers
    last=$line
  fi
  case "$phase" in Succeeded|Failed) break ;; esac
  if [ $SECONDS -gt $deadline ]; then echo "timed out; logs: $state/*/logs/operator-demo.log" >&2; exit 1; fi
  sleep 0.5
done

say "The bids acme recorded (gpupool bids eval-sweep)"
KUBECONFIG=$state/acme/admin.kubeconfig target/debug/gpupool bids eval-sweep | sed 's/^/  /'
say "acme's copy of the lease"
k acme get leases.gpupool.dev -o custom-columns='NAME:.metadata.name,PROVIDER:.spec.provider.org,PRICE:.spec.pricePerGpuHour,STATE:.status.state,REASON:.status.closeReason,DEPOSITED:.status.deposited,PAID:.status.paid,REFUNDED:.status.refunded'
say "bravo's copy, and the namespace it ran in (deleted once the lease closed)"
for _ in $(seq 1 40); do
  [ "$(k bravo get leases.gpupool.dev -n gpupool-system -o jsonpath='{.items[*].status.state}')" = Closed ] && break
  sleep 0.5
done
k bravo get leases.gpupool.dev -n gpupool-system -o custom-columns='NAME:.metadata.name,RENTER:.spec.renter.org,STATE:.status.state,REASON:.status.closeReason,PAID:.status.paid'
# The provider deletes it at its next beat after the close.
for _ in $(seq 1 40); do
  [ -z "$(k bravo get namespaces -l gpupool.dev/lease-namespace --field-selector status.phase=Active -o name)" ] && break
  sleep 0.5
done
k bravo get namespaces -l gpupool.dev/lease-namespace
say "The AiJob's Events"
k acme get events --field-selector involvedObject.kind=AiJob,involvedObject.name=eval-sweep \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message --sort-by=.metadata.creationTimestamp
say "Token balances after (acme paid bravo for the seconds used, into bravo's escrow account; the rest went back to acme's)"
balances

[ "$phase" = Succeeded ] || exit 1

renter=(--pool-api http://127.0.0.1:24110 --chain-config "$chaincfg" --wallet-key-file "$state/chain/renter.key")
say "A renter without a cluster, only a wallet, through acme's Pool API (gpupool --pool-api … pool-info)"
target/debug/gpupool "${renter[@]}" pool-info | sed 's/^/  /'
agent=$(target/debug/gpupool "${renter[@]}" pool-info -o json | sed -n 's/.*"agent": *"\([^"]*\)".*/\1/p')
say "It funds its escrow account and lets acme's operator open leases from it, up to 5 tokens (gpupool escrow deposit / agent)"
target/debug/gpupool "${renter[@]}" escrow deposit --amount 10 | sed 's/^/  /'
target/debug/gpupool "${renter[@]}" escrow agent --agent "$agent" --amount 5 | sed 's/^/  /'
renter_before=$(target/debug/gpupool "${renter[@]}" escrow balance)
say "It submits through acme and waits (gpupool --pool-api … submit --wait): acme places it and opens the lease as the renter's agent"
target/debug/gpupool "${renter[@]}" submit sweep-remote --image ghcr.io/example/eval:1 --gpus 2 --model L40S --max-price 3 \
  --window 1s --pod-annotation sim.gpupool.dev/duration=3s --wait --timeout 120s 2>&1 | sed 's/^/  /'
for _ in $(seq 1 40); do
  [ "$(target/debug/gpupool "${renter[@]}" escrow balance)" != "$renter_before" ] \
    && [ "$(target/debug/gpupool "${renter[@]}" leases -o json | grep -c '"state": "Open"')" = 0 ] && break
  sleep 0.5
done
say "The renter's leases and balance: it paid from its own account; acme's balance did not move"
target/debug/gpupool "${renter[@]}" leases | sed 's/^/  /'
{
  echo "WHEN $(head -n 1 <<<"$renter_before")"
  echo "before $(tail -n 1 <<<"$renter_before")"
  echo "after $(target/debug/gpupool "${renter[@]}" escrow balance | tail -n 1)"
} | align
echo
balances

say "Done: jobs placed across organisations and settled on chain, one of them for a renter without a cluster."

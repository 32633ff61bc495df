#!/usr/bin/env bash
# The gpupool tour. Today: one organisation's real control plane with
# simulated H100 nodes, the node agents, and the operator placing a sample
# AiJob locally and running it to completion. Federation across three
# organisations and on-chain settlement arrive with the pool and escrow work.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${GPUPOOL_TESTENV:-$PWD/e2e/.state}
export GPUPOOL_TESTENV=$state
bin=$(bash e2e/testenv/build.sh)
kubectl="$bin/kubectl"
testenv=target/debug/testenv

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

$testenv down >/dev/null
operator_pid=
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: the cluster stays up; stop it with 'make testenv-down'"
  else
    $testenv down >/dev/null
  fi
}
trap cleanup EXIT

say "Starting organisation 'acme': etcd, kube-apiserver, controller-manager, scheduler, kwok, one agent per node"
$testenv up --orgs 1 --agent target/debug/gpupool-agent
export KUBECONFIG=$state/acme/admin.kubeconfig

say "GPU nodes, labelled by the agents"
$kubectl get nodes -L gpupool.dev/gpu-product,gpupool.dev/gpu-count
say "What the agents read (GpuNode)"
$kubectl get gpunodes

say "Starting the gpupool operator (as its own ServiceAccount identity)"
KUBECONFIG=$state/acme/operator.kubeconfig target/debug/gpupool-operator --org acme --metrics-addr 127.0.0.1:0 \
  --chain-config "$state/chain/chain.json" --wallet-key-file "$state/chain/acme.key" --chain-resync-seconds 2 \
  >"$state/acme/logs/operator-demo.log" 2>&1 &
operator_pid=$!

say "A bad AiJob is refused by the API server"
sed 's/count: 2/count: 0/' manifests/samples/aijob-finetune.yaml | $kubectl apply -f - 2>&1 | sed 's/^/  /' || true

say "kubectl apply -f manifests/samples/aijob-finetune.yaml"
$kubectl apply -f manifests/samples/aijob-finetune.yaml
$kubectl apply -f manifests/samples/aijob-too-big.yaml

say "Watching the AiJob until it finishes"
deadline=$((SECONDS + 120))
last=
while :; do
  phase=$($kubectl get aijob finetune-llama -o jsonpath='{.status.phase}' 2>/dev/null || true)
  if [ "$phase" != "$last" ]; then
    $kubectl get aijob finetune-llama
    last=$phase
  fi
  case "$phase" in Succeeded|Failed) break ;; esac
  if [ $SECONDS -gt $deadline ]; then echo "timed out; operator log: $state/acme/logs/operator-demo.log" >&2; exit 1; fi
  sleep 0.5
done

say "Its Job and pod"
$kubectl get jobs,pods -o wide
say "Its Events"
$kubectl get events --field-selector involvedObject.kind=AiJob,involvedObject.name=finetune-llama \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message --sort-by=.metadata.creationTimestamp
say "The job that does not fit says why"
$kubectl get aijob pretrain-huge -o wide

[ "$phase" = Succeeded ] || exit 1

# Settlement: acme rents 8 GPUs from a provider wallet through the on-chain escrow.
chaincfg=$state/chain/chain.json
gp() { target/debug/gpupool "$@" --chain-config "$chaincfg"; }
addr() { gp escrow balance --wallet-key-file "$state/chain/$1.key" -o json | sed -n 's/.*"address": "\(0x[0-9a-fA-F]*\)".*/\1/p'; }
acme_wallet=$(addr acme)
provider_wallet=$(addr provider)
say "Token balances before the lease (anvil chain, escrow at $(sed -n 's/.*"escrow": "\(.*\)".*/\1/p' "$chaincfg"))"
gp escrow balance --wallet-key-file "$state/chain/acme.key"
gp escrow balance --wallet-key-file "$state/chain/provider.key" | tail -n 1

say "acme's Lease: 8 GPUs at 36 tokens per GPU-hour, 100 tokens deposited; the operator opens it on chain"
$kubectl apply -f - <<EOF2
apiVersion: gpupool.dev/v1alpha1
kind: Lease
metadata:
  name: demo-lease
spec:
  side: Renter
  orderId: demo-order-1
  bid: demo-bid
  renter: { org: acme, wallet: "$acme_wallet" }
  provider: { org: provider, wallet: "$provider_wallet" }
  pricePerGpuHour: "36"
  gpuCount: 8
  gpuProduct: NVIDIA-H100-80GB-HBM3
  escrow:
    chainId: 31337
    contract: "$(sed -n 's/.*"escrow": "\(.*\)".*/\1/p' "$chaincfg")"
    deposit: "100"
EOF2
$kubectl wait leases.gpupool.dev/demo-lease --for=jsonpath='{.status.state}'=Active --timeout=60s >/dev/null
$kubectl get leases.gpupool.dev demo-lease
lease_id=$($kubectl get leases.gpupool.dev demo-lease -o jsonpath='{.status.leaseId}')
sleep 5
say "The provider withdraws what 8 GPUs earned so far (gpupool escrow withdraw)"
gp escrow withdraw --wallet-key-file "$state/chain/provider.key" --lease "$lease_id"
gp leases --wallet-key-file "$state/chain/provider.key"

say "The work is done: acme closes the lease as Completed; the rest is refunded"
$kubectl patch leases.gpupool.dev demo-lease --type merge -p '{"spec":{"closeReason":"Completed"}}' >/dev/null
$kubectl wait leases.gpupool.dev/demo-lease --for=jsonpath='{.status.state}'=Closed --timeout=60s >/dev/null
$kubectl get leases.gpupool.dev demo-lease -o custom-columns=NAME:.metadata.name,STATE:.status.state,REASON:.status.closeReason,DEPOSITED:.status.deposited,PAID:.status.paid,REFUNDED:.status.refunded
$kubectl get events --field-selector involvedObject.kind=Lease,involvedObject.name=demo-lease \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message --sort-by=.metadata.creationTimestamp
say "Token balances after"
gp escrow balance --wallet-key-file "$state/chain/acme.key"
gp escrow balance --wallet-key-file "$state/chain/provider.key" | tail -n 1

say "Done. Placing jobs in other organisations over libp2p comes next (see README)."

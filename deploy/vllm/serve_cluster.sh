#!/usr/bin/env bash
# Start serve_node.sh on several nodes over ssh and print a ready-to-paste engine config.
#
#   NODES="gpu1 gpu2" MODEL=/shared/models/Qwen2-7B-Instruct deploy/vllm/serve_cluster.sh > engine.yaml
#
# The nodes need this repository (REPO, default: the same path) and the model at the same path.
# Stop with: NODES="gpu1 gpu2" deploy/vllm/serve_cluster.sh stop
set -euo pipefail

NODES="${NODES:?set NODES to a space-separated list of hosts}"
REPO="${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}"
PASS=(MODEL SERVED_NAME PORT_BASE TP MAX_MODEL_LEN GPU_MEM SEED PYTHON EXTRA_ARGS)

envs=""
for v in "${PASS[@]}"; do
  [[ -n "${!v:-}" ]] && envs+="$v=$(printf '%q' "${!v}") "
done

if [[ "${1:-}" == "stop" ]]; then
  for n in $NODES; do ssh "$n" "cd $(printf '%q' "$REPO") && $envs deploy/vllm/serve_node.sh stop" & done
  wait
  exit 0
fi

tmp=$(mktemp -d)
for n in $NODES; do
  ssh "$n" "cd $(printf '%q' "$REPO") && $envs deploy/vllm/serve_node.sh" > "$tmp/$n.urls" &
done
wait

echo "engine:"
echo "  kind: openai"
echo "  model: ${MODEL:-ditto-model}"
echo "  served_model: ${SERVED_NAME:-ditto-model}"
echo "  max_concurrency: 64"
echo "  base_urls:"
cat "$tmp"/*.urls | sed 's/^/    - /'
rm -rf "$tmp"

#!/usr/bin/env bash
# Start a Prefect process worker for one Ditto work pool, creating the pool when missing.
#
#   deploy/start-worker.sh               # POOL=ditto-cpu: the nightly build (catalog writer, CPU stages)
#   POOL=ditto-gpu deploy/start-worker.sh  # on a GPU host, next to deploy/vllm/serve_node.sh
#
# Run it from the repository checkout the deployments point at (their pull step changes into the
# directory `ditto deploy` ran in), with PREFECT_API_URL set and DITTO_HOME on storage shared by
# every worker of the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://<server>:4200/api first}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
POOL="${POOL:-ditto-cpu}"
LIMIT="${LIMIT:-1}"   # flow runs at once on this worker; a build already runs its shards in parallel
PREFECT="${PREFECT:-prefect}"
if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$PREFECT" work-pool create "$POOL" --type process
fi
exec "$PREFECT" worker start --pool "$POOL" --type process --limit "$LIMIT" --name "$POOL-$(hostname)"

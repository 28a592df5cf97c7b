#!/usr/bin/env bash
# Start a Prefect server (API + UI + scheduler) for Ditto.
#
#   deploy/start-server.sh                       # SQLite under $PREFECT_HOME: development
#   PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:SECRET@db:5432/prefect \
#     HOST=0.0.0.0 deploy/start-server.sh        # PostgreSQL: production (see docker-compose.yaml, k8s/)
#
# Then, in every shell that runs flows, workers or `ditto deploy`:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$HOME/.prefect}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-4200}"
PREFECT="${PREFECT:-prefect}"
if [[ -n "${PREFECT_API_DATABASE_CONNECTION_URL:-}" ]]; then
  echo "Prefect database: ${PREFECT_API_DATABASE_CONNECTION_URL%%:*}://… (PostgreSQL)"
else
  echo "Prefect database: SQLite in $PREFECT_HOME (development only; use PostgreSQL for production)"
fi
echo "UI and API: http://$HOST:$PORT  (export PREFECT_API_URL=http://$HOST:$PORT/api)"
exec "$PREFECT" server start --host "$HOST" --port "$PORT"

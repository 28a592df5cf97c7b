#!/usr/bin/env bash
# The generation benchmarks on a CUDA machine, for the next time a GPU is lent.
#
#   benchmarks/gpu.sh /models/Qwen2.5-7B-Instruct [characters]
#
# 1. benchmarks/generation_sim.py: the step-time model (no GPU needed; same table as on CPU), bundled
#    and long completion lengths.
# 2. benchmarks/engine_throughput.py with the given model (0.5B-7B, a local folder): a whole
#    `--until responses` run against raw vllm.LLM.generate on the run's own recorded prompts.
# 3. The GPU-marked engine tests (per-request seeds, replica pool, transformers on CUDA).
# Output goes to stdout and to benchmarks-gpu-<date>.log in the current directory.
set -euo pipefail
MODEL=${1:?usage: benchmarks/gpu.sh MODEL_PATH [characters]}
CHARS=${2:-40}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
LOG=${LOG:-benchmarks-gpu-$(date -u +%Y%m%dT%H%M%SZ).log}
[ -d "$MODEL" ] || { echo "model folder not found: $MODEL" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
cd "$ROOT"
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) model=$MODEL"
  echo "== generation_sim (bundled lengths)"
  "$PY" benchmarks/generation_sim.py --lengths bundled
  echo "== generation_sim (long answers)"
  "$PY" benchmarks/generation_sim.py --lengths long
  echo "== engine_throughput ($CHARS characters)"
  "$PY" benchmarks/engine_throughput.py --model "$MODEL" --characters "$CHARS" --shard-size 8 \
        --set engine.gpu_memory_utilization=0.4
  echo "== GPU tests"
  "$PY" -m pytest -q -m gpu tests/test_engines_real.py -p no:cacheprovider
} 2>&1 | tee "$LOG"

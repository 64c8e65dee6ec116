#!/usr/bin/env bash
# The demo command: installs the package (with the worker) into .venv and runs the whole
# pipeline on this machine: a FAKE vLLM server unless --base-url names a real one, a private
# redis-server and two workers when redis-server is installed (otherwise the embedded mode).
# Arguments go to `vllm-mw demo`, e.g. ./scripts/demo.sh --base-url http://localhost:8081/v1
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[worker]'
exec .venv/bin/vllm-mw demo "$@"

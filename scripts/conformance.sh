#!/usr/bin/env bash
# Conformance of the fake vLLM server and of the middleware's requests and records against
# vLLM 0.33.0's own pydantic protocol models (tests/client/test_conformance_vllm.py).
#
# Builds a separate virtualenv (default .venv-vllm, gitignored): vLLM without its dependencies,
# the CPU build of torch 2.13.0, and the pure-Python packages vLLM's protocol modules import.
# Then runs the test module with -s, which prints how many objects each model validated.
#   bash scripts/conformance.sh            # build (or reuse) the venv, run
#   VLLM_CONFORMANCE_VENV=/tmp/v bash scripts/conformance.sh -k chat
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_CONFORMANCE_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import vllm.entrypoints.openai.chat_completion.protocol" 2>/dev/null; then
    "${PIP[@]}" --no-deps vllm==0.33.0
    # torch is the largest download; 2.13.0 is the newest build this machine holds.
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" packaging openai regex numpy cbor2 psutil pyzmq urllib3 transformers aiohttp \
        requests openai-harmony fastapi pillow pybase64 cachetools prometheus-client msgspec \
        cloudpickle uvloop py-cpuinfo
fi
"${PIP[@]}" -e '.[test]'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -s tests/client/test_conformance_vllm.py "$@"

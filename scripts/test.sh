#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, type checks and the test suite.
#   - redis-server (from the system's packages) when it is missing
#   - a virtualenv in .venv with the package and its test tools
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k pipeline -x
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it (the tests start their own private servers)"
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
  elif command -v brew >/dev/null 2>&1; then
    brew install redis
  else
    echo "Please install redis-server (Redis 7) and run this again." >&2
    exit 1
  fi
fi

# --- chromium for the browser tests (report, viewer): Debian's package, driven by Playwright's
# Python package through executable_path; Playwright's own browser download is never used.
# Without root or sudo the browser tests skip with a message saying so.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
      || echo "chromium could not be installed: the browser tests will skip"
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null \
      || echo "chromium could not be installed: the browser tests will skip"
  else
    echo "chromium missing and no root/sudo: the browser tests will skip"
  fi
fi
# --- end chromium

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check --quiet client worker
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

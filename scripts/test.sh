#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, type checks and the test suite
# in each supported environment:
#   main     .venv, python3 (>= 3.11): ruff, mypy, the whole suite
#   py3.12   .venv-py3.12: the whole suite on Python 3.12
#   py3.13   .venv-py3.13: the whole suite on Python 3.13
#   redis8   .venv-redis8: the client's tests against the newest redis-py (tests/worker and
#            tests/pipeline, which need arq and so redis-py < 6, are left out)
#   openai2  .venv-openai2: the SDK capture tests on the last openai 2.x (built on httpx; the
#            other environments have openai 3, built on httpx2)
# Each virtualenv is reinstalled only when pyproject.toml changed (pip's cache makes a fresh
# one quick). Choose environments with VLLM_MW_TEST_ENVS="main redis8"; a Python that cannot be
# found is an error under CI (CI=true) and a warning otherwise.
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

envs="${VLLM_MW_TEST_ENVS:-main py3.12 py3.13 redis8 openai2}"
# The worker's tests and the end-to-end ones (arq, so redis-py < 6): not part of the
# newest-redis-py run. Client tests that start worker processes skip themselves there
# (tests/conftest.py).
worker_tests=(--ignore=tests/worker --ignore=tests/pipeline)
# The tests of the capture of the openai SDK (run again on openai 2 by the openai2 environment).
sdk_tests=(
  tests/client/test_sdk_capture.py tests/client/test_capture_transport.py
  tests/client/test_sdk_langchain.py
)

find_python() {  # find_python 3.12 -> a path to that interpreter, or nothing
  local version="$1" candidate
  # pyenv's shims exist for versions that are not selected: check that it runs, too.
  for candidate in "python$version" "$HOME"/.pyenv/versions/"$version".*/bin/python"$version"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
}

# The package's requirements for EXTRA, from pyproject.toml (one per line).
requirements() {
  python3 - "$1" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"][sys.argv[1]]))
PY
}

env_stamp() {  # what an environment was installed from: pyproject.toml and the pip arguments
  echo "$(sha256sum pyproject.toml | cut -c1-16) $*"
}

# install_requirements DIR PYTHON EXTRA [PIP ARGS...]: a virtualenv with what the package needs
# (not the package itself: building it writes into the source tree, so that step is serial).
install_requirements() {
  local dir="$1" python="$2" extra="$3"
  shift 3
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.vllm-mw-stamp" 2>/dev/null)" = "$(env_stamp "$extra" "$@")" ]; then
    return
  fi
  echo "-- installing $dir ($("$python" --version 2>&1))"
  rm -f "$dir/.vllm-mw-stamp"
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  mapfile -t needed < <(requirements "$extra")
  "$dir/bin/python" -m pip install -q "setuptools>=68" wheel "${needed[@]}" "$@"
}

# install_package DIR EXTRA [PIP ARGS...]: the package itself, editable, offline (its
# requirements are in place), then the stamp that lets the next run skip both steps.
install_package() {
  local dir="$1" extra="$2"
  shift 2
  [ "$(cat "$dir/.vllm-mw-stamp" 2>/dev/null)" = "$(env_stamp "$extra" "$@")" ] && return
  if ! "$dir/bin/python" -m pip install -q --no-deps --no-build-isolation -e . \
    >.install-package.log 2>&1; then
    cat .install-package.log >&2
    exit 1
  fi
  rm -f .install-package.log
  env_stamp "$extra" "$@" >"$dir/.vllm-mw-stamp"
}

describe() {  # the interpreter and redis-py of a virtualenv, for the banner
  "$1/bin/python" -c 'import platform, redis; print(f"Python {platform.python_version()}, redis-py {redis.__version__}")'
}

missing() {
  if [ "${CI:-}" = "true" ]; then
    echo "error: $1 not found; CI runs the suite on it (set VLLM_MW_TEST_ENVS to choose)" >&2
    exit 1
  fi
  echo "warning: $1 not found: skipping its environment (CI does not skip it)" >&2
}

# Plan each environment (directory, interpreter, extra, pip arguments), then install them all at
# once: installing is mostly waiting on the package index, so in parallel it costs about one.
declare -A env_dir env_python env_extra env_pip
for env in $envs; do
  case "$env" in
    main) env_dir[$env]=.venv; env_python[$env]="${PYTHON:-python3}"; env_extra[$env]=test ;;
    py3.12 | py3.13)
      python="$(find_python "${env#py}")"
      if [ -z "$python" ]; then
        missing "python${env#py}"
        continue
      fi
      env_dir[$env]=".venv-$env"; env_python[$env]="$python"; env_extra[$env]=test
      ;;
    redis8)
      env_dir[$env]=.venv-redis8; env_python[$env]="${PYTHON:-python3}"
      env_extra[$env]=test-client; env_pip[$env]="redis[hiredis]>=8"
      ;;
    openai2)
      env_dir[$env]=.venv-openai2; env_python[$env]="${PYTHON:-python3}"
      env_extra[$env]=test; env_pip[$env]="openai<3"
      ;;
    *)
      echo "unknown environment $env (known: main py3.12 py3.13 redis8 openai2)" >&2
      exit 2
      ;;
  esac
done

started=$SECONDS
declare -A installer
for env in "${!env_dir[@]}"; do
  # shellcheck disable=SC2086  # env_pip holds zero or one requirement, no spaces
  install_requirements "${env_dir[$env]}" "${env_python[$env]}" "${env_extra[$env]}" \
    ${env_pip[$env]:-} >".install-$env.log" 2>&1 &
  installer[$env]=$!
done
for env in "${!installer[@]}"; do
  if ! wait "${installer[$env]}"; then
    echo "error: installing the $env environment failed:" >&2
    grep -v "^WARNING: Location" ".install-$env.log" >&2 || true
    exit 1
  fi
  grep "^-- installing" ".install-$env.log" || true
  rm -f ".install-$env.log"
  # shellcheck disable=SC2086
  install_package "${env_dir[$env]}" "${env_extra[$env]}" ${env_pip[$env]:-}
done
echo "== environments ready in $((SECONDS - started)) s"

run_env() {  # run_env ENV [PYTEST ARGS...]: stops at the environment's first failure
  local env="$1" dir="${env_dir[$1]}"
  shift
  case "$env" in
    main)
      echo "== [main] $(describe "$dir"): ruff"
      "$dir/bin/ruff" check .
      "$dir/bin/ruff" format --check --quiet client worker testing
      echo "== [main] mypy (strict)"
      "$dir/bin/mypy"
      echo "== [main] $(describe "$dir"): pytest"
      "$dir/bin/python" -m pytest -q -p no:cacheprovider "$@"
      ;;
    py3.12 | py3.13)
      echo "== [$env] $(describe "$dir"): pytest"
      "$dir/bin/python" -m pytest -q -p no:cacheprovider "$@"
      ;;
    redis8)
      echo "== [redis8] $(describe "$dir"): pytest (client tests)"
      "$dir/bin/python" -m pytest -q -p no:cacheprovider "${worker_tests[@]}" "$@"
      ;;
    openai2)
      echo "== [openai2] $(describe "$dir"), openai $("$dir/bin/python" -c 'import openai; print(openai.__version__)'): pytest (SDK capture tests)"
      "$dir/bin/python" -m pytest -q -p no:cacheprovider "${sdk_tests[@]}" "$@"
      ;;
  esac
}

# Every environment runs even when an earlier one failed: one run shows every failure.
failed=()
for env in $envs; do
  [ -n "${env_dir[$env]:-}" ] || continue
  env_started=$SECONDS
  (run_env "$env" "$@") &  # a subshell of its own, so `set -e` still applies inside
  if wait $!; then
    echo "== [$env] passed in $((SECONDS - env_started)) s"
  else
    echo "== [$env] FAILED after $((SECONDS - env_started)) s"
    failed+=("$env")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== failed: ${failed[*]} (of $envs), in $((SECONDS - started)) s"
  exit 1
fi
echo "== all environments ($envs) passed in $((SECONDS - started)) s"

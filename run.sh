#!/usr/bin/env bash
# Set-up and entry point for a fresh machine.
#   ./run.sh demo   build the offline corpus, train the tiny model on the CPU, sample, write the routing report
#   ./run.sh test   run the test suite (and the linter)
# Creates .venv/ on first use. Torch is pinned to the CPU-friendly 2.13.0 only when the venv has
# no torch yet (set TORCH_SPEC to choose another build, e.g. TORCH_SPEC="torch>=2.6").
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

pip_install() {
  # Quiet unless it fails: the full log stays in $VENV/pip.log.
  if ! python -m pip install "$@" >>"$VENV/pip.log" 2>&1; then
    tail -n 30 "$VENV/pip.log" >&2
    echo "[setup] pip install $* failed; full log: $VENV/pip.log" >&2
    exit 1
  fi
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
  fi
  local stamp="$VENV/.smoe-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing smoe and its test dependencies"
    pip_install -e ".[test]"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo)
    setup
    exec smoe demo --out "${DEMO_OUT:-runs/demo}" "$@"
    ;;
  test)
    setup
    ruff check src tests benchmarks
    ruff format --check src tests benchmarks
    # pytest exit code 5 means "no tests collected": for this project that is a failure.
    set +e
    python -m pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: ./run.sh [demo|test] [args...]" >&2
    exit 2
    ;;
esac

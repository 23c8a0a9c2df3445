#!/usr/bin/env bash
# One entry point for set-up and the two jobs the README names.
#   ./run.sh demo   -> set up .venv (once) and run the end-to-end demo
#   ./run.sh test   -> set up .venv (once) and run the whole test suite
#   ./run.sh bench  -> set up .venv (once) and run the benchmarks
# Set-up installs torch==2.13.0 first (the CPU build; an unpinned torch pulls a
# multi-GB CUDA build), then qjax in editable mode with its torch and dev extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.qjax-installed

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[torch,onnx,dev,demo]"
    touch "$STAMP"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/qjax" demo "$@"
    ;;
  test)
    setup
    # two workers: the machines have two cores, and most test time is XLA compiling;
    # whole files per worker, so each module fixture (torch sweeps, converted models) is
    # built once, not once per worker (fresh clone, AMD EPYC 2 cores: 575 s vs 599 s)
    exec "$VENV/bin/python" -m pytest -m "not slow" -n 2 --dist loadfile "$@"
    ;;
  bench)
    setup
    # qjax bench runs each benchmarks/*.py in turn and prints one ratio table
    # (args pass through: --quick, --only NAME[,NAME], --verbose, --json PATH)
    exec "$VENV/bin/qjax" bench "$@"
    ;;
  *)
    echo "usage: ./run.sh {demo|test|bench} [args...]" >&2
    exit 2
    ;;
esac

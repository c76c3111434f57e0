#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call that fits the device budget
# (15 minutes in all, start-up included; one call may run 10): the CUDA correctness tests,
# then the three GPU benchmarks with reduced but target-bearing settings, each under its own
# time limit so that one hang cannot eat the rest. Logs and tables go under $OUT (the device
# tool's output folder; runs/gpu when run by hand). Nothing is installed: smoe runs from src/.
#
#     benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#     SMOE_GPU_TINY=1 benchmarks/gpu_session.sh   # the same steps on CPU with --tiny (a test)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
TINY=${SMOE_GPU_TINY:+--tiny}
status=0

table() {  # the last table (trailing lines starting with '|') of $OUT/NAME.log, appended to tables.md
  {
    echo
    echo "## $1"
    awk '/^\|/{buf = buf $0 "\n"; next} {if (buf != "") last = buf; buf = ""} END {printf "%s", (buf != "" ? buf : last)}' \
      "$OUT/$1.log"
  } | tee -a "$OUT/tables.md"
}

run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, remember a failure, go on
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1  # SIGTERM (the scripts print what they have), then SIGKILL
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/device.txt" 2>/dev/null

if [ -n "$TINY" ]; then
  echo "== tests: skipped (a tiny run)"
elif python -c "import pytest, hypothesis" 2>/dev/null; then
  # The graph tests first: a run of failures in one file must not stop pytest before them.
  run tests 100 python -m pytest -q -p no:cacheprovider --maxfail=10 tests/test_graph_step.py \
    tests/test_generate_decode_loop.py tests/test_dispatch_triton.py tests/test_model_head_loss.py tests/test_no_host_sync.py
else
  echo "== tests: skipped (pytest or hypothesis not installed)"
fi
# Limits add up to 530 s (+10 s each for a kill), under the device tool's 600 s per call; each
# table is written as soon as its script ends, and gpu_moe and gpu_decode print the rows they have
# when `timeout` stops them, so a call cut short still returns what finished.
: >"$OUT/tables.md"
run gpu_train 100 python benchmarks/gpu_train.py --steps 5 --warmup 2 $TINY
table gpu_train
run gpu_moe 150 python benchmarks/gpu_moe.py --iters 3 ${TINY:---tokens 1 16 512 2048 8192 32768} $TINY
table gpu_moe
run gpu_decode 180 python benchmarks/gpu_decode.py --steps 64 $TINY
table gpu_decode
exit $status

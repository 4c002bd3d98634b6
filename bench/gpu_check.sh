#!/usr/bin/env bash
# The GPU inference path, checked on a machine with an NVIDIA GPU and onnxruntime-gpu.
#
# CI has no GPU, so this is run by hand where one exists. It needs syncfw's
# dependencies and onnxruntime-gpu importable by `python3` (a venv made with
# `pip install -e '.[inference-gpu,dev]'`, or PYTHONPATH). It prints:
#   * the GPU, the onnxruntime build and its providers;
#   * the provider and engine tests (the `gpu` ones run here rather than skip);
#   * bench/inference.py --quick on CUDA and on CPU, same machine, same run.
# A step that fails is run again with PRELOAD=1: onnxruntime first loads CUDA and
# cuDNN from the nvidia-* wheels (onnxruntime.preload_dlls), which tells a missing
# library from a real fault. Logs go to ${OUT:-/tmp/gpu_check}/; each bench's JSON
# line is the last line of its log.
#
# Run: bash bench/gpu_check.sh            (PY=python3 by default)
set -u
PY=${PY:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt"
$PY -c '
import onnxruntime as ort
from syncfw.inference.providers import detect_accelerator
print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())
print("detect_accelerator:", detect_accelerator())
' 2>&1 | tee -a "$LOGS/gpu.txt"

# py ARGS...: python3 ARGS..., after onnxruntime.preload_dlls() when PRELOAD=1.
PY_PRELOAD='
import os, runpy, sys
if os.environ.get("PRELOAD"):
    import onnxruntime
    onnxruntime.preload_dlls()
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    import pytest
    sys.exit(pytest.main(args[2:]))
sys.argv = args
runpy.run_path(args[0], run_name="__main__")
'
py() { $PY -c "$PY_PRELOAD" "$@"; }

# twice LOG ARGS...: py ARGS..., logged to $LOGS/LOG.log; once more with PRELOAD=1
# (to LOG1.log) if it fails. Prints each try's exit status and the log's last lines.
twice() {
    local log=$1 pre rc
    shift
    for pre in "" 1; do
        PRELOAD=$pre timeout 300 bash -c "$(declare -p PY PY_PRELOAD; declare -f py); py $*" \
            > "$LOGS/$log$pre.log" 2>&1
        rc=$?
        echo "$log (PRELOAD=$pre) rc=$rc"; tail -25 "$LOGS/$log$pre.log"
        [ $rc = 0 ] && return 0
    done
    return 1
}

twice pytest -m pytest -q -p no:cacheprovider -rs \
    tests/test_inference_providers.py tests/test_inference_engine.py
twice bench_cuda bench/inference.py --quick --provider CUDAExecutionProvider
twice bench_cpu bench/inference.py --quick --provider CPUExecutionProvider

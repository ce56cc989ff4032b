#!/usr/bin/env bash
# The GPU validation run of docs/gpu-validation.md and docs/benchmarks.md, in one command:
#   OUT=gpu-out bash perf/gpu_validate.sh
# The whole suite (unit and property tests, every check against wrong answers, nbval over
# solutions/ and notebooks/) with compiled kernels, then the benchmark. On a machine whose
# Python has torch and triton but no jupyter/nbval, put their wheels in .whl/ first
# (docs/gpu-validation.md lists them); they are installed into /tmp/site.
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
MOE_LEARN_CHECK_LAUNCH=1 python3 -m pytest -p no:cacheprovider -n 12 --dist loadfile -q -rs tests solutions notebooks 2>&1 | tee "$OUT/pytest.log"
python3 -m moe_learn bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"

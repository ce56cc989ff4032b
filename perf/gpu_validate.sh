#!/usr/bin/env bash
# The GPU validation run of docs/gpu-validation.md, in one command (one device call):
#   OUT=gpu-out bash perf/gpu_validate.sh            # tests, then both sanitizers
#   OUT=gpu-out STEPS="bench" bash perf/gpu_validate.sh
# Steps (STEPS, space-separated, default "tests sanitize"):
#   tests     the whole suite with compiled kernels, and nbval over solutions/ (or only TESTS="paths")
#   sanitize  compute-sanitizer memcheck and racecheck over perf/sanitize.py (every kernel and mode)
#   bench     python -m moe_learn bench (all sections, or BENCH_ARGS, e.g. "--only experts --models
#             mixtral-8x7b --tokens 8192") into $OUT/logs/bench
#   ab        perf/ab_kernels.py, the kernel variants side by side (AB_ARGS, e.g. "--sections swiglu"),
#             into $OUT/logs/ab.json
#   host      perf/host_overhead.py (host time per decode call) and perf/profile_host.py (its cProfile)
#   decode    perf/decode_experts.py: the decode experts' path (two launches, and one) vs the grouped path vs
#             transformers' default, T = 1..64, into $OUT/logs/decode_experts.json (DECODE_ARGS="--sweep": launch
#             parameters first; "--models qwen3-30b-a3b,gpt-oss-120b --tokens 1,2,4": a part of the table)
#   abdw      perf/ab_dw.py, the dW configs, in-kernel gather vs copy first, vs torch._grouped_mm
#   profile   perf/profile_training.py --only ours (kernel table of the experts' forward+backward)
# On a machine whose Python has torch and triton but not pytest/jupyter/nbval/liger, put their
# wheels in .whl/ first (docs/gpu-validation.md lists them); they are installed into /tmp/site.
#
# Runs longer than one device call (10 minutes; a whole experts case with Liger-Kernel's autotuning
# can take 10): DETACH=1 starts the same run in its own process session (setsid: it outlives the
# call), in RUN_DIR (default /root/gpu-run), waits up to WAIT_S seconds (default 560) and copies what
# it has packed so far into $OUT; COLLECT=1 in the next call, issued at once so the machine stays
# warm, waits again and copies again. "finished" in the output says the run is over.
set -uo pipefail
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-tests sanitize}
RUN_DIR=${RUN_DIR:-/root/gpu-run}
collect() {
    local waited=0
    while [ ! -e "$RUN_DIR/done" ] && [ "$waited" -lt "${WAIT_S:-560}" ]; do sleep 5; waited=$((waited + 5)); done
    mkdir -p "$OUT"
    cp "$RUN_DIR"/out/*.tgz "$OUT"/ 2>/dev/null
    # the logs as they are now, mid-step too (the bench writes results.json after every case): what a
    # machine taken back before the step ends would otherwise lose
    tar czf "$OUT/logs-now.tgz" -C "$RUN_DIR/out" logs 2>/dev/null
    rm -f "$OUT/gpu-cache.tgz"  # far past what comes back; tuned.tgz holds the tuning
    tail -40 "$RUN_DIR/log"
    if [ -e "$RUN_DIR/done" ]; then echo "finished"; else echo "still running: call again with COLLECT=1"; fi
}
if [ "${COLLECT:-0}" = 1 ]; then
    collect
    exit 0
fi
if [ "${DETACH:-0}" = 1 ]; then
    rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
    OUT="$RUN_DIR/out" DETACH=0 setsid nohup bash -c "bash '$0'; touch '$RUN_DIR/done'" > "$RUN_DIR/log" 2>&1 < /dev/null &
    collect
    exit 0
fi
mkdir -p "$OUT/logs"
# The device tool returns at most 8 files: the long logs go into $OUT/logs and are packed into one
# archive after every step (a step cut by the time limit still leaves the earlier steps' logs and caches).
pack() {
    tar czf "$OUT/logs.tgz.tmp" -C "$OUT" logs && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
    # (only while small: a cache of compiled kernels grows to hundreds of MB, which would take long to pack
    # and could not come back)
    if [ -d .gpu-cache ] && [ "$(du -sm .gpu-cache | cut -f1)" -lt 64 ]; then
        tar czf "$OUT/gpu-cache.tgz.tmp" .gpu-cache && mv "$OUT/gpu-cache.tgz.tmp" "$OUT/gpu-cache.tgz"
    fi
    # The tuning results alone (kilobytes), for when the compiled kernels make gpu-cache.tgz too large to come
    # back (16 MiB a file): ours (tuning.json) and every triton.autotune's (Liger-Kernel's: 3.5-5 minutes
    # a bench case to redo). Unpacked into the checkout and carried, they spare the next call all tuning.
    if [ -d .gpu-cache ]; then
        (find .gpu-cache -name tuning.json -o -name '*.autotune.json') | tar czf "$OUT/tuned.tgz.tmp" -T - \
            && mv "$OUT/tuned.tgz.tmp" "$OUT/tuned.tgz"
    fi
}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
# the tuning logs (ours and triton.autotune's) say where a bench case's setup minutes go
export PYTHONUNBUFFERED=1 MOE_LEARN_TUNING_LOG=1 TRITON_PRINT_AUTOTUNING=1
# Compiled kernels (Triton's cache) and tuned configs (ours and triton.autotune's) kept in .gpu-cache/: the
# GPU machine starts bare on every call, and compiling and tuning one experts case takes minutes (most of it
# Liger-Kernel's autotuning). After every step the folder is packed into $OUT/gpu-cache.tgz (it comes back
# while under 16 MiB) and its tuning results alone into $OUT/tuned.tgz; unpack either into the checkout and
# pass carry=[".whl", ".gpu-cache"] to the next call.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.gpu-cache/triton}
export TRITON_CACHE_AUTOTUNING=1  # triton.autotune's winners go to that cache too (*.autotune.json)
export MOE_LEARN_TUNING_CACHE=${MOE_LEARN_TUNING_CACHE:-$PWD/.gpu-cache/tuning.json}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/logs/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/logs/gpu.txt"
for step in $STEPS; do
    start=$(date +%s)
    case $step in
        tests)
            MOE_LEARN_CHECK_LAUNCH=1 python3 -m pytest -p no:cacheprovider -n 12 --dist loadfile -q -rfE --durations=20 \
                ${TESTS:-tests solutions} 2>&1 \
                | tee "$OUT/logs/pytest.log" | tail -40 ;;
        sanitize)
            for tool in memcheck racecheck; do
                compute-sanitizer --tool "$tool" --error-exitcode 9 python3 perf/sanitize.py > "$OUT/logs/$tool.log" 2>&1
                echo "compute-sanitizer --tool $tool python3 perf/sanitize.py: exit $?"
                tail -4 "$OUT/logs/$tool.log"
            done ;;
        bench)
            # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
            python3 -m moe_learn bench --out "$OUT/logs/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/logs/bench.log" | tail -60 ;;
        ab)
            # shellcheck disable=SC2086
            python3 perf/ab_kernels.py "$OUT/logs/ab.json" ${AB_ARGS:-} 2>&1 | tee "$OUT/logs/ab.log" | tail -60 ;;
        host)
            python3 perf/host_overhead.py "$OUT/logs/host.json" 2>&1 | tee "$OUT/logs/host.log" | tail -30
            python3 perf/profile_host.py > "$OUT/logs/profile_host.txt" 2>&1; grep "us/call" "$OUT/logs/profile_host.txt" ;;
        decode)
            # shellcheck disable=SC2086
            python3 perf/decode_experts.py "$OUT/logs/decode_experts.json" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/logs/decode_experts.log" \
                | tail -90 ;;
        abdw)
            python3 perf/ab_dw.py 2>&1 | tee "$OUT/logs/ab_dw.txt" | grep -v "^  .*config" | tail -20 ;;
        profile)
            python3 perf/profile_training.py --only ours 2>&1 | tee "$OUT/logs/profile_training.txt" | grep "==" ;;
        *) echo "unknown step $step" ;;
    esac
    echo "step $step took $(( $(date +%s) - start )) s"
    pack
done
echo ".gpu-cache holds $(du -sh .gpu-cache 2>/dev/null | cut -f1); its tuning is in $OUT/tuned.tgz"

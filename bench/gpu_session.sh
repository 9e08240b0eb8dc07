#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine where device time is short.
# Runs in the project's root with a CUDA build on the path (../shared/gpu/build.sh does that):
#   doctor, the GPU tests (-m gpu), the import-order/crash probe (bench/gpu_probe.py) and the
#   GPU benchmarks (gen, stream, batch; quick, q4_k_m). Each step has its own time limit and log;
#   logs and results go to $OUT (default /tmp/gpu-out; 8 files). The benchmark checkpoints may be written
#   beforehand (numpy only, e.g. while llama.cpp builds): `python -m bench.models --checkpoints
#   > /tmp/gpu-checkpoints.log`, then touch $EDGEGUARD_BENCH_CACHE/.checkpoints-done; when that log
#   exists this script waits for the file. The whole call used on an H200: bench/results/2026-11-28-nvidia-h200-gpu.md.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export EDGEGUARD_CACHE_DIR=${EDGEGUARD_CACHE_DIR:-/tmp/edgeguard-cache}
export EDGEGUARD_TEST_CACHE=${EDGEGUARD_TEST_CACHE:-/tmp/edgeguard-test-cache}
export EDGEGUARD_BENCH_CACHE=${EDGEGUARD_BENCH_CACHE:-/tmp/edgeguard-bench-cache}
t0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 s rc
  shift 2
  s=$(date +%s)
  echo "=== $name (limit ${limit} s, at +$((s - t0)) s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - s )) s"
  tail -n "${TAIL:-30}" "$OUT/$name.log"
}

# the benchmark models convert in the background while the tests and the probe run
(
  if [ -e /tmp/gpu-checkpoints.log ]; then  # a checkpoint writer was started before the build
    for _ in $(seq 300); do [ -e "$EDGEGUARD_BENCH_CACHE/.checkpoints-done" ] && break; sleep 1; done
  fi
  python3 -m bench.models --quants q4_k_m > /tmp/gpu-models.log 2>&1
  touch /tmp/gpu-models-done
) &
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
step doctor 90 python3 -m edgeguard doctor --json
step pytest_gpu "${PYTEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step probe "${PROBE_S:-150}" python3 bench/gpu_probe.py --out "$OUT/probe.json" --jobs "${PROBE_JOBS:-8}"
echo "waiting for the benchmark models..."
for _ in $(seq 240); do [ -e /tmp/gpu-models-done ] && break; sleep 1; done
cat /tmp/gpu-checkpoints.log /tmp/gpu-models.log 2>/dev/null | grep -v '^[{}]' | grep -v '^  "'
# the bench gets what is left of the call's time (T_START: when the whole command began)
left=$(( ${CALL_S:-585} - ($(date +%s) - ${T_START:-$t0}) ))
TAIL=60 step bench "$(( left > 60 ? left : 60 ))" python3 bench/run.py --quick --quants q4_k_m --only gen,stream,batch \
  --device gpu --out /tmp/gpu-bench
cp /tmp/gpu-bench/results.md "$OUT/bench-results.md" 2>/dev/null
cp /tmp/gpu-bench/results.json "$OUT/bench-results.json" 2>/dev/null
echo "=== all steps done in $(( $(date +%s) - t0 )) s"

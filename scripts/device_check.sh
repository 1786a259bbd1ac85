#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# GPU verification in one call (the workplace's device machine, or any CUDA machine): uses the
# prebuilt binaries in $BIN (default .devbin) when they run here, else builds them with nvcc from
# the checkout (header-only dependencies from .deps/include when the system has none); then runs
# the CUDA tests, the golden checker on the CUDA backend, the CUDA benchmarks and the PyTorch
# comparison on the same GPU. Logs under $OUT (default ./device-out). Options by environment:
# BENCH_ARGS (unidiffuser-bench-cuda), TORCH=0 (no PyTorch), TORCH_ARGS (cuda_torch.py, e.g.
# --compile), TORCH_TIMEOUT (seconds, default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
BIN=${BIN:-.devbin}
ARCH=${ARCH:-sm_90a}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
# CUDA libraries of the Python wheels (nvidia-*), where the toolkit's are not on the path
for d in $(python3 -c "import nvidia, os; print(' '.join(os.path.join(p, s, 'lib') for p in nvidia.__path__ for s in os.listdir(p)))" 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv \
  > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"

if ! "$BIN/test_cuda" --help >/dev/null 2>&1; then
  echo "== carried binaries do not run here ($("$BIN/test_cuda" --help 2>&1 | head -2)); building"
  BIN=/tmp/udbin; mkdir -p "$BIN"
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  flags=(-std=c++20 --extended-lambda --expt-relaxed-constexpr -O3 -arch="$ARCH" -I include
         -I .deps/include -I tools/common -I tools/golden -lcublasLt)
  t0=$(date +%s)
  "$NVCC" "${flags[@]}" tests/cuda/test_cuda.cu -o "$BIN/test_cuda" > "$OUT/build_test.log" 2>&1 &
  "$NVCC" "${flags[@]}" tools/golden/main_cuda.cu -o "$BIN/unidiffuser-golden-cuda" \
    > "$OUT/build_golden.log" 2>&1 &
  "$NVCC" "${flags[@]}" benchmarks/cuda/bench_cuda.cu -o "$BIN/unidiffuser-bench-cuda" \
    > "$OUT/build_bench.log" 2>&1 &
  wait
  echo "build: $(( $(date +%s) - t0 )) s"; tail -n 5 "$OUT"/build_*.log
fi

echo "== test_cuda"
export UNIDIFFUSER_GOLDEN_DIR=$PWD/tests/data/golden
timeout 240 "$BIN/test_cuda" 2>&1 | tee "$OUT/test_cuda.log" | tail -n 40
echo "== golden (CUDA backend)"
timeout 180 "$BIN/unidiffuser-golden-cuda" tests/data/golden > "$OUT/golden_cuda.log" 2>&1
echo "golden exit $?"; grep -E "FAIL|ERROR" "$OUT/golden_cuda.log" | head -n 20; tail -n 2 "$OUT/golden_cuda.log"
echo "== unidiffuser-bench-cuda"
timeout 240 "$BIN/unidiffuser-bench-cuda" ${BENCH_ARGS:-} > "$OUT/bench_cuda.log" 2>&1
echo "bench exit $?"; sed -n '/^benchmark/,$p' "$OUT/bench_cuda.log"; grep -E "error" "$OUT/bench_cuda.log"
if [ "${TORCH:-1}" = 1 ]; then
  echo "== PyTorch on the same GPU"
  PYTHONUNBUFFERED=1 timeout "${TORCH_TIMEOUT:-300}" python3 benchmarks/compare/cuda_torch.py \
    ${TORCH_ARGS:-} \
    > "$OUT/torch.log" 2>&1
  echo "torch exit $?"; sed -n '/^benchmark/,$p' "$OUT/torch.log"; tail -n 3 "$OUT/torch.log"
fi

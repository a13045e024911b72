#!/usr/bin/env bash
# Everything the kernels need a GPU for, in one go, on a machine with CUDA PyTorch and Triton
# already installed (no network needed). Results land in $OUT (default kernels/bench/out):
#   device.txt   the GPU, from nvidia-smi
#   tests.txt    the kernel tests with the Triton path compiled for that GPU (not interpreted)
#   compile.md   registers, spills and load/store widths of each kernel for sm_90 and sm_80
#   bench.md     time, peak memory and bandwidth: ours (several launch configs), torch eager and
#                compiled, Liger-Kernel (if installed, or as a wheel under .whl/)
#
#   bash kernels/bench/gpu_check.sh                      # T in {4K, 16K, 64K}
#   TOKENS="4096" CONFIGS="4096x8" KERNEL_TESTS=0 bash kernels/bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-kernels/bench/out}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

if compgen -G ".whl/*.whl" >/dev/null; then  # e.g. liger-kernel, fetched where pip has a network
    "$py" -m pip install -q --no-index --no-deps --target /tmp/megatron-vr1-site .whl/*.whl
    export PYTHONPATH=/tmp/megatron-vr1-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the kernels need only torch and triton: install the project itself, none of its dependencies
"$py" -m pip install -q --no-deps --no-build-isolation -e .

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory --format=csv | tee "$out/device.txt"
if [ "${KERNEL_TESTS:-1}" = 1 ]; then
    "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/tests.txt" ||
        echo "kernel tests FAILED: see $out/tests.txt (going on to the measurements)"
fi
"$py" -m megatron_vr1.kernels.compile_check --configs ${CONFIGS:-2048x4 4096x8 8192x8 8192x16} | tee "$out/compile.md"
"$py" kernels/bench/bench_grpo_loss.py --tokens ${TOKENS:-4096 16384 65536} \
    --configs ${CONFIGS:-2048x4 4096x8 8192x8 8192x16} 2>&1 | tee "$out/bench.md"

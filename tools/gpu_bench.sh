#!/usr/bin/env bash
# The project's GPU measurements, on one machine with CUDA PyTorch and Triton and no network.
# Wheels for what that machine lacks (megatron-core, hydra-core, omegaconf, antlr4, math-verify,
# mathruler, liger-kernel, ...) go under .whl/ first, fetched where pip has a network.
#
#   PARTS="tests sync rl kernels" bash tools/gpu_bench.sh      # results in $OUT (default gpu_out/)
#   PARTS="sft" SFT_ARGS="--micro-batch-tokens 8192 train.recompute=full" bash tools/gpu_bench.sh
#
# parts: tests    the GPU tests of the suite (tests/test_gpu.py)
#        sync     weight sync of a 7B-shaped policy into the hf engine (tools/bench_sync.py)
#        rl       a GRPO step of the toy model with the hf engine (tools/bench_rl.py step)
#        kernels  kernels/bench/gpu_check.sh: compiled kernel tests, compile report, benchmark
#        sft      the SFT step of a 3B-shaped model with a profile (tools/bench_sft.py); sft2 a
#                 second run of it with SFT2_ARGS
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron-vr1-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/megatron-vr1-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/parts.txt"
python3 -c "import torch, triton, transformers, pyarrow, megatron.core as mc; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', mc.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$out/parts.txt"

deadline=$(( $(date +%s) + ${BUDGET_S:-100000} ))  # every part ends by then
limit() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
run_part() {
    case $1 in
        tests)   timeout "$(limit ${TIME_TESTS:-200})" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.txt" ;;
        sync)    timeout "$(limit ${TIME_SYNC:-200})" python3 tools/bench_sync.py --model "${SYNC_MODEL:-qwen2_5_vl_7b}" 2>&1 | tee -a "$out/rl.txt" ;;
        rl)      timeout "$(limit ${TIME_RL:-200})" python3 tools/bench_rl.py step ${RL_ARGS:---steps 6} 2>&1 | tee -a "$out/rl.txt" ;;
        kernels) OUT="$out/kernels" timeout "$(limit ${TIME_KERNELS:-360})" bash kernels/bench/gpu_check.sh ;;
        sft|sft2) local extra=${SFT_ARGS:-}; [ "$1" = sft2 ] && extra=${SFT2_ARGS:-}
                 timeout "$(limit ${TIME_SFT:-400})" python3 tools/bench_sft.py --model qwen2_5_vl_3b --samples 16 \
                     --reply-words 900 --image 896x672 --global-batch 16 --steps 6 --profile-step 5 \
                     $extra 2>&1 | tee -a "$out/sft.txt" ;;
        *)       echo "unknown part $1"; return 2 ;;
    esac
}
for part in ${PARTS:-tests sync rl kernels}; do
    start=$(date +%s)
    run_part "$part"
    rc=$?
    echo "== $part: rc $rc, $(( $(date +%s) - start )) s" | tee -a "$out/parts.txt"
done

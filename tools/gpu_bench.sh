#!/usr/bin/env bash
# Every GPU figure the project reports, in one run of at most 8 minutes on one GPU with CUDA
# PyTorch and Triton and no network. On a CPU, DRY=1 runs the same parts at toy sizes: the
# plumbing, not a figure.
#
#   bash tools/gpu_bench.sh OUT            # OUT/<part>.json and .txt, and OUT/results.md
#   DRY=1 bash tools/gpu_bench.sh OUT      # the same on a CPU, toy sizes
#
# What the GPU machine lacks goes under .whl/ first, fetched where pip has a network (at most
# 64 MiB in all; checked here):
#   python -m pip download --no-deps -d .whl -r tools/gpu_wheels.txt
#
# parts, in order, each under its own time limit and all ending by BUDGET_S (default 480 s):
#   env        the GPU, driver and versions
#   loss       the GRPO loss at V=152064 and 4K/16K/64K tokens: ours, Liger-Kernel, torch.compile
#   sft_local  the 3B SFT step (packed ~2.3K-token samples), local spec, profiled
#   sft_fused  the same with the fused spec (Triton RMSNorm and rotary)
#   rollout    the megatron engine at the 3B shape: continuous and static batching
#   refit      a 7B-shaped policy's weights into the hf rollout engine
#   grpo       GRPO steps of a 3B-shaped policy, for its peak memory
#   tests      with what time is left: the kernel and GPU tests, the kernels compiled (not in DRY)
# then tools/gpu_bench_report.py writes OUT/results.md (one table, the targets checked) and
# gives the exit status: 1 when a part is missing or a target is missed.
# PARTS="loss sft_local" runs only those; SFT_ARGS, ROLLOUT_ARGS, GRPO_ARGS add arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_bench.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
dry=${DRY:-0}
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
limit() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

if [ "$dry" != 1 ]; then
    if compgen -G ".whl/*" >/dev/null; then
        size=$(du -cb .whl/* | tail -n 1 | cut -f1)
        if [ "$size" -gt $(( 64 << 20 )) ]; then
            echo "gpu_bench: .whl/ holds $(( size >> 20 )) MiB; at most 64 MiB can be carried" >&2
            exit 2
        fi
        "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron-vr1-site .whl/* || exit 1
        export PYTHONPATH=/tmp/megatron-vr1-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$py" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi

if [ "$dry" = 1 ]; then  # toy sizes: every part runs in seconds on a CPU
    loss=(--tokens 32 --vocab 2048 --iters 1 --no-compile)
    sft=(--model toy --samples 4 --reply-words 20 --image 56x56 --global-batch 2 --steps 3 --profile-step 2
         --micro-batch-tokens 1024)
    rollout=(--model toy --prompts 4 --slots 2 --max-new-tokens 8 --repeats 1 --block-size 16)
    refit=(--model toy --repeats 1)
    grpo=(--model toy --steps 2 --prompts 2 --group 2 --max-response-tokens 8)
else
    loss=(--tokens 4096 16384 65536 --iters 5)
    sft=(--model qwen2_5_vl_3b --samples 16 --reply-words 900 --image 896x672 --global-batch 16 --steps 4
         --profile-step 3 --micro-batch-tokens 4096)  # the H200 baseline's settings (README)
    rollout=(--model qwen2_5_vl_3b --prompts 64 --slots 32 --max-new-tokens 256 --repeats 1 --block-size 256)
    refit=(--model qwen2_5_vl_7b --repeats 2)
    grpo=(--model qwen2_5_vl_3b --steps 3 --prompts 8 --group 8 --max-response-tokens 256 rl.engine=megatron)
fi

run_part() {
    case $1 in
        env) "$py" - "$out/env.json" <<'EOF'
import json, subprocess, sys
import torch, triton
info = {"torch": torch.__version__, "triton": triton.__version__}
try:
    import megatron.core as mc
    info["megatron_core"] = mc.__version__
except ImportError:
    pass
try:
    from importlib.metadata import version
    info["liger_kernel"] = version("liger-kernel")
except Exception:
    pass
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    info["driver"] = smi.stdout.strip() or "unknown"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF
        ;;
        loss) timeout "$(limit 100)" "$py" kernels/bench/bench_grpo_loss.py "${loss[@]}" --json "$out/loss.json" ;;
        sft_local|sft_fused)
            timeout "$(limit 110)" "$py" tools/bench_sft.py "${sft[@]}" --json "$out/$1.json" \
                "backend=${1#sft_}" ${SFT_ARGS:-} ;;
        rollout) timeout "$(limit 70)" "$py" tools/bench_rollout.py "${rollout[@]}" --engines continuous static \
                     --json "$out/rollout.json" ${ROLLOUT_ARGS:-} ;;
        refit) timeout "$(limit 50)" "$py" tools/bench_sync.py "${refit[@]}" --json "$out/refit.json" ;;
        grpo) timeout "$(limit 80)" "$py" tools/bench_rl.py step --json "$out/grpo.json" "${grpo[@]}" ${GRPO_ARGS:-} ;;
        tests) timeout "$(limit 600)" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py ;;
        *) echo "unknown part $1"; return 2 ;;
    esac
}

all="env loss sft_local sft_fused rollout refit grpo"
[ "$dry" = 1 ] || all="$all tests"
for part in ${PARTS:-$all}; do
    start=$(date +%s)
    run_part "$part" > "$out/$part.txt" 2>&1
    echo "gpu_bench: $part: rc $?, $(( $(date +%s) - start )) s" | tee -a "$out/parts.txt"
done
"$py" tools/gpu_bench_report.py "$out"

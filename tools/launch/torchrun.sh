#!/usr/bin/env bash
# One node's share of a (multi-node) job: prints the layout and the memory planner's verdict,
# refuses a world size the layout does not fit, then starts torchrun.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 tools/launch/torchrun.sh megatron_vr1.sft recipe=sft_72b \
#       init_from=ckpt/72b data.train=vision_r1_cold.json checkpoint.dir=runs/sft-72b
#
# Run the same command on every node with its own NODE_RANK. Environment (defaults):
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)  NNODES (1)  NODE_RANK (0)
#   GPUS_PER_NODE (the GPUs torch sees; on a machine with no GPU: processes, default 1)
#   PYTHON (python)  PLAN_CHECK (1; 0 starts even when the planner says the memory does not fit)
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 <entry module, e.g. megatron_vr1.sft or megatron_vr1.rl> [hydra overrides...]" >&2
    exit 2
fi
ENTRY=$1
shift
PYTHON=${PYTHON:-python}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
WORLD=$((NNODES * GPUS_PER_NODE))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

echo "launch: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes per node ($WORLD in all), rendezvous $MASTER_ADDR:$MASTER_PORT"
set +e
"$PYTHON" "$ROOT/tools/plan.py" "entry=$ENTRY" "gpus=$WORLD" "$@"
verdict=$?
set -e
if [[ $verdict -eq 2 ]]; then
    echo "launch: refused: the layout or an option is wrong for $WORLD processes (see the planner above)" >&2
    exit 2
elif [[ $verdict -ne 0 && $verdict -ne 1 ]]; then
    echo "launch: refused: the planner itself failed (exit status $verdict; its output is above), so nothing was checked" >&2
    exit "$verdict"
elif [[ $verdict -ne 0 && "${PLAN_CHECK:-1}" != 0 ]]; then
    echo "launch: refused: the planner says this job does not fit the GPU memory; change the layout or set PLAN_CHECK=0" >&2
    exit 1
fi

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m "$ENTRY" "$@"

"""Memory plan of a training job per rank, before booking GPUs (see megatron_vr1/planning/cli.py).

    python tools/plan.py model=qwen2_5_vl_72b rl=ptst gpus=64
    python tools/plan.py recipe=sft_72b
    python tools/plan.py model=qwen2_5_vl_32b search=true
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_vr1.training import quiet  # noqa: E402,F401  (first: before megatron-core is imported)
from megatron_vr1.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

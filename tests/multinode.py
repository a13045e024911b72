"""Two "nodes" of one process each on this machine: tools/launch/torchrun.sh twice on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_two_nodes(entry: str, overrides: list[str], cwd: Path, timeout: int = 900) -> list[str]:
    """Runs ``entry`` as NNODES=2 x GPUS_PER_NODE=1; returns each node's output (both must exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHON=sys.executable, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), NNODES="2", GPUS_PER_NODE="1")
    nodes = [subprocess.Popen(["bash", str(ROOT / "tools" / "launch" / "torchrun.sh"), entry, *overrides],
                              env=dict(env, NODE_RANK=str(rank)), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{out[-6000:]}"
    return outputs


def launch_refused(entry: str, overrides: list[str], cwd: Path, nnodes: int, per_node: int):
    env = dict(os.environ, PYTHON=sys.executable, NNODES=str(nnodes), GPUS_PER_NODE=str(per_node), NODE_RANK="0")
    return subprocess.run(["bash", str(ROOT / "tools" / "launch" / "torchrun.sh"), entry, *overrides], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)

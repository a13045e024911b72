from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in Triton's interpreter where there is no GPU; it must be chosen before
# anything imports triton. (bf16 arithmetic in the interpreter is only right when cast to fp32,
# which the kernels do on load.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Nothing is downloaded at test time: make any attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def model_parallel_1():
    """megatron-core parallel state for a single CPU process (world size 1, gloo)."""
    from megatron_vr1 import platform

    platform.init_distributed(1, 1)
    yield
    platform.shutdown_distributed()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The offline Qwen tokenizer (Qwen's BPE ranks and special-token ids), built once."""
    from megatron_vr1.data import build_offline_tokenizer

    return build_offline_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from megatron_vr1.data import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory):
    """The toy model's 512-token tokenizer (``conf/model/toy.yaml``), built once."""
    from megatron_vr1.data import build_toy_tokenizer

    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


@pytest.fixture(scope="session")
def args():
    """The tiny model's arguments (``conf/model/tiny.yaml``: Qwen's vocabulary and token ids)."""
    from megatron_vr1.config import load_model_conf, model_from_conf

    return model_from_conf(load_model_conf("tiny"))[0]


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 600) -> None:
    """Launch ``tests/<script>`` on ``nproc`` CPU processes; fail with their output if they fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(TESTS / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")

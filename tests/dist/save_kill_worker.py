"""SIGKILL a ``save_model`` over an existing checkpoint at every step of the save, then load.

One process imports everything once; each save or load runs in a forked child with its own
(gloo, world size 1) process group, so a child can die by SIGKILL at a chosen point while the
parent checks what a fresh reader finds afterwards. Writes a JSON list of the steps to argv[2].
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402

from megatron_vr1 import platform  # noqa: E402
from megatron_vr1.checkpoint import atomic, load_model, megatron_files, save_model  # noqa: E402
from megatron_vr1.models.qwen2_5_vl import ParallelLayout, Qwen25VLArgs, build_model  # noqa: E402
from tiny import tiny_hf_config  # noqa: E402


def _die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(point: str, ckpt: Path) -> None:
    if point == "inside-megatron-save":  # shard files written, megatron's own .metadata not yet
        filesystem_async.FileSystemWriterAsync.finish = _die
    elif point == "before-metadata":
        megatron_files.write_metadata = _die
    elif point == "before-switch":
        megatron_files.replace_dir = _die
    elif point == "between-renames":  # the fallback where the OS cannot exchange two folders
        os.environ["MEGATRON_VR1_NO_RENAME_EXCHANGE"] = "1"
        real = os.rename

        def rename(a, b):  # the old folder is already aside; die before the new one takes its name
            if Path(b) == ckpt and ".incomplete-" in str(a):
                _die()
            real(a, b)
        os.rename = rename
    elif point == "after-switch":  # the new checkpoint is in place, the old one not yet deleted
        real_exchange = atomic._exchange
        atomic._exchange = lambda a, b: real_exchange(a, b) and _die()
    elif point:
        raise ValueError(point)


def _model():
    platform.init_distributed(1, 1)
    return build_model(Qwen25VLArgs.from_hf_config(tiny_hf_config()), ParallelLayout(), backend="local")


def child(ckpt: Path, value: float | None, kill: str) -> None:
    model = _model()
    loaded = None
    if (ckpt.exists() or any(ckpt.parent.glob(f".{ckpt.name}.replaced-*"))):
        load_model(model, ckpt)
        values = {float(p.detach().flatten()[0]) for p in model.parameters()}
        loaded = values.pop() if len(values) == 1 else f"mixed {sorted(values)}"
    (ckpt.parent / "loaded.json").write_text(json.dumps(loaded))
    if value is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        _kill_at(kill, ckpt)
        save_model(model, ckpt, overwrite=True)
    os._exit(0)


def main() -> None:
    ckpt, report = Path(sys.argv[1]), Path(sys.argv[2])
    steps = [(1.0, ""), (2.0, "inside-megatron-save"), (3.0, "before-metadata"), (4.0, "before-switch"),
             (5.0, "between-renames"), (6.0, "after-switch"), (7.0, ""), (None, "")]
    # megatron's writer spawns a manager process for its results queue once per process: start it
    # here, once, rather than in every forked child (proxies reconnect after a fork)
    filesystem_async._get_write_results_queue()
    results = []
    for value, kill in steps:
        (ckpt.parent / "loaded.json").unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:
            try:
                child(ckpt, value, kill)
            except BaseException as e:  # noqa: BLE001
                (ckpt.parent / "loaded.json").write_text(json.dumps(f"error: {type(e).__name__}: {e}"))
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        loaded_file = ckpt.parent / "loaded.json"
        results.append({"value": value, "kill": kill, "killed": killed,
                        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                        "loaded_before": json.loads(loaded_file.read_text()) if loaded_file.exists() else "none",
                        "beside": sorted(p.name for p in ckpt.parent.iterdir() if p.name != "loaded.json")})
    report.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

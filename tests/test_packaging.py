"""The wheel: built from the project, installed alone into a fresh environment, it plans a job and
trains a step with nothing of the checkout on the path (cluster users build containers from wheels)."""

import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_plans_and_trains_from_a_fresh_environment(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("megatron_vr1-*.whl")
    _run([sys.executable, "-m", "venv", str(tmp_path / "venv")], cwd=tmp_path)
    py = tmp_path / "venv" / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    # the third-party packages of this environment, but not its editable megatron_vr1 (a path added
    # by a .pth file has its own .pth files, the editable finder's among them, left unread)
    fresh_site = Path(_run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], cwd=tmp_path).stdout.strip())
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    where = _run([str(py), "-c", "import megatron_vr1, megatron_vr1.kernels, megatron_vr1.planning; "
                                 "from megatron_vr1.config import CONF_DIR; print(megatron_vr1.__file__, CONF_DIR)"],
                 cwd=tmp_path, env=env).stdout
    assert str(fresh_site) in where and str(ROOT) not in where, where

    plan = _run([str(tmp_path / "venv" / "bin" / "megatron-vr1-plan"), "recipe=sft_7b"], cwd=tmp_path, env=env)
    assert "verdict: fits" in plan.stdout
    _run([str(py), "-m", "megatron_vr1.cli.make_demo_data", f"out={tmp_path / 'data'}", "n_sft=4", "n_rl=0",
          "n_eval=0", "kinds=[colour]", "tokenizer=toy"], cwd=tmp_path, env=env)
    sft = _run([str(py), "-m", "megatron_vr1.sft", f"data.train={tmp_path / 'data' / 'sft.json'}",
                f"tokenizer={tmp_path / 'data' / 'tokenizer'}", f"checkpoint.dir={tmp_path / 'run'}", "train.steps=1",
                "train.global_batch_size=4", "train.micro_batch_tokens=1024", "data.max_tokens=1024",
                "data.num_workers=0", "metrics.tensorboard=false"], cwd=tmp_path, env=env)
    assert "sft: done, 1 step" in sft.stdout and (tmp_path / "run" / "iter_0000001" / "megatron_vr1.json").is_file()


def test_a_bare_kernels_import_from_the_checkout_is_hugging_faces_package():
    """``python -m`` from the checkout puts its root on sys.path, where ``kernels/`` would shadow
    Hugging Face's ``kernels``, which transformers imports (a dependency since 5.25)."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import kernels, sys; print(kernels.__file__); print(getattr(kernels, '__version__', ''))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    path, version = out.stdout.split("\n")[:2]
    try:
        installed = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed:
        assert not Path(path).is_relative_to(root / "kernels"), path
    else:
        assert version == "0"

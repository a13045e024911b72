"""Folders that appear complete or not at all: write beside the target, then switch.

:func:`replace_dir` puts a finished folder in place of an existing one. Where the kernel and the
filesystem allow it (Linux ``renameat2(RENAME_EXCHANGE)``; ext4, xfs, btrfs, tmpfs, ...) the two
directory entries are exchanged in one atomic step. Elsewhere (other systems, some network
filesystems) the old folder is renamed aside first; a crash between the two renames leaves it
under a hidden ``.<name>.replaced-<pid>`` name, from which :func:`recover` (called by every
reader) puts it back. Either way a reader finds the old folder or the new one, whole.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (the caller falls back)."""
    if os.environ.get("MEGATRON_VR1_NO_RENAME_EXCHANGE"):  # to exercise the fallback in tests
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` for one of its stand-ins (``incomplete``, ``replaced``)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


def remove(path: Path) -> None:
    """Delete a folder, or only the link where ``path`` is a symlink (never its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def replace_dir(new: Path, out: Path) -> None:
    """Make the complete folder ``new`` be ``out``, replacing whatever ``out`` is (a folder or a
    link to one; the link's target is left alone)."""
    pause = os.environ.get("MEGATRON_VR1_PAUSE_BEFORE_RENAME")  # crash tests: a kill lands before the switch
    if pause:
        time.sleep(float(pause))
    if not (out.exists() or out.is_symlink()):
        os.rename(new, out)
        return
    if _exchange(new, out):
        remove(new)  # the old folder now lives under the temporary name
        return
    old = sibling(out, "replaced")
    os.rename(out, old)
    os.rename(new, out)
    remove(old)


def recover(out: Path) -> None:
    """Put back a folder that a replacement interrupted between its two renames left aside."""
    if out.exists() or out.is_symlink():
        return
    aside = sorted(out.parent.glob(f".{out.name}.replaced-*")) if out.parent.exists() else []
    if aside:
        os.rename(aside[-1], out)


def clear_stale(out: Path, tag: str = "incomplete") -> None:
    """Remove stand-ins of ``out`` that died unfinished (one writer per path at a time)."""
    if out.parent.exists():
        for stale in out.parent.glob(f".{out.name}.{tag}-*"):
            remove(stale)

"""Graceful stop: SIGTERM (a scheduler's preemption, torchrun's shutdown) or Ctrl-C asks the run
to finish its step, save a checkpoint and exit. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from .. import platform


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank gets the same answer)."""
        flag = torch.tensor([int(self.requested)], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

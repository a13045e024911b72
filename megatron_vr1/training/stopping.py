"""Graceful stop: SIGTERM (a scheduler's preemption, torchrun's shutdown) or Ctrl-C asks the run
to finish its step, save a checkpoint and exit with 128 + the signal's number (130 for Ctrl-C,
143 for SIGTERM), as a shell does: ``sft ... && rl ...`` must not go on from a partial run. A
second Ctrl-C stops at once."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from .. import platform


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.signum = 0  # the first signal that asked; after agreed(), the largest over the ranks
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or int(signum)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank gets the same answer, and the
        same :attr:`exit_code`)."""
        flag = torch.tensor([self.signum], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum > 0

    @property
    def exit_code(self) -> int:
        """0 for a run that was not stopped, else 128 + the signal's number."""
        return 128 + self.signum if self.signum else 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

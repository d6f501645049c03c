"""Stop signals: SLURM's warning before a time limit or preemption, and SIGTERM. A handler only
notes the signal; the loop acts on it at the next step boundary, when every rank can save."""

from __future__ import annotations

import signal


class Preempted(Exception):
    """Training stopped on a signal; the job is to be requeued. `saved`: a new checkpoint was
    written (False when the signal came before the first step of this job)."""

    def __init__(self, signum: int, step: int, saved: bool):
        what = "checkpoint saved" if saved else "before its first step, nothing new to save"
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after step {step}; {what}")
        self.signum, self.step, self.saved = signum, step, saved


class _StopRequest:
    """Set by a signal handler at any moment; read by the loop at step boundaries only."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def handler(self, signum, _frame) -> None:
        self.signum = signum

    def install(self, signums) -> None:
        self.signum = None
        for signum in signums:
            self.previous[signum] = signal.signal(signum, self.handler)

    def agreed(self, world_size: int, group) -> int:
        """The stop signal any rank got (0: none), the same on every rank: all of them save, and
        a rank the signal did not reach stops with the same signal."""
        if world_size == 1:
            return self.signum or 0
        import torch
        import torch.distributed as dist

        signum = torch.tensor([self.signum or 0])
        dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=group)
        return int(signum.item())

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()


STOP = _StopRequest()
# SLURM's warning signal before a time limit or preemption (submitit's default, USR2; never
# USR1, which NCCL may take), and SIGTERM, which comes without warning at the end.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

"""What the loop watches between logs: the window of losses, tokens and step times (reduced over
ranks only when logged, so a step never waits for the others), and the run of non-finite losses."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .memory import memory_metrics


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf for too many consecutive steps."""


class NonFinite:
    """Counts consecutive non-finite losses; raises after `limit` of them."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0
        self.last_finite: tuple[int, float] | None = None

    def check(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.count, self.last_finite = 0, (step, loss)
            return
        self.count += 1
        if self.count >= self.limit:
            last = (f"last finite loss {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
                    if self.last_finite else "no finite loss before")
            raise NonFiniteLoss(f"loss is {loss} at step {step}, {self.count} consecutive non-finite steps; {last}")


class Window:
    """Loss, tokens and step time since the last log; reduced over ranks only when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, loss: torch.Tensor, tokens: int, seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self, engine, scheduler) -> dict[str, float]:
        if self.device.type == "cuda":
            waited = time.perf_counter()
            torch.cuda.synchronize(self.device)  # only here, so the step itself never waits
            self.seconds += time.perf_counter() - waited
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.tokens), device=self.device)]).double()
        dist.all_reduce(totals)
        world = dist.get_world_size()
        elapsed = self.seconds
        metrics = {"loss": float(totals[0]) / (self.steps * world), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": float(totals[1]) / elapsed, "step_seconds": elapsed / self.steps}
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if engine.fp16_enabled():
            metrics["loss_scale"] = float(getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", 0.0)))
            metrics["skipped_steps"] = float(engine.skipped_steps)
        metrics.update(memory_metrics(self.device))
        self._reset()
        return metrics

"""Which trial is best: one order, used by the summary table and the MLflow parent alike.

Higher (mode max) or lower (mode min) select metric first; ties go to the lower validation
loss, then to the earlier step of the best validation, then to the smaller trial id.

With repeats, a configuration is chosen, not a trial: by the mean of the select metric over
its seeds that finished (CONFIGURATION_ORDER), and its best seed is the trial whose model
stands for it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional

TIE_ORDER = "ties: lower validation loss, then the earlier step, then the smaller trial id"
CONFIGURATION_ORDER = ("by the mean over a configuration's seeds that finished; one with a seed that did not finish "
                       "ranks after every configuration whose seeds all did, one with none is never chosen; ties: "
                       "lower mean validation loss, then the smaller configuration id")
BY_CONFIGURATION = f"configurations {CONFIGURATION_ORDER}; its model is its best seed's ({TIE_ORDER})"


@dataclass(frozen=True)
class Candidate:
    trial_id: str
    value: Optional[float]
    """The select metric at the trial's best validation."""
    loss: Optional[float] = None
    """Validation loss at that validation."""
    step: Optional[int] = None
    """Step of that validation."""
    configuration: Optional[str] = None
    """With repeats: the configuration the trial is a seed of."""


def _finite(x: Optional[float], worst: float) -> float:
    return x if x is not None and math.isfinite(x) else worst


def best_of(candidates: Iterable[Candidate], mode: str) -> Optional[Candidate]:
    """The best candidate with a finite metric, or None."""
    usable = [c for c in candidates if c.value is not None and math.isfinite(c.value)]
    if not usable:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(usable, key=lambda c: (sign * c.value, _finite(c.loss, math.inf), _finite(c.step, math.inf),
                                      c.trial_id))


@dataclass(frozen=True)
class Configuration:
    """A configuration's seeds that finished with a finite select metric, of `seeds` planned."""

    id: str
    finished: tuple[Candidate, ...]
    seeds: int

    @property
    def mean(self) -> float:
        return statistics.fmean(c.value for c in self.finished)

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation over the seeds; None below two."""
        return statistics.stdev(c.value for c in self.finished) if len(self.finished) > 1 else None

    @property
    def mean_loss(self) -> float:
        losses = [c.loss for c in self.finished if c.loss is not None and math.isfinite(c.loss)]
        return statistics.fmean(losses) if len(losses) == len(self.finished) else math.inf


def configurations(candidates: Iterable[Candidate], seeds: dict[str, int]) -> list[Configuration]:
    """Every configuration in `seeds` (id -> seeds planned), with those of `candidates` (trials
    that finished) that are its seeds and have a finite metric; by id."""
    finished: dict[str, list[Candidate]] = {c: [] for c in seeds}
    for c in candidates:
        if c.configuration in finished and c.value is not None and math.isfinite(c.value):
            finished[c.configuration].append(c)
    return [Configuration(c, tuple(sorted(finished[c], key=lambda x: x.trial_id)), seeds[c]) for c in sorted(seeds)]


def best_configuration(scored: Iterable[Configuration], mode: str) -> Optional[Configuration]:
    """The chosen configuration (CONFIGURATION_ORDER), or None when none has a seed finished."""
    usable = [c for c in scored if c.finished]
    if not usable:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(usable, key=lambda c: (len(c.finished) < c.seeds, sign * c.mean, c.mean_loss, c.id))


def choose(candidates: Iterable[Candidate], mode: str, seeds: dict[str, int]) -> Optional[Candidate]:
    """The best trial: without repeats (`seeds` empty), by best_of; with them, the best seed of
    the best configuration."""
    if not seeds:
        return best_of(candidates, mode)
    chosen = best_configuration(configurations(candidates, seeds), mode)
    return best_of(chosen.finished, mode) if chosen else None

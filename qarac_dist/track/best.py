"""Which trial is best: one order, used by the summary table and the MLflow parent alike.

Higher (mode max) or lower (mode min) select metric first; ties go to the lower validation
loss, then to the earlier step of the best validation, then to the smaller trial id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

TIE_ORDER = "ties: lower validation loss, then the earlier step, then the smaller trial id"


@dataclass(frozen=True)
class Candidate:
    trial_id: str
    value: Optional[float]
    """The select metric at the trial's best validation."""
    loss: Optional[float] = None
    """Validation loss at that validation."""
    step: Optional[int] = None
    """Step of that validation."""


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

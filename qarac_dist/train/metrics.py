"""Validation metrics from gathered predictions (numpy only), and the best-metric tracker."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    scores = []
    for c in np.union1d(labels, preds):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either side is constant or holds a NaN (sorting
    would rank a NaN as the largest value and give a finite, wrong correlation)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom else float("nan")


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss, accuracy and macro F1; all NaN when a logit is not finite (argmax would pick a
    class for a NaN row and score it, and BestTracker never takes NaN as the best)."""
    if not np.isfinite(logits).all():
        return {"loss": float("nan"), "accuracy": float("nan"), "macro_f1": float("nan")}
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    preds = logits.argmax(axis=1)
    return {"loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "accuracy": float((preds == labels).mean()),
            "macro_f1": macro_f1(labels, preds)}


def regression_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"loss": float(np.mean((scores - labels) ** 2)), "spearman": spearman(scores, labels)}


@dataclass
class BestTracker:
    """Which validation was best so far, and how many since then did not improve."""

    metric: str
    mode: str
    min_delta: float = 0.0
    best: Optional[float] = None
    best_step: Optional[int] = None
    bad_validations: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record a validation; True when it is the new best."""
        better = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta)
        if math.isnan(value):
            better = False
        if better:
            self.best, self.best_step, self.bad_validations = value, step, 0
        else:
            self.bad_validations += 1
        return better

    def should_stop(self, patience: Optional[int]) -> bool:
        return patience is not None and self.bad_validations >= patience


"""Validation metrics and the best-checkpoint bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qarac_dist.train.metrics import BestTracker, classification_metrics, macro_f1, spearman


def test_spearman_matches_known_values_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_macro_f1_and_accuracy():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    # F1: class 0 = 2*1/(2+1+1)=0.5, class 1 = 2*2/(4+1+0)=0.8, class 2 = 0
    assert macro_f1(labels, preds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    logits = np.eye(3)[preds] * 5
    m = classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["loss"] > 0


def test_best_tracker_modes_patience_and_min_delta():
    best = BestTracker("accuracy", "max", min_delta=0.01)
    assert best.update(1, 0.5)
    assert not best.update(2, 0.505)  # within min_delta
    assert best.update(3, 0.6)
    assert not best.update(4, 0.55) and not best.update(5, float("nan"))
    assert best.best == 0.6 and best.best_step == 3
    assert best.should_stop(2) and not best.should_stop(3) and not best.should_stop(None)
    low = BestTracker("loss", "min")
    assert low.update(1, 2.0) and low.update(2, 1.0) and not low.update(3, 1.5)

"""Which trial, and with repeats which configuration, a sweep chooses (track/best.py): the
order the summary table and the MLflow parent share."""

from __future__ import annotations

import math

import pytest

from qarac_dist.track.best import Candidate, best_configuration, best_of, choose, configurations


def _seeds(configuration: str, *values, losses=None) -> list[Candidate]:
    losses = losses or [1.0] * len(values)
    return [Candidate(f"{configuration}{k}", v, loss, 10, configuration)
            for k, (v, loss) in enumerate(zip(values, losses))]


def test_the_mean_over_the_seeds_that_finished_and_their_sample_std():
    """A seed that failed has no candidate; one that ended with a NaN metric does not count."""
    scored = {c.id: c for c in configurations([*_seeds("a", 0.5, 0.7), *_seeds("b", 0.6, math.nan, 0.8)],
                                              {"a": 3, "b": 3})}
    assert scored["a"].mean == pytest.approx(0.6) and scored["a"].std == pytest.approx(math.sqrt(0.02))
    assert len(scored["a"].finished) == 2 and scored["a"].seeds == 3
    assert scored["b"].mean == pytest.approx(0.7) and len(scored["b"].finished) == 2
    one = configurations(_seeds("c", 0.9), {"c": 3})[0]
    assert one.mean == 0.9 and one.std is None


def test_the_best_mean_wins_over_the_best_single_seed():
    candidates = [*_seeds("steady", 0.70, 0.71, 0.72), *_seeds("lucky", 0.95, 0.40, 0.45)]
    chosen = choose(candidates, "max", {"steady": 3, "lucky": 3})
    assert chosen.trial_id == "steady2"  # its best seed
    assert best_of(candidates, "max").trial_id == "lucky0"  # what one seed would have picked
    assert choose(candidates, "min", {"steady": 3, "lucky": 3}).configuration == "lucky"


def test_a_configuration_with_a_failed_seed_ranks_after_those_whose_seeds_all_finished():
    candidates = [*_seeds("complete", 0.6, 0.6), *_seeds("missing", 0.9)]
    assert best_configuration(configurations(candidates, {"complete": 2, "missing": 2}), "max").id == "complete"
    assert best_configuration(configurations(_seeds("missing", 0.9), {"complete": 2, "missing": 2}), "max").id == \
        "missing"  # before the others finish, the only one with a result


def test_a_configuration_whose_seeds_all_failed_is_never_chosen():
    assert best_configuration(configurations([], {"a": 3, "b": 3}), "max") is None
    nan = [Candidate("a0", math.nan, 1.0, 1, "a"), Candidate("a1", math.inf, 1.0, 1, "a")]
    assert choose(nan, "max", {"a": 2}) is None
    assert choose([*nan, *_seeds("b", 0.1)], "max", {"a": 2, "b": 1}).configuration == "b"


@pytest.mark.parametrize("a_losses, b_losses, expected", [
    pytest.param([0.5, 0.5], [0.4, 0.4], "b", id="lower-mean-loss"),
    pytest.param([0.5, 0.5], [0.5, 0.5], "a", id="then-the-smaller-id"),
    pytest.param([0.5, math.nan], [0.9, 0.9], "b", id="a-missing-loss-is-worst"),
])
def test_ties_of_the_mean(a_losses, b_losses, expected):
    candidates = [*_seeds("a", 0.6, 0.8, losses=a_losses), *_seeds("b", 0.7, 0.7, losses=b_losses)]
    assert best_configuration(configurations(candidates, {"a": 2, "b": 2}), "max").id == expected


def test_without_repeats_the_order_is_the_trials_own():
    candidates = [Candidate("x", 0.5, 0.3, 4), Candidate("y", 0.5, 0.3, 2)]
    assert choose(candidates, "max", {}) == best_of(candidates, "max") == candidates[1]

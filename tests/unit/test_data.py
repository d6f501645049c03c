"""The generated set, the step planner and the collator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qarac_dist.config.sections import SyntheticConfig
from qarac_dist.train.batches import Collator, StepBatches
from qarac_dist.train.synthetic import generate_synthetic


def _docs(directory, split="train"):
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]


def test_generated_set_is_deterministic_and_evidence_only_after_the_cut(tmp_path):
    spec = SyntheticConfig(num_train=200, num_validation=10, min_tokens=300, max_tokens=600, evidence_after=128,
                           num_classes=3, seed=7)
    generate_synthetic(spec, tmp_path / "a")
    generate_synthetic(spec, tmp_path / "b")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    docs = _docs(tmp_path / "a")
    words_by_label = {c: set() for c in range(3)}
    for doc in docs:
        words = doc["text"].split()
        assert 300 <= len(words) <= 600
        words_by_label[doc["label"]].update(words[128:])
    head_words = set().union(*(set(d["text"].split()[:128]) for d in docs))
    # Words that appear after the cut for exactly one label are that label's evidence...
    evidence = [(words_by_label[c] - set().union(*(words_by_label[o] for o in range(3) if o != c))) for c in range(3)]
    assert all(len(e) >= 15 for e in evidence)
    # ...and none of them ever appears in the first 128 words of any document.
    assert not head_words & set().union(*evidence)
    assert {d["label"] for d in docs} == {0, 1, 2}


def _batches(micro, accumulation, world, rank, lengths, seed=0):
    return StepBatches(lengths, micro, accumulation, world, rank, seed)


def test_accumulation_sees_the_same_examples_as_a_big_micro_batch():
    lengths = np.random.default_rng(0).integers(10, 500, size=200)
    big = _batches(8, 1, 1, 0, lengths).iterate()
    small = _batches(2, 4, 1, 0, lengths).iterate()
    for _ in range(60):  # crosses an epoch boundary (25 steps per epoch)
        (b,) = next(big)
        assert sorted(b) == sorted(np.concatenate(next(small)))


def test_ranks_split_each_step_and_cover_the_epoch_once():
    lengths = np.random.default_rng(1).integers(10, 500, size=103)
    planners = [_batches(4, 2, 2, rank, lengths) for rank in (0, 1)]
    steps = planners[0].steps_per_epoch
    assert steps == 103 // 16
    seen = []
    for rank_steps in zip(*(p.iterate() for p in planners)):
        for micro_batches in rank_steps:
            seen.extend(np.concatenate(micro_batches))
        if len(seen) == steps * 16:
            break
    assert len(seen) == len(set(seen)) == steps * 16


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(2).integers(100, 4000, size=2000)

    def padded_tokens(group):
        planner = StepBatches(lengths, 8, 1, 1, 0, seed=0, group_by_length=group)
        return sum(len(b) * lengths[b].max() for (b,) in planner.epoch_steps(0)[:, None, :])

    assert padded_tokens(True) < 0.6 * padded_tokens(False)


def test_resume_position_continues_the_same_sequence():
    lengths = np.arange(50) + 10
    full = _batches(2, 1, 1, 0, lengths).iterate()
    expected = [next(full)[0].tolist() for _ in range(40)]
    resumed = _batches(2, 1, 1, 0, lengths).iterate(start_step=33)
    assert [next(resumed)[0].tolist() for _ in range(7)] == expected[33:]


def test_too_small_a_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="training.micro_batch_size: a step needs 32 examples"):
        _batches(8, 2, 2, 0, np.arange(20))


def test_collator_pads_to_the_window_and_marks_the_first_token_global():
    rows = {"input_ids": [[2, 5, 6, 3], [2, 7, 3]], "labels": [1, 0]}
    batch = Collator(pad_token_id=0, pad_multiple=32, global_first_token=True)(rows)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [4, 3]
    assert batch["global_attention_mask"][:, 0].tolist() == [1, 1]
    assert batch["global_attention_mask"].sum() == 2
    assert batch["labels"].tolist() == [1, 0]


def test_another_world_size_with_the_same_step_sees_the_same_examples_per_step():
    """A resume on 1 rank of a 2-rank checkpoint (allowed when micro x accumulation x ranks is
    unchanged) goes on with the same examples in each step, so each epoch's once."""
    lengths = np.random.default_rng(2).integers(10, 500, size=90)
    two = [_batches(4, 1, 2, rank, lengths).iterate(start_step=7) for rank in (0, 1)]
    one = _batches(4, 2, 1, 0, lengths).iterate(start_step=7)
    for _ in range(25):  # crosses an epoch boundary (11 steps per epoch)
        assert sorted(np.concatenate([m for it in two for m in next(it)])) == sorted(np.concatenate(next(one)))

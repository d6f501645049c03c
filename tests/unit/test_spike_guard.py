"""training.spikes' decisions, one rank: what is a spike, where a rollback sends the data, what a
resumed job takes from the checkpoint and from rollbacks.json (the jobs themselves:
tests/integration/test_spikes.py)."""

from __future__ import annotations

import json
import math
import signal

import pytest

from qarac_dist.base.files import DamagedFile
from qarac_dist.config.sections import SpikesConfig
from qarac_dist.track.trial_dir import ROLLBACK, MetricsFile, TrialDir, read_metrics
from qarac_dist.train import faults
from qarac_dist.train.spikes import History, SpikeGuard


def _guard(**cfg) -> SpikeGuard:
    return SpikeGuard(SpikesConfig(**{"window": 8, **cfg}), rank=0, world_size=1)


def _warm(guard: SpikeGuard, losses, norm=None) -> None:
    for step, loss in enumerate(losses, 1):
        assert guard.check(step, step - 1, loss, norm) == (None, False)


def test_z_waits_for_half_a_window_and_non_finite_values_always_count():
    history = History(8, min_ratio=1.0)
    history.values.extend([1.0, 2.0, 1.0])
    assert history.z(100.0) == 0.0  # 3 of 8: too few to judge
    assert history.z(math.nan) == math.inf and history.z(-math.inf) == math.inf
    history.values.append(2.0)  # mean 1.5, deviation 0.5
    assert history.z(3.0) == pytest.approx(3.0)
    assert history.z(1.0) == 0.0  # below the mean: never a spike


def test_a_nearly_constant_window_does_not_make_ordinary_noise_a_spike():
    """The plateau at ln 2 before a classifier learns: a deviation of 1e-4 makes 0.74 a 400-sigma
    event, but it is not 1.5 times the mean."""
    guard = _guard()
    _warm(guard, [0.6931 + 1e-4 * (-1) ** i for i in range(8)])
    assert guard.check(9, 8, 0.74, None) == (None, False)
    spike, stop = guard.check(10, 9, 69.3, None, stopping=signal.SIGUSR2)
    assert stop == signal.SIGUSR2  # the stop signal travels in the same gather
    assert (spike.what, spike.step, spike.position, spike.rank) == ("loss", 10, 9, 0) and spike.z > 6


def test_a_spike_stays_out_of_the_window_and_a_gradient_norm_spike_counts_too():
    guard = _guard(grad_norm=True)
    _warm(guard, [1.0, 1.1] * 4, norm=1.0)
    assert guard.check(9, 8, 50.0, 1.0)[0] is not None
    assert 50.0 not in guard.losses.values
    spike, _ = guard.check(9, 8, 1.0, math.nan)
    assert (spike.what, spike.z) == ("grad_norm", math.inf)
    assert "grad_norm nan on rank 0" == spike.describe()
    assert _guard().check(1, 0, 1.0, math.inf)[0] is None  # not watched: the default
    assert guard.check(9, 8, 1.05, None)[0] is None  # a step without a norm (fp16 overflow) is judged by its loss


def test_a_rollback_moves_the_data_past_the_spike_by_the_margin():
    guard = _guard(margin=2, max_rollbacks=2)
    _warm(guard, [1.0, 1.1] * 4)
    spike, _ = guard.check(23, 22, math.nan, None)
    rollback = guard.rolled_back(spike, to_step=20, offset=0)
    # Step 21 now takes position 25: positions 20-24 (3 trained and undone, the spike's, 2 more) are skipped.
    assert (rollback["offset"], rollback["skipped"], rollback["value"], rollback["z"]) == (5, 5, "nan", None)
    assert "rolled back to step 20, skipping 5 batches (data positions 20-24); rollback 1 of 2" in \
        guard.line(spike, rollback)
    second = guard.rolled_back(guard.check(22, 26, math.inf, None)[0], to_step=20, offset=5)  # the same checkpoint
    assert (second["offset"], second["skipped"], second["rollback"]) == (9, 4, 2)
    assert "after 2 rollback(s)" in guard.exhausted(spike)
    assert _guard(max_rollbacks=3).exhausted(spike) is None


def test_the_learning_rate_cut_counts_from_the_checkpoint_gone_back_to():
    guard = _guard(lr_factor=0.25, lr_steps=3)
    assert guard.lr_factor(21) == 1.0
    guard.rolled_back(guard.check(23, 22, math.nan, None)[0], to_step=20, offset=0)
    assert [guard.lr_factor(s) for s in range(20, 26)] == [1.0, 0.25, 0.25, 0.25, 1.0, 1.0]
    assert _guard(lr_steps=3).lr_factor(21) == 1.0  # factor 1: no cut


@pytest.mark.parametrize("saved, record, offset, rollbacks", [
    ((0, 0), [], 0, 0),  # no rollback ever
    ((1, 5), [{"to_step": 20, "offset": 5}], 5, 1),  # the checkpoint was saved after the rollback
    ((0, 0), [{"to_step": 20, "offset": 5}], 5, 1),  # killed in the skip window: resumed from step 20
    ((1, 5), [{"to_step": 20, "offset": 5}, {"to_step": 30, "offset": 12}], 12, 2),
], ids=["none", "saved-after", "killed-in-window", "second-after-checkpoint"])
def test_a_resumed_job_takes_the_offset_of_rollbacks_made_after_its_checkpoint(saved, record, offset, rollbacks):
    guard = _guard(lr_factor=0.5, lr_steps=2)
    assert guard.reconcile(saved[0], saved[1], record) == offset
    assert guard.rollbacks == rollbacks
    assert guard.lr_factor(record[-1]["to_step"] + 1 if record else 1) == (0.5 if record else 1.0)


def test_rollbacks_json_and_the_rows_a_rollback_keeps(tmp_path):
    trial = TrialDir(tmp_path)
    assert trial.rollbacks() == []
    trial.add_rollback({"rollback": 1, "to_step": 20, "offset": 5})
    trial.add_rollback({"rollback": 2, "to_step": 20, "offset": 9})
    assert [r["offset"] for r in trial.rollbacks()] == [5, 9]

    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 24):
        metrics.log(step, {"loss": 1.0})
    metrics.rewind(20)
    metrics.log(23, {ROLLBACK: 1})
    metrics.log(21, {"loss": 0.5})
    metrics.close()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [*range(1, 21), 23, 21]
    MetricsFile(tmp_path / "metrics.jsonl", keep_through_step=20).close()  # a resume from step 20
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [*range(1, 21), 23]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 23, ROLLBACK: 1}


@pytest.mark.parametrize("content, expected", [
    ('{"rollbacks": [', "not valid JSON"),
    ("", "empty"),
    ("[]", "expected a JSON object, got list"),
    ('{"rollbacks": {"to_step": 1}}', "not a record of rollbacks"),
    ('{"rollbacks": [{"to_step": 20}]}', "not a record of rollbacks"),
    ('{"rollbacks": [{"to_step": "20", "offset": 5}]}', "not a record of rollbacks"),
    ('{"rollbacks": [{"to_step": 20, "offset": 5.5}]}', "not a record of rollbacks"),
    ('{"rollbacks": [{"to_step": true, "offset": 5}]}', "not a record of rollbacks"),
], ids=["cut", "empty", "a-list", "not-a-list", "no-offset", "step-as-text", "offset-fraction", "bool-step"])
def test_a_damaged_rollbacks_json_is_one_line_naming_it(tmp_path, content, expected):
    """A job cannot resume past skipped data it cannot read: it fails with this line."""
    trial = TrialDir(tmp_path)
    trial.rollbacks_file.write_text(content)
    with pytest.raises(DamagedFile) as err:
        trial.rollbacks()
    assert str(trial.rollbacks_file) in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_fault_entries_name_a_point_a_number_and_a_rank(monkeypatch):
    monkeypatch.setenv("QARAC_FAULT", "loss-nan:5:1,loss-x100:6:*,drop:7:*,bad-entry")
    assert math.isnan(faults.loss_factor(5, 1)) and faults.loss_factor(5, 0) == 1.0
    assert faults.loss_factor(6, 0) == faults.loss_factor(6, 3) == 100.0
    assert faults.dropped(7) and not faults.dropped(5)
    monkeypatch.delenv("QARAC_FAULT")
    assert faults.loss_factor(5, 1) == 1.0


def test_status_shows_a_trials_rollbacks(tmp_path):
    from qarac_dist.submit.report import rows
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    record = TrialRecord("t1", "x", {}, {}, str(tmp_path / "trials" / "t1"), "local", state="COMPLETED", attempt=1)
    manifest = Manifest("s", "local", "accuracy", "max", trials={"t1": record})
    assert rows(manifest)[0][0].cells()[2] == "COMPLETED"
    trial = TrialDir(record.trial_dir.path)
    trial.add_rollback({"rollback": 1, "to_step": 10, "offset": 3})
    trial.add_rollback({"rollback": 2, "to_step": 10, "offset": 6})
    assert rows(manifest)[0][0].cells()[2] == "COMPLETED [2 rollbacks]"
    trial.rollbacks_file.write_text("{")  # damaged: the trial's job says so; status still shows the trial
    assert rows(manifest)[0][0].cells()[2] == "COMPLETED"

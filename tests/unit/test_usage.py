"""What a sweep used (track/usage.py, submit/cluster.py's sacct): the clocks jobs keep, killed
at any moment, damaged files, their sums by state and packing's idle slots, and what sacct
charged where SLURM keeps accounting."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import cluster
from qarac_dist.submit.report import usage_of
from qarac_dist.submit.sweep_dir import Manifest, TrialRecord
from qarac_dist.track import usage
from support import fake_commands, wait_for


def _write(path, *entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"jobs": list(entries)}))
    return path


def _entry(job, start, seconds, gpus=1, cpus=2, **more):
    return {"job": job, "start": start, "seen": start + seconds, "gpus": gpus, "cpus": cpus, **more}


def test_hours_are_split_by_the_trials_states_and_a_packed_job_idle_slots(tmp_path):
    """Two packed trials as steps of job 7_0 (2 GPUs, 4 cores for 100 s), a pruned trial in its
    own requeued job (two runs), a failed one: each group holds its own seconds, and the job's
    idle slots are its allocation less its steps'."""
    done = _write(tmp_path / "a.json", _entry("7_0.0", 1000, 60))
    lost = _write(tmp_path / "b.json", _entry("7_0.1", 1000, 30))
    pruned = _write(tmp_path / "c.json", _entry("8_1", 1000, 10), _entry("8_1", 2000, 20))
    failed = _write(tmp_path / "d.json", _entry("9", 1000, 5, gpus=0, cpus=1))
    # a trial whose first attempt failed (its hours stay failed) and whose second completed
    again = _write(tmp_path / "e.json", _entry("10", 1000, 7, attempt=1), _entry("11", 2000, 3, attempt=2))
    job = _write(tmp_path / "usage" / "7_0.json", _entry("7_0", 995, 100, gpus=2, cpus=4))
    u = usage.used([(done, {}, "COMPLETED"), (lost, {}, "LOST"), (pruned, {}, "PRUNED"), (failed, {}, "FAILED"),
                    (tmp_path / "never.json", {}, "PENDING"), (again, {1: "FAILED", 2: "COMPLETED"}, "COMPLETED")],
                   [job])
    assert u.gpu_s == {"completed": 60 + 3, "failed": 30 + 7, "pruned": 30, "idle": 200 - 90}
    assert u.cpu_s == {"completed": 120 + 6, "failed": 60 + 5 + 14, "pruned": 60, "idle": 400 - 180}
    metrics = u.metrics()
    assert math.isclose(metrics["gpu_hours"], 240 / 3600) and math.isclose(metrics["cpu_hours_idle"], 220 / 3600)
    assert metrics["gpu_hours_running"] == 0 and "gpu_hours_trial_clocks" not in metrics


@pytest.mark.parametrize("text", [
    "",  # empty
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 1, "cpus"',  # cut short
    "[1, 2, 3]",  # not a mapping
    '{"jobs": {"job": "1"}}',  # jobs not a list
    '{"jobs": [1, "x", null]}',  # entries not mappings
    '{"jobs": [{"job": "1", "start": NaN, "seen": 10, "gpus": 1, "cpus": 1}]}',  # NaN
    '{"jobs": [{"job": "1", "start": 0, "seen": Infinity, "gpus": 1, "cpus": 1}]}',  # infinite
    '{"jobs": [{"job": "1", "start": 10, "seen": 0, "gpus": 1, "cpus": 1}]}',  # seen before start
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": true, "cpus": 1}]}',  # a bool for a count
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": -1, "cpus": 1}]}',  # negative
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 1.5, "cpus": 1}]}',  # a fraction of a GPU
    '{"jobs": [{"job": 1, "start": 0, "seen": 10, "gpus": 1, "cpus": 1}]}',  # a number for the job
    '{"jobs": [{"job": "1", "start": "0", "seen": 10, "gpus": 1, "cpus": 1}]}',  # a string for a time
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 1, "cpus": 1, "attempt": [1]}]}',  # unhashable
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 1, "cpus": 1, "attempt": "1"}]}',  # a string attempt
    '{"jobs": [{"job": "1", "start": 0, "seen": 1e308, "gpus": 1, "cpus": 1}]}',  # no job runs for ever
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 9999999999999, "cpus": 1}]}',  # nor holds that many
    "\x00" * 64,  # NFS zeros
])
def test_a_damaged_or_foreign_usage_file_counts_nothing_and_never_stops_a_sum(tmp_path, text):
    path = tmp_path / "usage.json"
    path.write_text(text)
    good = _write(tmp_path / "good.json", _entry("2", 0, 36))
    u = usage.used([(path, {}, "COMPLETED"), (good, {}, "COMPLETED")], [path])
    assert u.gpu_s == {"completed": 36, "idle": 0} and usage.entries(path) == []


_CLOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qarac_dist.track import usage
    usage.BEAT_S = 0.05
    clock = usage.Clock(Path(sys.argv[1]), sys.argv[2], 1, 2).start()
    if sys.argv[3] == "stop":
        clock.stop()
    else:
        time.sleep(600)
""")


def _clock(path, job, how):
    return subprocess.Popen([sys.executable, "-c", _CLOCK, str(path), job, how])


def test_a_clock_killed_without_a_word_counts_to_its_last_beat_and_the_next_keeps_it(tmp_path):
    """A job SIGKILLed: its entry stays, not ended, seen within a beat of the kill; the next job
    (a requeue) adds its own entry beside it, and ends it."""
    path = tmp_path / "trial" / "usage.json"
    proc = _clock(path, "5_0", "sleep")
    first = wait_for(lambda: [e for e in usage.entries(path) if e["seen"] - e["start"] > 0.3] or None, 120,
                     "the clock to beat")[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed,) = usage.entries(path)
    assert not killed.get("ended") and killed["start"] == first["start"] and killed["seen"] >= first["seen"]
    assert _clock(path, "5_0", "stop").wait(timeout=120) == 0
    before, after = usage.entries(path)
    assert before == killed and after["ended"] and after["start"] > killed["start"]
    assert (after["gpus"], after["cpus"], after["job"]) == (1, 2, "5_0")


def test_a_damaged_usage_file_is_kept_aside_and_the_clock_starts_a_new_one(tmp_path):
    path = tmp_path / "usage.json"
    path.write_text('{"jobs": [{"job"')
    assert _clock(path, "6", "stop").wait(timeout=120) == 0
    assert (tmp_path / "usage.json.damaged").read_text() == '{"jobs": [{"job"'
    (entry,) = usage.entries(path)
    assert entry["ended"] and entry["job"] == "6"


def test_a_clock_that_cannot_write_never_stops_its_job(tmp_path):
    """A trial directory it cannot write (here: a file where the folder should be; a lost mount,
    a full quota): the job goes on, with no record."""
    (tmp_path / "trial").write_text("not a folder")
    clock = usage.Clock(tmp_path / "trial" / "usage.json", "1", 0, 1).start()
    clock.stop()
    assert clock.entry["ended"] and usage.entries(tmp_path / "trial" / "usage.json") == []


SACCT = """\
41_0|120|billing=2,cpu=2,gres/gpu=1,mem=4G,node=1
41_0|30|billing=2,cpu=2,gres/gpu=1,mem=4G,node=1
41_1|60|cpu=4,gres/gpu:a100=2,mem=8G,node=1
41_[2-3]|0|
42|10|cpu=1,mem=1G,node=1
43|x|cpu=1
not a line
"""


def test_sacct_charges_every_run_of_each_job_and_says_nothing_where_it_misses_one():
    """A requeued task twice (--duplicates), typed GPUs, pending tasks and foreign lines passed
    over; a job sacct does not know: no figure, the clocks stand."""
    assert cluster.charged(SACCT, {"41_0", "41_1", "42"}) == (150 * 1 + 60 * 2, 150 * 2 + 60 * 4 + 10)
    assert cluster.charged(SACCT, {"41_0", "44"}) is None
    assert cluster.charged("", {"41_0"}) is None


def test_where_sacct_answers_it_is_the_total_and_what_no_clock_saw_is_outside(tmp_path, monkeypatch):
    layout = SweepLayout(tmp_path / "sweep")
    trial = TrialRecord("t1", "lr=1", [], {}, str(layout.trial("t1")), "slurm", state="COMPLETED", job_ids=["41_0"])
    _write(trial.trial_dir.usage_file, _entry("41_0", 1000, 100, gpus=1, cpus=2))
    manifest = Manifest("s", "slurm", "loss", "min", trials={"t1": trial})
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="echo '41_0|120|cpu=2,gres/gpu=1'"))
    u = usage_of(manifest, layout)
    assert u.source == "sacct" and u.gpu_s == {"completed": 100, "outside": 20} and u.clocks.gpu_s == {"completed": 100}
    assert math.isclose(u.metrics()["gpu_hours_trial_clocks"], 100 / 3600)
    line = usage.summary_line(u, {"gpu_hours": 1.0})
    assert "used 0.033 GPU-hours of at most 1.000 requested" in line and "the trials' clocks say 0.028" in line
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="echo 'accounting storage is disabled' >&2; exit 1"))
    assert usage_of(manifest, layout).source == "the trials' clocks"

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
import time

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import cluster
from qarac_dist.submit.report import group_of, usage_of
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
    never = tmp_path / "never.json"
    # a trial whose first attempt failed (its hours stay failed) and whose second completed
    again = _write(tmp_path / "e.json", _entry("10", 1000, 7, attempt=1), _entry("11", 2000, 3, attempt=2))
    job = _write(tmp_path / "usage" / "7_0.json", _entry("7_0", 995, 100, gpus=2, cpus=4))
    trials = [(done, "COMPLETED"), (lost, "LOST"), (pruned, "PRUNED"), (failed, "FAILED"), (never, "PENDING")]
    u = usage.used([(path, {}, group_of(state)) for path, state in trials] +
                   [(again, {1: group_of("FAILED"), 2: group_of("COMPLETED")}, "completed")], [job])
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
    '{"jobs": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nested past Python's stack
    '{"jobs": [{"job": "1", "start": 0, "seen": 10, "gpus": 1' + "0" * 400 + ', "cpus": 1}]}',  # no float holds it
])
def test_a_damaged_or_foreign_usage_file_counts_nothing_and_never_stops_a_sum(tmp_path, text):
    path = tmp_path / "usage.json"
    path.write_text(text)
    good = _write(tmp_path / "good.json", _entry("2", 0, 36))
    u = usage.used([(path, {}, "completed"), (good, {}, "completed")], [path])
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


def test_a_clock_starts_when_its_process_began_never_before():
    """SLURM's allocation contains its processes: a clock that starts a second early (psutil's
    create_time, from the boot time in whole seconds) counted more than SLURM held in CI."""
    for _ in range(3):
        before = time.time()
        began = float(subprocess.run([sys.executable, "-c", "from qarac_dist.track.usage import _process_start;"
                                      "import time; print(_process_start()); assert _process_start() < time.time()"],
                                     capture_output=True, text=True, check=True).stdout)
        assert before - 0.02 <= began <= time.time()


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


def test_a_clock_on_a_file_nested_past_pythons_stack_keeps_it_aside(tmp_path):
    path = tmp_path / "usage.json"
    path.write_text('{"jobs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert _clock(path, "7", "stop").wait(timeout=120) == 0
    assert (tmp_path / "usage.json.damaged").exists() and usage.entries(path)[0]["job"] == "7"


def test_the_close_waits_for_a_beating_clock_to_end_never_for_a_killed_one(tmp_path):
    """settle(): a runner killed without a word stopped beating: no wait; a live one that ends
    a moment later: waited for."""
    import time

    stale = _write(tmp_path / "killed.json", _entry("1", time.time() - 300, 200))
    started = time.monotonic()
    usage.settle([stale], timeout_s=60)
    assert time.monotonic() - started < 5
    live = tmp_path / "live.json"
    proc = subprocess.Popen([sys.executable, "-c", _CLOCK.replace("clock.stop()", "time.sleep(2); clock.stop()"),
                             str(live), "2", "stop"])
    wait_for(lambda: usage.entries(live), 60, "the clock to start")
    usage.settle([live], timeout_s=120)
    assert usage.entries(live)[0]["ended"]
    proc.wait(timeout=60)


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
    assert cluster.charged("41_0|120|cpu=2,node=1", {"41_0"}) == (None, 240)  # no GPUs kept: no GPU figure


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
    # Accounting that keeps no GPUs (AccountingStorageTRES without gres/gpu): sacct for CPUs only.
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="echo '41_0|120|cpu=2,node=1,billing=2'"))
    u = usage_of(manifest, layout)
    assert u.gpu_s == {"completed": 100} and u.cpu_s == {"completed": 200, "outside": 40}
    assert u.source == "sacct for CPUs, the trials' clocks for GPUs (sacct keeps none)"
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="echo 'accounting storage is disabled' >&2; exit 1"))
    assert usage_of(manifest, layout).source == "the trials' clocks"



def test_the_retrainings_hours_are_the_sweeps_and_sacct_charges_their_jobs(tmp_path, monkeypatch):
    """final.retrain: the chosen configuration trained again used hours the sweep must own."""
    from qarac_dist.track.trial_dir import TrialDir

    layout = SweepLayout(tmp_path / "sweep")
    trial = TrialRecord("t1", "lr=1", [], {}, str(layout.trial("t1")), "slurm", state="COMPLETED", job_ids=["41_0"])
    _write(trial.trial_dir.usage_file, _entry("41_0", 1000, 100, gpus=1, cpus=2))
    _write(TrialDir(layout.retrained("t1", 8)).usage_file, _entry("43_0", 2000, 30, gpus=1, cpus=2),
           _entry("43_0", 3000, 10, gpus=1, cpus=2))  # stopped by SLURM's warning, requeued
    manifest = Manifest("s", "slurm", "loss", "min", trials={"t1": trial}, final_job={"id": "44", "retrain": ["43_0"]})
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="echo '41_0|120|cpu=2,gres/gpu=1'; "
                                                                        "echo '43_0|50|cpu=2,gres/gpu=1'"))
    u = usage_of(manifest, layout)
    assert u.clocks.gpu_s == {"completed": 100, "retraining": 40} and u.gpu_s["outside"] == 170 - 140
    assert "trained again for the test split 0.011" in usage.summary_line(u.clocks, {})


@pytest.mark.parametrize("state, group", [("COMPLETED", "completed"), ("PRUNED", "pruned"), ("FAILED", "failed"),
                                          ("LOST", "failed"), ("CANCELLED", "failed"), ("TIMEOUT", "failed"),
                                          ("PREEMPTED", "stopped"), ("PENDING", "running"), ("RUNNING", "running"),
                                          ("QUEUED", "running"), ("REQUEUED", "running"), ("COMPLETING", "running"),
                                          (None, "failed")])
def test_each_state_s_hours_go_to_one_group(state, group):
    assert group_of(state) == group and group in usage.GROUPS


def test_a_sweep_that_used_nothing_says_so_in_one_well_formed_line():
    assert usage.summary_line(usage.Used(), {}) == "used 0.000 CPU-hours (none; by the trials' clocks), 0.000 GPU-hours"


def test_the_requested_bound_grows_only_with_what_was_submitted(tmp_path):
    """sbatch refused the jobs (an overloaded controller): nothing was submitted, nothing is
    added to the bound; once it takes them, their whole time limits are."""
    import dataclasses

    from qarac_dist.config.sweep import Resources
    from qarac_dist.submit.submission import submit_records

    class Refusing:
        resources, steps, kind, max_requeues, submitted = Resources(gpus_per_node=2, time_min=30), False, "slurm", 0, 0

        def submit(self, jobs):
            if not self.submitted:
                self.submitted = 1
                raise RuntimeError("sbatch: error: Socket timed out on send/recv operation")
            return [dataclasses.make_dataclass("Job", ["job_id"])(f"9_{i}") for i, _ in enumerate(jobs)]

    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir()
    record = TrialRecord("t1", "lr=1", {}, {"name": "t"}, str(layout.trial("t1")), "slurm")
    manifest = Manifest("s", "slurm", "loss", "min", trials={"t1": record})
    executor = Refusing()
    with pytest.raises(RuntimeError):
        submit_records(manifest, layout, executor, [record])
    assert manifest.requested == {} and Manifest.load(layout.root).requested == {}
    submit_records(manifest, layout, executor, [record])
    assert Manifest.load(layout.root).requested == {"gpu_hours": 1.0, "cpu_hours": 0.5}

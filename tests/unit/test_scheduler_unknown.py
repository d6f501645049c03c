"""Unknown is not dead: what the scheduler's failures mean to the sweep, with fake `squeue`
scripts on PATH (real processes, the only part faked is the controller's answer).

One "Socket timed out on send/recv operation" made every live job look gone: a runner took
over trials that were running, and a re-run resubmitted them. Now a failed or hung squeue is
SchedulerUnavailable, a job it did not list is never taken for gone, and whoever asked waits
(doubling) before asking again.
"""

from __future__ import annotations

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import claims, cluster
from qarac_dist.submit.executors import SlurmArrays
from qarac_dist.config.sweep import Resources
from support import fake_commands

TIMEOUT = "slurm_load_jobs error: Socket timed out on send/recv operation"


def _fake_squeue(tmp_path, monkeypatch, body: str) -> None:
    """`squeue` (and a `sacct` of a cluster without accounting) on PATH ahead of the real ones."""
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", squeue=body, sacct="exit 1"))


# (id, the fake squeue's body, expected: a dict of states, or the error's fragment)
ANSWERS = [
    ("running", 'echo "77_0|RUNNING"; echo "77_1|PENDING"', {"77_0": "RUNNING", "77_1": "PENDING"}),
    ("array-line", 'echo "77_[1-2]|PENDING"', {"77_1": "PENDING"}),
    ("purged-job", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1', {}),
    ("socket-timeout", f'echo "{TIMEOUT}" >&2; exit 1', f"squeue failed ({TIMEOUT})"),
    ("no-words", "exit 1", "squeue failed (exit code 1)"),
    ("killed", "kill -9 $$", "squeue failed (exit code -9)"),
    ("hangs", "sleep 30", "squeue did not answer (TimeoutExpired"),
]


@pytest.mark.parametrize("body, expected", [pytest.param(*case[1:], id=case[0]) for case in ANSWERS])
def test_a_failed_or_hung_squeue_is_unknown_never_gone(tmp_path, monkeypatch, body, expected):
    _fake_squeue(tmp_path, monkeypatch, body)
    monkeypatch.setattr(cluster, "SQUEUE_TIMEOUT_S", 1)
    if isinstance(expected, dict):
        assert cluster.job_states(["77_0", "77_1"]) == expected
        return
    with pytest.raises(cluster.SchedulerUnavailable) as err:
        cluster.job_states(["77_0", "77_1"])
    assert expected in str(err.value) and "unknown" in str(err.value) and err.value.exit_code == 75


def test_a_runner_never_takes_over_a_trial_whose_job_it_cannot_see(tmp_path, monkeypatch, capsys):
    """The claim of another job stays its own while squeue fails; the runner asks again only
    after a wait, and takes the trial over once squeue says that job is gone."""
    layout = SweepLayout(tmp_path / "sweep")
    assert claims.take(layout, "55_0", [("t1", 1)], set(), lambda _job: True) == ("t1", 1)
    now = [0.0]
    alive = cluster.Patience(SlurmArrays(tmp_path, Resources(), "s", 0).alive, unknown=True, clock=lambda: now[0])
    _fake_squeue(tmp_path, monkeypatch, f'echo "{TIMEOUT}" >&2; exit 1')
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) is None
    assert "asking again in 5 s" in capsys.readouterr().err
    _fake_squeue(tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    now[0] = 4.0  # within the wait: squeue is not asked, the job counts as alive
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) is None
    now[0] = 6.0
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) == ("t1", 1)
    assert claims.read(layout)["t1"].job == "56_0"


def test_patience_doubles_its_wait_up_to_five_minutes():
    now = [0.0]

    def fails():
        raise cluster.SchedulerUnavailable("squeue failed (x)")

    ask = cluster.Patience(fails, unknown="?", clock=lambda: now[0])
    waits = []
    for _ in range(9):
        assert ask() == "?"
        waits.append(ask.wait_s)
        now[0] += ask.wait_s
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_a_hung_or_missing_sacct_is_passed_over(tmp_path, monkeypatch):
    """sacct only adds jobs squeue forgot: one that hangs (a slurmdbd that does not answer) gave
    a traceback after 60 s."""
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sacct="sleep 30", squeue='echo "77_0|RUNNING"'))
    monkeypatch.setattr(cluster, "SQUEUE_TIMEOUT_S", 1)
    assert cluster.job_states(["77_0"]) == {"77_0": "RUNNING"}

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
    ("garbage-with-exit-0", 'echo garbage', "squeue printed a line that is no job state ('garbage')"),
    ("a-range-it-cannot-read", 'echo "77_[x]|RUNNING"', "squeue printed a line that is no job state"),
    ("half-a-line", 'echo "77_0|"', "squeue printed a line that is no job state"),
    ("het-job", 'echo "77+0|RUNNING"', {}),
    ("empty-answer", "exit 0", {}),
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
    assert claims.take(layout, "55_0", [("t1", 1)], set(), set) == ("t1", 1)
    now = [0.0]
    alive = cluster.Patience(SlurmArrays(tmp_path, Resources(), "s", 0).live, unknown=cluster.all_may_run,
                             clock=lambda: now[0])
    _fake_squeue(tmp_path, monkeypatch, f'echo "{TIMEOUT}" >&2; exit 1')
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) is None
    assert "asking again in 5 s" in capsys.readouterr().err
    _fake_squeue(tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    now[0] = 4.0  # within the wait: squeue is not asked, the job counts as alive
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) is None
    now[0] = 6.0
    assert claims.take(layout, "56_0", [("t1", 1)], set(), alive) == ("t1", 1)
    assert claims.read(layout)["t1"].job == "56_0"


def test_a_claim_asks_the_scheduler_once_and_only_when_nothing_else_is_left(tmp_path, monkeypatch):
    """claims.take called squeue once per running trial of other jobs while it held the lock
    (100 claims: 100 calls, 0.9 s held)."""
    layout = SweepLayout(tmp_path / "sweep")
    queue = [(f"t{k:03d}", 1) for k in range(101)]
    for k in range(100):
        assert claims.take(layout, f"60_{k}", queue, set(), set) == queue[k]
    calls = tmp_path / "calls"
    _fake_squeue(tmp_path, monkeypatch, f'echo "$@" >> {calls}; for k in $(seq 0 98); do echo "60_$k|RUNNING"; done')
    live = SlurmArrays(tmp_path, Resources(), "s", 0).live
    assert claims.take(layout, "61_0", queue, set(), live) == queue[100]  # a free one: squeue is not asked
    assert not calls.exists()
    assert claims.take(layout, "61_0", queue, {queue[100][0]}, live) == queue[99]  # 60_99 is gone
    assert len(calls.read_text().splitlines()) == 1


def test_an_answer_is_kept_a_while_and_the_scheduler_not_asked_every_second():
    now, asked = [0.0], []

    def ask(jobs):
        asked.append(list(jobs))
        return set(jobs[:1])

    live = cluster.Patience(ask, unknown=cluster.all_may_run, clock=lambda: now[0], remember_s=30)
    assert [live(["1_0", "1_1"]) for _ in range(5)] == [{"1_0"}] * 5 and len(asked) == 1
    assert live(["1_1"]) == {"1_1"} and len(asked) == 2  # another question
    now[0] = 31.0
    assert live(["1_1"]) == {"1_1"} and len(asked) == 3


def test_patience_doubles_its_wait_up_to_five_minutes():
    now = [0.0]

    def fails():
        raise cluster.SchedulerUnavailable("squeue failed (x)")

    ask = cluster.Patience(fails, unknown=lambda: "?", clock=lambda: now[0])
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


BAD_NODES = [  # (id, bad_nodes.json's bytes, what --exclude holds, the line said)
    ("one-node", b'{"node1": "job 5_0: srun: error: Requested node configuration is not available"}', "node1",
     "excluded: node1 (job 5_0: srun: error: Requested node configuration is not available)"),
    ("beside-the-users-own", b'{"node[3-4]": "job 6_1: x"}', "'node9,node[3-4]'", "excluded: node[3-4] (job 6_1: x)"),
    ("damaged", b'{"node1": ', None, "bad_nodes.json: not valid JSON"),
    ("a-list", b'["node1"]', None, "bad_nodes.json: expected a JSON object"),
    ("an-empty-host", b'{"": null, "node2": "job 7_0: x"}', "node2", "bad_nodes.json: '' is no SLURM host list; passed over"),
    ("a-line-break", b'{"node1\\n#SBATCH --x": "y"}', None, "is no SLURM host list; passed over"),
]


@pytest.mark.parametrize("content, exclude, said", [pytest.param(*c[1:], id=c[0]) for c in BAD_NODES])
def test_nodes_where_steps_could_not_start_are_excluded_from_the_next_submission(tmp_path, monkeypatch, capsys,
                                                                                content, exclude, said):
    """A bad node drained the queue, and a re-run sent the trials back to it. The runner records
    the job's nodes; --dry-run and the next submission's sbatch exclude them (a damaged record
    only advises: it is named and passed over)."""
    import yaml

    from qarac_dist import sweep
    from support import tiny_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sbatch="exit 0", scontrol="exit 1"))
    layout = SweepLayout(tmp_path / "runs" / "s")
    layout.root.mkdir(parents=True)
    layout.bad_nodes.write_bytes(content)
    extra = {"exclude": "node9"} if "node9" in (exclude or "") else {}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": tiny_config(tmp_path / "c", tmp_path / "o"),
                                    "executor": "slurm", "runs_dir": str(tmp_path / "runs"),
                                    "resources": {"pack": 2, "extra_sbatch": extra}}))
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert said in out.out + out.err
    assert (f"#SBATCH --exclude={exclude}\n" in out.out) if exclude else "--exclude" not in out.out
    if exclude is None:
        assert layout.bad_nodes.read_bytes() == content  # kept as it is


def test_only_a_nodes_own_trouble_marks_it_bad():
    """Any step that could not start marked its node bad: a bad gres request, failing on every
    node alike, excluded them all one by one, until sbatch refused the sweep."""
    from qarac_dist.submit.pack import NODE_TROUBLE

    assert NODE_TROUBLE.search("srun: error: Unable to create step for job 5: Requested node configuration is not "
                               "available")
    assert not NODE_TROUBLE.search("srun: error: Unable to create step for job 5: Invalid generic resource (gres) "
                                   "specification")

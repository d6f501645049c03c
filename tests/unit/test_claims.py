"""Claims of packed jobs (submit/claims.py), with real processes on a real claims file: jobs that
finish trials at the same moment never take the same next trial, a job's own trials come
first, a dead job's trials are taken over, a newer submission's reservation wins, and a process
killed while it holds the lock does not block the next one."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import claims
from support import kill_while_holding_lock

QUEUE = [(f"t{i:02d}", 1) for i in range(40)]


def _claim_all(root: str, job: str, start_at: float, out) -> None:
    layout = SweepLayout(Path(root))
    while time.time() < start_at:  # every process asks at the same moment
        pass
    taken = []
    while (got := claims.take(layout, job, QUEUE, set(), lambda jobs: set(jobs))) is not None:
        taken.append(got[0])
        claims.end(layout, job, got[0], got[1], "COMPLETED")  # ends at once, and asks again
    out.put((job, taken))


def test_jobs_asking_at_the_same_moment_never_take_the_same_trial(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), f"100_{k}", start_at, out)) for k in range(16)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    taken = [tid for trials in results.values() for tid in trials]
    assert sorted(taken) == [tid for tid, _ in QUEUE]  # each exactly once
    recorded = claims.read(SweepLayout(tmp_path))
    assert {tid: c.job for tid, c in recorded.items()} == {tid: job for job, ts in results.items() for tid in ts}
    assert all(c.outcome == "COMPLETED" for c in recorded.values())


def test_a_job_resumes_its_own_trials_first_then_new_ones_then_those_of_dead_jobs(tmp_path):
    layout = SweepLayout(tmp_path)
    queue = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    running = {"1_0"}

    def alive(jobs):
        return set(jobs) & running

    assert claims.take(layout, "1_1", queue, set(), alive) == ("a", 1)   # dies without ending it
    assert claims.take(layout, "1_0", queue, set(), alive) == ("b", 1)   # preempted: its claim stays open
    assert claims.take(layout, "1_0", queue, {"b"}, alive) == ("c", 1)
    # Requeued, job 1_0 runs nothing yet: its own open claims come first, then the free trial,
    # then the trial of the job the scheduler no longer knows.
    assert [claims.take(layout, "1_0", queue, mine, alive) for mine in (set(), {"b"}, {"b", "c"},
                                                                                 {"b", "c", "d"})] \
        == [("b", 1), ("c", 1), ("d", 1), ("a", 1)]
    assert claims.take(layout, "1_0", queue, {"a", "b", "c", "d"}, alive) is None
    assert claims.read(layout)["a"].job == "1_0"


def test_a_reservation_for_a_new_attempt_keeps_runners_of_the_old_one_away(tmp_path):
    layout = SweepLayout(tmp_path)
    assert claims.take(layout, "1_0", [("a", 1)], set(), lambda jobs: set()) == ("a", 1)
    assert claims.reserve(layout, {"a": (1, 2)}, lambda jobs: set()) == ["a"]
    assert claims.take(layout, "1_1", [("a", 1)], set(), lambda jobs: set()) is None   # the old submission's runner
    assert claims.take(layout, "2_0", [("a", 2)], set(), lambda jobs: set(jobs)) == ("a", 2)
    # A trial another runner took over and still runs is left to it.
    assert claims.reserve(layout, {"a": (2, 3)}, lambda jobs: set(jobs) & {"2_0"}) == []
    assert claims.read(layout)["a"].attempt == 2


def test_a_process_killed_while_it_holds_the_lock_does_not_block_the_next(tmp_path):
    layout = SweepLayout(tmp_path)
    kill_while_holding_lock(layout.claims_lock)
    assert claims.take(layout, "1_0", [("a", 1)], set(), lambda jobs: set(jobs)) == ("a", 1)


def test_the_refill_rule_uses_the_time_to_a_first_checkpoint_else_a_whole_trial():
    assert claims.time_needed({}) is None
    whole = {"a": claims.Claim(1, "1_0", started=0.0, ended=300.0, outcome="COMPLETED"),
             "b": claims.Claim(1, "1_0", started=0.0, ended=100.0, outcome="PRUNED"),
             "c": claims.Claim(1, "1_0", started=0.0, ended=5.0, outcome="FAILED")}
    assert claims.time_needed(whole) == 200.0
    saved = {**whole, "d": claims.Claim(1, "1_0", started=0.0, first_checkpoint_s=40.0)}
    assert claims.time_needed(saved) == 40.0

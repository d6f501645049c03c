"""Torch-extension build locks (train/build_locks.py) with real processes on real files: a lock
a killed build left is removed and named; a lock a live build holds open, or in a directory a
build is writing, is waited for, never broken; trials that meet one stale lock together remove
it once and none fails."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from qarac_dist.train import build_locks

HOUR = 3600.0


def _killed_build(root, op="deepspeed_shm_comm", age=HOUR):
    """What a build SIGKILLed mid-way leaves: its directory, an object file, the lock; all old."""
    build = root / "py311_cpu" / op
    build.mkdir(parents=True)
    for name in ("build.ninja", "shm.o", "lock"):
        (build / name).write_text("")
        os.utime(build / name, (time.time() - age, time.time() - age))
    return build / "lock"


def test_a_lock_a_killed_build_left_is_removed_and_named(tmp_path):
    lock = _killed_build(tmp_path)
    said = []
    assert build_locks.wait_for_builds(tmp_path, say=said.append) == [lock]
    assert not lock.exists() and len(said) == 1 and str(lock) in said[0] and "left 3600 s ago" in said[0]


def test_a_lock_a_live_build_holds_open_is_waited_for_however_old(tmp_path, monkeypatch):
    lock = _killed_build(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "print('holding', flush=True); time.sleep(3); os.close(fd); os.remove(sys.argv[1])",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    monkeypatch.setattr(build_locks, "POLL_S", 0.1)
    started = time.monotonic()
    assert build_locks.wait_for_builds(tmp_path, say=print) == []  # the holder removed it itself
    assert time.monotonic() - started > 1 and holder.wait(timeout=10) == 0


def test_a_lock_in_a_directory_still_being_written_is_waited_for_until_it_goes_quiet(tmp_path, monkeypatch):
    """A build on another node is not in this host's /proc; its writes in the directory are seen."""
    lock = _killed_build(tmp_path)
    (lock.parent / "shm_interface.o").write_text("")  # written just now
    monkeypatch.setattr(build_locks, "POLL_S", 0.1)
    started = time.monotonic()
    assert build_locks.wait_for_builds(tmp_path, idle_s=2.0, say=print) == [lock]
    assert time.monotonic() - started >= 1.5


def _wait(root, out):
    out.put([str(p) for p in build_locks.wait_for_builds(root, say=lambda line: None)])


def test_trials_meeting_one_stale_lock_together_remove_it_once(tmp_path):
    lock = _killed_build(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_wait, args=(tmp_path, out)) for _ in range(6)]
    for p in procs:
        p.start()
    removed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(map(len, removed)) == [0, 0, 0, 0, 0, 1] and not lock.exists()


def test_a_new_builds_lock_taken_between_the_judgement_and_the_removal_is_given_back(tmp_path):
    lock = _killed_build(tmp_path)
    judged = build_locks.stale(lock, time.time())
    assert judged is not None
    lock.unlink()  # another trial removed the dead one, and a new build took the name
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
    try:
        assert not build_locks._remove(lock, judged)
        assert lock.exists() and os.fstat(fd).st_ino == lock.stat().st_ino
        assert [p.name for p in lock.parent.iterdir() if p.name.startswith("lock.")] == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("node[1-2]", "node1"), ("n[5,1-3]", "n5"),
                                             ("a-b[003-004]", "a-b003"), ("gpu[07-09]-ib,cpu1", "gpu07-ib"),
                                             ("cpu1,gpu[2-3]", "cpu1"), (" node2 ", "node2")])
def test_a_steps_first_host_is_read_without_scontrol(nodelist, first):
    """A trial in a container's image has no scontrol: `scontrol show hostnames` failed there."""
    from qarac_dist.train.ranks import first_host

    assert first_host(nodelist) == first


def test_a_live_builds_lock_is_seen_through_a_symlinked_root(tmp_path, monkeypatch):
    """The kernel names an open file by its real path: a holder was missed when
    TORCH_EXTENSIONS_DIR went through a symlink, and its lock removed under it."""
    real = tmp_path / "real"
    lock = _killed_build(real)
    (tmp_path / "link").symlink_to(real)
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert build_locks.stale(tmp_path / "link" / lock.relative_to(real), time.time()) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("launcher", ["srun", "submitit"])
def test_a_slurm_jobs_port_is_below_the_ephemeral_range_and_shared_by_its_ranks(monkeypatch, launcher):
    """submitit's own choice for array task 701_1 was 46465, inside Linux's ephemeral range
    (32768-60999), and a trial failed there as EADDRINUSE: another process's outgoing connection
    held it. Every rank of a step derives the same port, below that range; other steps and
    jobs get other ports."""
    from qarac_dist.train.ranks import _ephemeral_floor, export_from_environment, slurm_port

    floor = _ephemeral_floor()
    ports = {slurm_port(str(job), str(step)) for job in range(700, 740) for step in range(4)}
    assert len(ports) == 160 and all(20000 <= int(p) < floor for p in ports)
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_JOB_ID": "701", "SLURM_ARRAY_JOB_ID": "700", "SLURM_ARRAY_TASK_ID": "1",
             "SLURM_JOB_NODELIST": "node1", "SLURM_STEP_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
             "SLURM_PROCID": "1"}
    if launcher == "submitit":
        slurm["SUBMITIT_EXECUTOR"] = "slurm"
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    ranks = export_from_environment()
    assert (ranks.rank, ranks.world_size) == (1, 2)
    assert os.environ["MASTER_PORT"] == slurm_port("701", "0") and os.environ["MASTER_ADDR"] == "node1"

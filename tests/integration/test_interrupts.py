"""What a user does to a running sweep: Ctrl-C in a real terminal, a cancel, and the commands
the sweep prints to copy, each on the real code path (local processes, the local SLURM cluster)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit.sweep_dir import Manifest
from qarac_dist.track.trial_dir import TrialDir, read_metrics
from support import HELPERS, ROOT, run_sweep, table_rows, tiny_config, wait_for, write_config


def _env() -> dict:
    """The test's Python first on PATH, so a printed `python -m ...` runs in this environment."""
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [HELPERS, os.environ.get("PYTHONPATH")]))}


def _slow_sweep(tmp_path, data_cache, executor: str, max_steps: int, seconds: float, **fields) -> Path:
    """Each step sleeps `seconds` until the test makes the file `fast` (tmp_path / "fast"): the
    re-run after an interruption goes at the machine's speed."""
    base = tiny_config(data_cache, tmp_path / "unused", training={"max_steps": max_steps, "log_every": 1},
                       evaluation={"every_steps": max_steps}, checkpointing={"every_steps": 10_000})
    base["model"] = {"factory": "faults:slow_steps",
                     "factory_kwargs": {"seconds": seconds, "until": str(tmp_path / "fast")}}
    sweep = {"name": "interrupted", "base": base, "runs_dir": str(tmp_path / "runs"), "executor": executor,
             "grid": {"optimizer.lr": [1e-3, 2e-3]}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
             "resources": {"time_min": 10, "max_parallel": 2}, **fields}
    return write_config(tmp_path / "sweep.yaml", sweep)


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] if (out / "metrics.jsonl").exists() \
        else []


class Terminal:
    """A command on a pseudo-terminal of its own, as a user's shell runs it: Ctrl-C typed there
    reaches its foreground process group through the terminal's line discipline."""

    def __init__(self, argv: list[str], cwd: Path, env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            os.chdir(cwd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # pytest may run us with SIGINT ignored
            os.execve(argv[0], argv, env)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the terminal's last process has exited
                return
            if not data:
                return
            self.chunks.append(data)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def exit_code(self, timeout: float = 300) -> int:
        code: list = []

        def ended():
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                code.append(os.waitstatus_to_exitcode(status))
            return bool(pid)

        wait_for(ended, timeout, "the command to exit")
        self.reader.join(timeout=10)
        return code[0]

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace").replace("\r\n", "\n")


def test_ctrl_c_in_a_terminal_saves_every_local_trial_and_the_same_command_resumes_them(tmp_path, data_cache):
    """Two local trials, 0.1 s a step, no periodic checkpoint. Ctrl-C typed in the terminal: the
    driver alone gets it; each trial saves at the end of its step; the driver says where each
    saved and how to resume, and exits 130. The same command then resumes each trial from the
    step it saved at and completes it, every step logged once."""
    path = _slow_sweep(tmp_path, data_cache, "local", max_steps=120, seconds=0.1)
    command = [sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"]
    terminal = Terminal(command, tmp_path, _env())
    layout = SweepLayout(tmp_path / "runs" / "interrupted")
    manifest = wait_for(lambda: layout.manifest.exists() and Manifest.load(layout.root), 300, "the manifest")
    outs = [Path(r.output_dir) for r in manifest.trials.values()]
    wait_for(lambda: all(len(_steps(o)) >= 5 for o in outs), 300, "both trials to train 5 steps")
    terminal.ctrl_c()
    code = terminal.exit_code()
    text = terminal.text
    assert code == 130, text
    saved = {tid: int(step) for tid, step in re.findall(r"trial (\w+) \[[^\]]*\]: saved at step (\d+)", text)}
    assert set(saved) == set(manifest.trials), text
    (resume,) = re.findall(r"resume:\s+(\S.*?)\s*$", text, re.MULTILINE)
    assert resume == f"python -m qarac_dist.sweep {path} --no-preflight"
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    for tid, record in Manifest.load(layout.root).trials.items():
        status = TrialDir(record.output_dir).status()
        assert (record.state, status.state.value, status.step, status.last_checkpoint) == \
            ("PREEMPTED", "PREEMPTED", saved[tid], saved[tid])
        assert 5 <= saved[tid] < 120
    shown = subprocess.run([sys.executable, "-m", "qarac_dist.status", str(layout.root)], capture_output=True,
                           text=True, timeout=120)
    states = {row["trial"]: row["state"] for row in table_rows(shown.stdout)}
    assert states == {tid: f"interrupted at step {step}" for tid, step in saved.items()}, shown.stdout

    # The resume line, run through a shell as printed.
    (tmp_path / "fast").touch()
    again = subprocess.run(["bash", "-c", resume], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    for tid, record in Manifest.load(layout.root).trials.items():
        status = TrialDir(record.output_dir).status()
        assert (record.state, status.resumed_from, status.attempt) == ("COMPLETED", saved[tid], 2)
        assert _steps(Path(record.output_dir)) == list(range(1, 121))  # each step logged once, none lost
        log = "".join(p.read_text() for p in layout.submitit.rglob("*_log.err"))
        assert f"resumed from checkpoint step{saved[tid]:08d} at step {saved[tid]} (attempt 2)" in log


def _submitted(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The commands a submission printed for the user to copy: follow, status, cancel."""
    return dict(re.findall(r"^(follow|status|cancel):\s+(.+)$", proc.stdout, re.MULTILINE))


def test_a_cancelled_sweep_is_cancelled_everywhere_and_its_printed_commands_name_it(cluster, tmp_path, data_cache):
    """Submitted with overrides (a name, a runs folder with a space in it); each printed
    command, run through a shell as printed, reaches this sweep. Cancel: status and the summary
    show CANCELLED for every trial, MLflow KILLED, status writes nothing (the manifest is
    byte-equal), and the re-run submits them again, resuming from the checkpoints they saved."""
    path = _slow_sweep(tmp_path, data_cache, "slurm", max_steps=300, seconds=0.1)
    runs = tmp_path / "my runs"
    overrides = ["name=cx", f"runs_dir={runs}"]
    proc = run_sweep(path, *overrides, "--no-preflight", env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = _submitted(proc)
    assert set(commands) == {"follow", "status", "cancel"}, proc.stdout
    layout = SweepLayout(runs / "cx")
    manifest = Manifest.load(layout.root)
    outs = [Path(r.output_dir) for r in manifest.trials.values()]
    wait_for(lambda: all(len(_steps(o)) >= 3 for o in outs), 300, "both trials to train 3 steps")

    shell = {"cwd": tmp_path, "env": _env(), "capture_output": True, "text": True, "timeout": 300}
    status = subprocess.run(["bash", "-c", commands["status"]], **{**shell, "cwd": ROOT})
    assert "sweep cx (slurm)" in status.stdout, status.stdout + status.stderr
    cancel = subprocess.run(["bash", "-c", commands["cancel"]], **{**shell, "cwd": path.parent})
    assert cancel.returncode == 0 and "cancelled 2 trial(s) of cx" in cancel.stdout, cancel.stdout + cancel.stderr
    # The jobs save on scancel's SIGTERM and leave the queue.
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-n", "qarac-cx"], capture_output=True,
                                        text=True).stdout.strip(), 300, "the jobs to leave the queue")

    before = layout.manifest.read_bytes()
    shown = subprocess.run(["bash", "-c", commands["status"]], **{**shell, "cwd": path.parent})
    assert layout.manifest.read_bytes() == before  # status writes nothing
    states = {row["trial"]: row["state"] for row in table_rows(shown.stdout)}
    assert states == {tid: "CANCELLED" for tid in manifest.trials}, shown.stdout
    from qarac_dist.track.mlflow_client import client

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {c.get_run(r.mlflow_run_id).info.status for r in manifest.trials.values()} == {"KILLED"}
    saved = {tid: TrialDir(r.output_dir).status().last_checkpoint for tid, r in manifest.trials.items()}
    assert all(step and step >= 3 for step in saved.values()), saved

    # The follow command, as printed, re-runs the same sweep: it submits the cancelled trials again.
    (tmp_path / "fast").touch()
    follow = subprocess.run(["bash", "-c", commands["follow"]], **{**shell, "cwd": path.parent, "timeout": 900})
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert "sweep cx: 2 trials, 2 to run" in follow.stdout
    after = Manifest.load(layout.root)
    for tid, record in after.trials.items():
        assert [a.state for a in record.history] == ["CANCELLED"] and record.state == "COMPLETED"
        assert TrialDir(record.output_dir).status().resumed_from == saved[tid]
    assert json.loads(layout.manifest.read_text())["sweep"] == "cx"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_to_the_driver_is_a_stop_like_ctrl_c(tmp_path, data_cache, signum):
    """What a closed terminal (SIGHUP) or `kill` (SIGTERM) does to the driver: the same stop."""
    path = _slow_sweep(tmp_path, data_cache, "local", max_steps=120, seconds=0.1, grid={"optimizer.lr": [1e-3]})
    driver = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    layout = SweepLayout(tmp_path / "runs" / "interrupted")
    manifest = wait_for(lambda: layout.manifest.exists() and Manifest.load(layout.root), 300, "the manifest")
    (record,) = manifest.trials.values()
    wait_for(lambda: len(_steps(Path(record.output_dir))) >= 3, 300, "the trial to train 3 steps")
    driver.send_signal(signum)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    (step,) = re.findall(r"saved at step (\d+)", out)
    assert TrialDir(record.output_dir).status().step == int(step)


def test_a_driver_killed_outright_then_the_same_command_follows_the_live_trial(tmp_path, data_cache):
    """SIGKILL to the driver leaves its local trial running; the same command at once finds it
    running (its process is still submitit's), submits nothing, follows it to the end: the
    trial is trained once, by one job."""
    path = _slow_sweep(tmp_path, data_cache, "local", max_steps=60, seconds=0.1, grid={"optimizer.lr": [1e-3]})
    command = [sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"]
    driver = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    layout = SweepLayout(tmp_path / "runs" / "interrupted")
    manifest = wait_for(lambda: layout.manifest.exists() and Manifest.load(layout.root), 300, "the manifest")
    (record,) = manifest.trials.values()
    wait_for(lambda: len(_steps(Path(record.output_dir))) >= 3, 300, "the trial to train 3 steps")
    driver.kill()
    driver.wait(timeout=60)
    again = run_sweep(path, "--no-preflight", env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 trials, 0 to run, 1 already pending, running or completed" in again.stdout
    (record,) = Manifest.load(layout.root).trials.values()
    status = TrialDir(record.output_dir).status()
    assert (record.state, record.attempt, status.starts, status.resumed_from) == ("COMPLETED", 1, 1, None)
    assert _steps(Path(record.output_dir)) == list(range(1, 61))


def test_ctrl_c_while_following_slurm_jobs_stops_following_only(cluster, tmp_path, data_cache):
    """With SLURM the jobs are the cluster's: Ctrl-C during --wait leaves them running and says
    how to follow, see or cancel them."""
    path = _slow_sweep(tmp_path, data_cache, "slurm", max_steps=300, seconds=0.1, grid={"optimizer.lr": [1e-3]})
    driver = subprocess.Popen([sys.executable, "-m", "qarac_dist.sweep", str(path), "--wait", "--no-preflight"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    layout = SweepLayout(tmp_path / "runs" / "interrupted")
    manifest = wait_for(lambda: layout.manifest.exists() and Manifest.load(layout.root), 300, "the manifest")
    (record,) = manifest.trials.values()
    wait_for(lambda: len(_steps(Path(record.output_dir))) >= 2, 300, "the job to train")
    (record,) = Manifest.load(layout.root).trials.values()  # now with its job id
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    try:
        assert driver.returncode == 130, out
        assert "stopped following; the SLURM jobs go on." in out and "Traceback" not in out
        assert re.search(r"^cancel:\s+python -m qarac_dist.sweep .* --cancel$", out, re.MULTILINE), out
        queued = subprocess.run(["squeue", "-h", "-j", record.job_id.split("_")[0], "-o", "%T"], capture_output=True,
                                text=True).stdout.split()
        assert queued == ["RUNNING"]
    finally:
        subprocess.run(["scancel", record.job_id.split("_")[0]], check=False)


def _runs(job: str) -> bool:
    """Whether the local job (its pid) still runs submitit's controller (not a zombie, not gone)."""
    try:
        return b"submitit" in Path(f"/proc/{job}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_local_retraining_stops_with_its_driver_is_cancelled_and_never_runs_twice(tmp_path, data_cache):
    """final.retrain runs in the driver's jobs after the last trial. SIGTERM to the driver stops
    it as it stops a trial (saved, exit 130); `--cancel` from another terminal stops it with the
    test split unread; a driver killed outright leaves it running, and the next run waits for
    it rather than start it again (it would fail on the trial directory's writer lock)."""
    path = _slow_sweep(tmp_path, data_cache, "local", max_steps=20, seconds=0.5, grid={"optimizer.lr": [1e-3]},
                       set={"data.synthetic.num_test": 40}, final={"split": "test", "retrain": True})
    command = [sys.executable, "-m", "qarac_dist.sweep", str(path), "--no-preflight"]
    layout = SweepLayout(tmp_path / "runs" / "interrupted")
    from qarac_dist.submit.executors import _process_tree

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def trained(at_least: int):
        found = sorted(layout.root.glob("retrain/*/metrics.jsonl"))
        return found and len(_steps(found[0].parent)) >= at_least and found[0].parent

    driver = start()
    folder = wait_for(lambda: trained(2), 300, "the retraining to train 2 steps")
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "stopped before the test split was read" in out, out
    assert "Traceback" not in out and not layout.final.exists()
    status = TrialDir(folder).status()
    assert status.state.value == "PREEMPTED" and status.last_checkpoint == status.step >= 2
    (job,) = re.findall(r"final: training the chosen configuration again .* job\(s\) (\d+)", out)
    assert not _runs(job) and Manifest.load(layout.root).final_job == {}  # ended, so named no more
    # Resumed by the same command, then cancelled from another terminal (the retraining held
    # still meanwhile, so it cannot finish first however long the cancel takes to start).
    driver = start()
    wait_for(lambda: trained(status.step + 2), 300, "the resumed retraining to train 2 steps")
    (job,) = Manifest.load(layout.root).final_job["retrain"]
    tree = _process_tree(int(job))
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    cancel = run_sweep(path, "--cancel", env=_env())
    for pid in tree:
        os.kill(pid, signal.SIGCONT)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"the job(s) of its evaluation of the test split: {job}" in cancel.stdout, cancel.stdout
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1 and "the retraining was cancelled (--cancel); the test split was not read" in out, out
    assert re.findall(r"final: training the chosen configuration again .* job\(s\) (\d+)", out) == [job]
    assert not layout.final.exists() and TrialDir(folder).status().starts == 2
    # Resumed again; the driver killed outright (its retraining stopped in its tracks, so it is
    # surely running when the next driver looks, however loaded the machine).
    driver = start()
    saved = TrialDir(folder).status().step
    wait_for(lambda: trained(saved + 2), 300, "the resumed retraining to train 2 steps")
    driver.kill()
    driver.wait(timeout=60)
    (orphan,) = Manifest.load(layout.root).final_job["retrain"]
    assert _runs(orphan)
    tree = _process_tree(int(orphan))
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    driver = start()
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if f"final: waiting for the retraining job(s) {orphan} that an earlier run started" in line:
            break
    else:
        raise AssertionError("".join(seen))
    (tmp_path / "fast").touch()
    for pid in tree:
        os.kill(pid, signal.SIGCONT)
    out = "".join(seen) + driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, out
    assert "final: training the chosen configuration again" not in out.split("earlier run started")[1]
    status = TrialDir(folder).status()
    assert (status.state.value, status.starts, status.step) == ("COMPLETED", 3, 20)
    (result,) = json.loads(layout.final.read_text())["results"]
    assert result["choice"]["retrain"] and "each trained again on train + validation" in out

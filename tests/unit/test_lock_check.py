"""Locks that hold only within a node (Lustre with localflock): the driver holds a lock and a
tiny step on a compute node tries to take it (submit/lock_check.py). Real processes: the probe
runs as a real process through a fake `srun` on PATH, against the lock the driver really holds."""

from __future__ import annotations

import pytest
import yaml

from qarac_dist.base.errors import UserError
from qarac_dist.base.layout import SweepLayout
from qarac_dist.config.sweep import Resources
from qarac_dist.submit import lock_check
from support import fake_commands, tiny_config

# The probe run as srun would run it: the options dropped, the command kept; `calls` counts.
HONEST = 'echo x >> "$CALLS"; while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"'
# Node-local locks: the probe is run against a copy of the file, whose lock nobody holds.
NODE_LOCAL = ('echo x >> "$CALLS"; while [ "${1#-}" != "$1" ]; do shift; done; '
              'py=$1; shift; code=$2; file=$3; cp "$file" "$file.elsewhere"; exec "$py" -c "$code" "$file.elsewhere"')


def _srun(tmp_path, monkeypatch, body: str):
    calls = tmp_path / "calls"
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", srun=body, sbatch="exit 0", scontrol="exit 1"))
    return calls


def test_a_lock_seen_on_the_node_is_recorded_and_not_asked_again(tmp_path, monkeypatch):
    calls = _srun(tmp_path, monkeypatch, HONEST)
    layout = SweepLayout(tmp_path / "s")
    lock_check.check(layout, Resources())
    lock_check.check(layout, Resources())
    assert len(calls.read_text().splitlines()) == 1
    assert layout.lock_check.exists()


def test_a_lock_not_seen_on_the_node_is_refused_in_one_line(tmp_path, monkeypatch):
    _srun(tmp_path, monkeypatch, NODE_LOCAL)
    layout = SweepLayout(tmp_path / "s")
    with pytest.raises(UserError, match="is not seen on .*grants fcntl locks per node .*mount it with -o flock"):
        lock_check.check(layout, Resources())
    assert not layout.lock_check.exists()


@pytest.mark.parametrize("body", ['echo "srun: error: Unable to allocate resources: Requested node configuration '
                                  'is not available" >&2; exit 1', "sleep 5; exit 0", "echo node7; exit 0",
                                  "echo garbage; exit 10", "exit 0"],
                         ids=["refused", "hangs", "exit-0-without-the-probe", "exit-10-without-the-probe", "silent"])
def test_a_probe_that_cannot_run_leaves_the_question_open(tmp_path, monkeypatch, capsys, body):
    _srun(tmp_path, monkeypatch, body)
    monkeypatch.setattr(lock_check, "IMMEDIATE_S", -59)  # a minute less: the timeout is 1 s
    layout = SweepLayout(tmp_path / "s")
    lock_check.check(layout, Resources())
    assert "could not check that locks hold across nodes (" in capsys.readouterr().err
    assert not layout.lock_check.exists()


def test_a_packed_sweep_on_node_local_locks_is_refused_and_nothing_is_submitted(tmp_path, monkeypatch, capsys):
    from qarac_dist import sweep

    _srun(tmp_path, monkeypatch, NODE_LOCAL)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": tiny_config(tmp_path / "c", tmp_path / "o"),
                                    "executor": "slurm", "runs_dir": str(tmp_path / "runs"),
                                    "grid": {"training.seed": [0, 1, 2, 3]},
                                    "resources": {"pack": 2, "max_parallel": 4}}))  # two jobs: two nodes
    assert sweep.main([str(path), "--no-preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not seen on" in err, err
    assert not (tmp_path / "runs").exists()  # nothing created, nothing submitted

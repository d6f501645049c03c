"""The sbatch scripts a sweep submits, checked line by line against recorded files
(tests/golden/sbatch_*.txt), and shown verbatim by --dry-run whatever the terminal's width.

To record them again after a deliberate change: QARAC_RECORD_GOLDEN=1 python -m pytest tests/unit/test_sbatch.py
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path

import pytest

from qarac_dist.config.environment import Container, Environment
from qarac_dist.config.sweep import Resources
from qarac_dist.base.layout import SweepLayout
from qarac_dist.submit import environment, sbatch
from qarac_dist.submit.pack import srun_command
from support import ROOT, tiny_config, write_config

GOLDEN = ROOT / "tests" / "golden"
FOLDER = Path("/shared/runs/demo/submitit/%j")
PYTHON = "/opt/venv/bin/python"

CASES = {
    "single_cpu": (Resources(), 1, 1001),
    "two_nodes_four_gpus": (Resources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8, mem_gb=64,
                                      time_min=240, partition="gpu", account="mylab", qos="high", constraint="a100",
                                      extra_sbatch={"exclusive": True, "reservation": "res1"}, max_parallel=3), 8, 1001),
    "split_at_max_array_size": (Resources(time_min=30, max_parallel=2), 5, 3),
    # A node-exclusive cluster: 4 one-GPU trials per 4-GPU node, two such nodes at once.
    "packed_four_one_gpu_trials": (Resources(gpus_per_node=1, cpus_per_task=8, mem_gb=60, time_min=240,
                                             partition="gpu", max_parallel=8, pack=4), 12, 1001),
    # A site's setup lines, variables (one secret, masked as --dry-run shows it) and --export=NONE,
    # packed: the lines come before the runner, which starts every step.
    "setup_lines_packed": (Resources(gpus_per_node=1, cpus_per_task=8, time_min=240, partition="gpu", max_parallel=4,
                                     pack=2, extra_sbatch={"export": "NONE"}), 4, 1001, Environment(
        setup=["module load cuda/12.4 nccl", "source /opt/conda/etc/profile.d/conda.sh && conda activate train  # ours"],
        variables={"NCCL_SOCKET_IFNAME": "ib0", "HF_HOME": "/shared/hf cache", "HF_TOKEN": "hf_" + "x1Y2" * 8})),
    # Containers on two nodes of four GPUs: Apptainer wraps the job's Python; pyxis gives srun its
    # flags; a trial saved on SLURM's warning is requeued by the job's script (no scontrol inside).
    "apptainer_two_nodes_four_gpus": (Resources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                                                time_min=240, partition="gpu"), 2, 1001, Environment(
        container=Container("apptainer", "/shared/images/train.sif", ["/gpfs/datasets:/data"], "/opt/venv/bin/python"))),
    "pyxis_two_nodes_four_gpus": (Resources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                                            time_min=240, partition="gpu"), 2, 1001, Environment(
        setup=["export NCCL_DEBUG=WARN"],
        container=Container("pyxis", "nvcr.io#nvidia/pytorch:24.05-py3", ["/gpfs/datasets:/data"]))),
    "pyxis_packed": (Resources(gpus_per_node=1, cpus_per_task=8, time_min=240, partition="gpu", max_parallel=4, pack=4),
                     4, 1001, Environment(container=Container("pyxis", "/shared/images/train.sqsh"))),
}


def render(resources: Resources, num_trials: int, max_array_size: int, env: Environment = Environment()) -> str:
    """Every script of the submission, as the dry-run prints them; for packed jobs, with the
    command that starts each trial's step."""
    run = environment.launch(env, ["/shared/runs/demo", "/scratch/data_cache"], cwd="/shared/work")
    if run.python == (sys.executable,):
        run = environment.Launch((PYTHON,))
    job = environment.job_parameters(env, resources.extra_sbatch, run, resources.pack > 1, shown=True)
    if resources.pack > 1:
        script = sbatch.sbatch_text(resources, sbatch.job_name("demo"), FOLDER, PYTHON,
                                    sbatch.num_jobs(resources, num_trials), job=job)
        step = " ".join(srun_command(resources, run))
        return f"{script}\n# ---- each trial's step ----\n{step}\n"
    scripts = [sbatch.sbatch_text(resources, sbatch.job_name("demo"), FOLDER, " ".join(run.python), len(array),
                                  job=job) for array in sbatch.arrays(num_trials, max_array_size)]
    return "\n# ---- next array ----\n".join(scripts) + "\n"


def _compare(name: str, text: str) -> None:
    path = GOLDEN / f"sbatch_{name}.txt"
    if os.environ.get("QARAC_RECORD_GOLDEN"):
        path.write_text(text)
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "now"))
    assert text == expected, f"the sbatch text changed:\n{diff}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_sbatch_text_matches_the_recorded_script(name):
    _compare(name, render(*CASES[name]))


def test_split_arrays_stay_below_max_array_size():
    assert [list(a) for a in sbatch.arrays(5, 3)] == [[0, 1, 2], [3, 4]]
    text = render(*CASES["split_at_max_array_size"])
    assert text.count("#SBATCH --array=0-2%2") == 1 and text.count("#SBATCH --array=0-1%2") == 1


@pytest.mark.parametrize("per_trial, pack, job", [
    pytest.param({}, 1, {}, id="unpacked"),
    pytest.param({"gpus_per_node": 1, "mem_gb": 10}, 4, {"tasks_per_node": 4, "gpus_per_node": 4, "mem_gb": 40},
                 id="one-node trials share a node"),
    pytest.param({"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}, 3, {"nodes": 6}, id="multi-node trials"),
])
def test_a_packed_job_holds_its_trials_resources(per_trial, pack, job):
    trial = Resources(**per_trial, pack=pack)
    assert sbatch.job_resources(trial) == dataclasses.replace(trial, **job)


@pytest.mark.parametrize("max_parallel, pack, trials, jobs", [
    (4, 1, 6, 6), (2, 2, 6, 1), (8, 4, 12, 2), (5, 2, 20, 3), (8, 4, 3, 1), (1, 3, 9, 1),
])
def test_packed_submissions_make_ceil_max_parallel_over_pack_jobs(max_parallel, pack, trials, jobs):
    assert sbatch.num_jobs(Resources(max_parallel=max_parallel, pack=pack), trials) == jobs


@pytest.mark.parametrize("change", [
    pytest.param({"time_min": 241}, id="time"), pytest.param({"partition": "cpu"}, id="partition"),
    pytest.param({"gpus_per_node": 8}, id="gpus"), pytest.param({"extra_sbatch": {"exclusive": True}}, id="extra"),
])
def test_a_changed_directive_fails_the_comparison(change, monkeypatch):
    """The golden comparison itself can fail: one directive changed gives another script."""
    monkeypatch.delenv("QARAC_RECORD_GOLDEN", raising=False)
    resources, trials, size = CASES["two_nodes_four_gpus"][:3]
    with pytest.raises(AssertionError, match="the sbatch text changed"):
        _compare("two_nodes_four_gpus", render(dataclasses.replace(resources, **change), trials, size))


def test_dry_run_prints_the_scripts_verbatim_on_a_narrow_terminal(tmp_path, monkeypatch, capsys):
    """Captured from a 40-column terminal, the printed scripts are byte-equal to the builder's."""
    from qarac_dist import sweep

    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.chdir(tmp_path)
    spec = {"name": "narrow", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "auto",
            "grid": {"training.seed": [0, 1, 2]},
            "resources": {"nodes": 2, "gpus_per_node": 4, "partition": "a-partition-with-a-long-name"}}
    path = tmp_path / "narrow.yaml"
    write_config(path, spec)
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = sbatch.sbatch_text(Resources(nodes=2, gpus_per_node=4, partition="a-partition-with-a-long-name"),
                                  sbatch.job_name("narrow"), sbatch.job_folder(SweepLayout(tmp_path / "runs" / "narrow").submitit),
                                  __import__("sys").executable, 3)
    assert expected + "\n" in out
    assert any(len(line) > 40 for line in expected.splitlines())  # the point: long lines stay whole


def test_dry_run_shows_the_setup_lines_verbatim_with_secrets_masked_and_the_command_line_drops_them(
        tmp_path, monkeypatch, capsys):
    from qarac_dist import sweep
    from support import fake_commands

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", sbatch="exit 0", scontrol="exit 1"))
    token = "hf_" + "Ab3d" * 8
    spec = {"name": "site", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "slurm",
            "environment": {"setup": ["module load cuda/12.4  # the site's", f"export HF_TOKEN={token}"],
                            "variables": {"API_KEY": "plain-looking", "NCCL_DEBUG": "WARN"}}}
    path = tmp_path / "site.yaml"
    write_config(path, spec)
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\n{ module load cuda/12.4  # the site's\n} || qarac_setup_failed 0 $? " in out
    assert "export API_KEY='[redacted]'" in out and "export NCCL_DEBUG=WARN" in out
    assert token not in out and "export HF_TOKEN=[redacted]" in out
    assert sweep.main([str(path), "environment.setup=[]", "environment.variables={}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# setup" not in out and "qarac_setup_failed" not in out


def test_a_local_trial_starts_with_what_the_setup_lines_left_whatever_they_print(monkeypatch):
    """The lines run by bash before a local trial; what they print must not be taken for the
    environment they leave, and a line that hangs is a failure named, not a hung driver."""
    from qarac_dist.submit import environment as env_module

    run = env_module.Launch(("python",))
    started = env_module.local_python(Environment(setup=["echo noise; printf 'X=fake\\\\0'", "export A=1"],
                                                  variables={"B": "x y"}), run)
    assert started.endswith("'B=x y' A=1 python") and "X=fake" not in started, started
    monkeypatch.setattr(env_module, "SETUP_TIMEOUT_S", 1)
    assert "environment.setup did not finish within 1 s" in env_module.local_python(Environment(setup=["sleep 30"]), run)

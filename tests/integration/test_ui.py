"""The MLflow UI in a real browser (Debian chromium, Selenium): a sweep's parent and child runs
are listed on its experiment page, each trial's logged model in the Models column."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from qarac_dist.track.mlflow_client import client, create_run, experiment_id

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_parent_and_child_runs_show_on_the_experiment_page(tmp_path, shared_mlflow_server):
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs Debian's chromium and chromium-driver (tests/setup.sh installs them)")
    from mlflow_ui import check_runs_page

    import torch

    from qarac_dist.track.logged_model import log

    c = client(shared_mlflow_server.uri)
    exp = experiment_id(c, "ui_sweep")
    parent = create_run(c, exp, "ui_sweep", {"sweep": "ui_sweep"})
    names = ["ui_sweep"]
    for i in range(3):
        name = f"trial{i}abc optimizer.lr=0.00{i + 1}"
        run = create_run(c, exp, name, {"trial_id": f"trial{i}abc"}, {"optimizer.lr": f"0.00{i + 1}"}, parent)
        best = tmp_path / f"best{i}"
        best.mkdir()
        (best / "tokenizer.json").write_text("{}")
        assert log(shared_mlflow_server.uri, run, best, 1, module=torch.nn.Linear(2, 2))  # as a trial logs its best
        names.append(name)
    shot = tmp_path / "ui.png"
    missing, models = check_runs_page(shared_mlflow_server.uri, exp, names, shot, num_models=3)
    assert missing == [], f"not on the page: {missing}"
    assert models == 3, "the Models column does not show each trial's model"
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("stop", ["SIGHUP", "SIGTERM"])
def test_the_ui_command_closed_with_its_terminal_stops_its_server(tmp_path, stop):
    """A terminal or SSH session closed (SIGHUP), or a kill (SIGTERM), left the MLflow server
    running in a session of its own, holding the port (a review found it)."""
    import os
    import signal
    import socket
    import subprocess

    from qarac_dist.submit.sweep_dir import Manifest
    from support import wait_for

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client(uri)  # the store, as a sweep's driver makes it
    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    Manifest("s", "local", "accuracy", "max", {}, tracking_uri=uri).save(directory)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]

    def answers() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    ui = subprocess.Popen([sys.executable, "-m", "qarac_dist.ui", str(directory), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(answers, 120, "the MLflow UI to answer")
        ui.send_signal(getattr(signal, stop))
        assert ui.wait(timeout=60) == 0
    finally:
        if ui.poll() is None:
            ui.kill()
    wait_for(lambda: not answers(), 60, "the port to be free")
    assert "stopped" in ui.stdout.read()
    assert not any(f"--port {port}" in _cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit())


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:  # it ended meanwhile
        return ""

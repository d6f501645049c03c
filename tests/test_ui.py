"""The MLflow UI in a real browser (Debian chromium, Selenium): a sweep's parent and child runs
are listed on its experiment page."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from qarac_dist import tracking

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytestmark = pytest.mark.integration


def test_parent_and_child_runs_show_on_the_experiment_page(tmp_path, mlflow_server):
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs Debian's chromium and chromium-driver (tests/setup.sh installs them)")
    from mlflow_ui import check_runs_page

    c = tracking.client(mlflow_server.uri)
    exp = tracking.experiment_id(c, "ui_sweep")
    parent = tracking.create_run(c, exp, "ui_sweep", {"sweep": "ui_sweep"})
    names = ["ui_sweep"]
    for i in range(3):
        name = f"trial{i}abc optimizer.lr=0.00{i + 1}"
        tracking.create_run(c, exp, name, {"trial_id": f"trial{i}abc"}, {"optimizer.lr": f"0.00{i + 1}"}, parent)
        names.append(name)
    shot = tmp_path / "ui.png"
    missing = check_runs_page(mlflow_server.uri, exp, names, shot)
    assert missing == [], f"not on the page: {missing}"
    assert shot.stat().st_size > 10_000

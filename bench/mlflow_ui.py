"""The MLflow UI, checked in a real browser: headless Debian chromium driven by Selenium opens a
sweep's experiment page on a running `mlflow server`, expands the parent run, checks that the
parent and every child run are listed and that the trials' logged models show in the Models
column, and saves a screenshot.

    python bench/mlflow_ui.py --store sqlite:///mlflow.db --experiment demo_grid --out bench/results/mlflow_ui.png

tests/integration/test_ui.py runs `check_runs_page` in CI against a store it fills itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUN_NAME_BUTTON = "button[data-component-id*='runnamecellrenderer']"
COLLAPSED = "M7.25 7.25V4.5"
"""The plus drawn on the expand button of a parent whose child runs are hidden."""


def browser():
    import os

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--window-size=1600,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def check_runs_page(server_uri: str, experiment_id: str, run_names: list[str], screenshot: Path,
                    timeout_s: float = 60, num_models: int = 0) -> tuple[list[str], int]:
    """Open the experiment's runs page; return the run names not shown (empty when all are) and
    how many logged models the runs table links to (waiting for `num_models` of them)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        # The experiment's landing page opens on MLflow 3's GenAI overview; the runs table is /runs.
        driver.get(f"{server_uri}/#/experiments/{experiment_id}/runs")
        deadline = time.time() + timeout_s
        missing, models = list(run_names), 0
        while time.time() < deadline:
            text = driver.find_element(By.TAG_NAME, "body").text
            missing = [name for name in run_names if name not in text]
            # A logged model in the Models column is a link to its page, /models/m-<id>.
            models = len({a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/models/m-']")})
            if not missing and models >= num_models:
                break
            # Child runs are nested under their parent (a configuration's seeds under it, one level
            # down), collapsed: the button in a parent's run-name cell expands it and shows a plus
            # while collapsed. Click one at a time: the table is drawn again after each.
            try:
                collapsed = [b for b in driver.find_elements(By.CSS_SELECTOR, RUN_NAME_BUTTON)
                             if COLLAPSED in b.get_attribute("innerHTML")]
                if collapsed:
                    driver.execute_script("arguments[0].click();", collapsed[0])
            except StaleElementReferenceException:
                pass
            time.sleep(1)
        time.sleep(1)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return missing, models
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="backend store of the runs")
    parser.add_argument("--experiment", default="demo_grid")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mlflow_ui.png"))
    parser.add_argument("--port", type=int, default=5055)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=args.store)
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"{args.store}: no experiment {args.experiment!r}; run the sweep first")
    runs = c.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs]
    num_models = sum("best_model_id" in r.data.tags for r in runs)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store,
                               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        missing, models = check_runs_page(f"http://127.0.0.1:{args.port}", exp.experiment_id, names, args.out,
                                          num_models=num_models)
    finally:
        server.terminate()
        server.wait()
    print(f"{len(names) - len(missing)}/{len(names)} runs shown, {models}/{num_models} logged models in the Models "
          f"column; screenshot {args.out}")
    sys.exit(1 if missing or models < num_models else 0)


if __name__ == "__main__":
    main()

"""`python -m qarac_dist.ui runs/<sweep> [runs/<other> ...]`: the MLflow UI on the sweeps' store,
importing what their trials record while it is open (every 10 s), so a sweep on a sqlite store
is live in the UI. Ctrl-C stops both. A sweep tracked by a server is written by its trials
directly: this only says where to look.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .base.layout import SweepLayout
from .base.secrets import redact_text
from .config import UserError
from .submit.sweep_dir import Manifest
from .submit.tracking import import_records
from .track.outbox import is_local_store

EVERY_S = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.ui", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="sweep directories, runs/<sweep>")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port on 127.0.0.1 (default 5000)")
    args = parser.parse_args(argv)
    try:
        return serve([SweepLayout(d) for d in args.sweep_dirs], args.port)
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return err.exit_code


def serve(layouts: list[SweepLayout], port: int) -> int:
    uris = {_manifest(layout).tracking_uri for layout in layouts}
    if len(uris) > 1:
        raise UserError(f"the sweeps are tracked in {len(uris)} stores ({', '.join(sorted(map(redact_text, uris)))});"
                        f" open one store at a time")
    (uri,) = uris
    if not is_local_store(uri):
        print(f"the sweeps' trials write to {redact_text(uri)} themselves: open it there (the experiment's Runs)")
        return 0
    for layout in layouts:  # what is there already, before the UI shows it
        import_records(_manifest(layout), layout, wait=True)
    # The UI's own background jobs would make it a second writer of the store.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],  # one user's UI: one worker, not four
                              env=env, start_new_session=True)  # stopped as a group, below
    print(f"MLflow UI: http://127.0.0.1:{port} (the experiment's Runs); importing the trials' records every "
          f"{EVERY_S:.0f} s; Ctrl-C stops", flush=True)
    try:
        while server.poll() is None:
            time.sleep(EVERY_S)
            for layout in layouts:
                done = import_records(_manifest(layout), layout)
                if done is not None and (done.points or done.events):
                    print(f"{time.strftime('%H:%M:%S')} {layout.root.name}: {done}", flush=True)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its web server's workers with it
        server.wait()
    return server.returncode or 1


def _manifest(layout: SweepLayout) -> Manifest:
    manifest = Manifest.load(layout.root)
    if manifest is None:
        raise UserError(f"{layout.root}: no {layout.manifest.name} here; expected a sweep directory such as "
                        f"runs/<sweep>")
    return manifest


if __name__ == "__main__":
    sys.exit(main())

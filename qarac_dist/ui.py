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
import socket
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
    parser.add_argument("--port", type=_port, default=5000, help="the UI's port on 127.0.0.1 (default 5000)")
    args = parser.parse_args(argv)
    try:
        return serve([SweepLayout(d) for d in args.sweep_dirs], args.port)
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port number, 1 to 65535")
    return int(text)


def serve(layouts: list[SweepLayout], port: int) -> int:
    uris = {_manifest(layout).tracking_uri for layout in layouts}
    if len(uris) > 1:
        shown = ", ".join(sorted(redact_text(u or "none") for u in uris))
        raise UserError(f"the sweeps are tracked in {len(uris)} stores ({shown}); open one store at a time")
    (uri,) = uris
    if not uri:
        raise UserError(f"{layouts[0].root}: the sweep is tracked in no MLflow store")
    if not is_local_store(uri):
        print(f"the sweeps' trials write to {redact_text(uri)} themselves: open it there (the experiment's Runs)")
        return 0
    with socket.socket() as probe:  # a port taken is one line now, not the server's traceback later
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise UserError(f"--port {port}: {err.strerror}; choose another with --port") from None
    for stop in (signal.SIGTERM, signal.SIGHUP):  # a terminal or SSH session closed: as Ctrl-C, the server too
        signal.signal(stop, _interrupt)
    # The UI's own background jobs would make it a second writer of the store.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],  # one user's UI: one worker, not four
                              env=env, start_new_session=True)  # stopped as a group, below
    print(f"MLflow UI: http://127.0.0.1:{port} (the experiment's Runs); importing the trials' records every "
          f"{EVERY_S:.0f} s; Ctrl-C stops", flush=True)
    try:
        while server.poll() is None:  # what is there already first, while the server starts
            for layout in layouts:
                done = import_records(_manifest(layout), layout)
                if done is not None and (done.points or done.events):
                    print(f"{time.strftime('%H:%M:%S')} {layout.root.name}: {done}", flush=True)
            time.sleep(EVERY_S)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its web server's workers with it
        server.wait()
    return server.returncode or 1


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _manifest(layout: SweepLayout) -> Manifest:
    manifest = Manifest.load(layout.root) if layout.root.is_dir() else None
    if manifest is None:
        raise UserError(f"{layout.root}: no {layout.manifest.name} here; expected a sweep directory such as "
                        f"runs/<sweep>")
    return manifest


if __name__ == "__main__":
    sys.exit(main())

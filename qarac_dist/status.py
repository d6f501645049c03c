"""`python -m qarac_dist.status runs/<sweep>`: per trial, the state (from SLURM or the local
process, and the current attempt's own files), attempt, restarts, last step, best metric and
the last error line, earlier attempts' errors included. Exits 1 if any trial failed, 0
otherwise. Imports no torch.

    --sync     send to MLflow what trials could not send (metrics, end of run)
    --repair   rebuild a damaged or missing manifest from sweep.json, the trials' own files
               and MLflow; the damaged file is kept beside it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .base.layout import SweepLayout
from .base.secrets import redact_text
from .config import UserError
from .submit.sweep_dir import FAILED, Manifest, SweepLock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory, runs/<sweep>")
    parser.add_argument("--sync", action="store_true",
                        help="send to MLflow what trials could not send (metrics, end of run)")
    parser.add_argument("--repair", action="store_true",
                        help="rebuild the manifest from the saved sweep, the trials' files and MLflow")
    args = parser.parse_args(argv)
    try:
        return status(args.sweep_dir, args.sync, args.repair)
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return 2


def status(directory: Path, sync: bool = False, repair: bool = False) -> int:
    from .submit import submission, tracking

    layout = SweepLayout(directory)
    lock = SweepLock(directory)
    if not layout.manifest.exists() and not repair:
        hint = "; rebuild it with --repair" if layout.sweep_file.exists() else \
            "; expected a sweep directory such as runs/<sweep>"
        raise UserError(f"{directory}: no {layout.manifest.name} here{hint}")
    try:
        lock.acquire()
    except UserError as held:  # a driver follows this sweep: show its state, change nothing
        if repair or sync:
            raise
        print(f"note: {held}; showing the sweep without updating it", file=sys.stderr)
        lock = None
    try:
        if repair:
            from .submit.repair import repair as rebuild

            manifest = rebuild(directory)
        else:
            manifest = Manifest.load(directory)
        submission.refresh(manifest, submission.attach(manifest.executor, layout))
        if lock is not None:
            manifest.save(directory)
        if sync:
            from .track.mlflow_runs import sync as send

            for r in manifest.trials.values():
                sent, finished = send(Path(r.output_dir))
                if sent or finished:
                    print(f"trial {r.id}: sent {sent} metric points{', finished its run' if finished else ''}")
        if lock is not None:
            tracking.close_parent(manifest, layout)
        from .submit.report import print_summary

        print_summary(manifest, layout)
    finally:
        if lock is not None:
            lock.release()
    return 1 if any(r.state in FAILED for r in manifest.trials.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

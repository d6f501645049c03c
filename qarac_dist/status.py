"""`python -m qarac_dist.status runs/<sweep>`: per trial, the state (from SLURM or the local
process, and the current attempt's own files), attempt, restarts, last step, best metric and
the last error line, earlier attempts' errors included. Exits 1 if any trial failed, 0
otherwise. Imports no torch.

    --sync     send to MLflow what trials could not send (metrics, end of run; into a sqlite
               store, every trial's record imported again: what a run deleted and restored
               since, or a passing error, kept out), and close the sweep's parent run once
               every trial has ended, with the test metrics a final job (final: with SLURM)
               kept for its choice; it (and --repair) also tells a search the result of a
               trial whose runner was killed before it did
Without --sync or --repair it writes nothing in the sweep, except that a sweep whose MLflow
store is a sqlite file has what its trials recorded imported into it (track/store_import.py).
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
        return err.exit_code


def status(directory: Path, sync: bool = False, repair: bool = False) -> int:
    """Show the sweep. Plain `status` reads the manifest and the trials' files, asks the
    scheduler, imports the trials' records into a sqlite store (one writer at a time; skipped
    while another process imports), and prints, so it is safe beside a running driver and on a
    full disk; --repair and --sync write, under the sweep's lock (--sync also closes the sweep's
    MLflow parent run once every trial has ended, when no driver followed it to the end)."""
    from .submit import final, submission, tracking
    from .submit.report import print_summary
    from .submit.states import refresh

    layout = SweepLayout(directory)
    if not layout.manifest.exists() and not repair:
        hint = "; rebuild it with --repair" if layout.sweep_file.exists() else \
            "; expected a sweep directory such as runs/<sweep>"
        raise UserError(f"{directory}: no {layout.manifest.name} here{hint}")
    if repair or sync:
        manifest = _repair_or_sync(layout, repair, sync)
    else:
        manifest = Manifest.load(directory)
        refresh(manifest, submission.attach(manifest.executor, layout).states, layout)
        tracking.import_records(manifest, layout)
    print_summary(manifest, layout)
    if evaluation := final.waiting(manifest, submission.attach(manifest.executor, layout)):
        print(evaluation)
    return 1 if any(r.state in FAILED for r in manifest.trials.values()) else 0


def _repair_or_sync(layout: SweepLayout, repair: bool, sync: bool) -> Manifest:
    from .submit import final, submission, tracking
    from .submit.states import refresh

    lock = SweepLock(layout.root)
    lock.acquire()  # a driver working on the sweep: one line saying who, exit 2
    try:
        if repair:
            from .submit.repair import repair as rebuild

            manifest = rebuild(layout.root, lambda m: refresh(m, submission.attach(m.executor, layout).states,
                                                                         layout))
        else:
            manifest = Manifest.load(layout.root)
        refresh(manifest, submission.attach(manifest.executor, layout).states, layout)
        manifest.save(layout.root)
        if layout.search.exists():  # a result a killed runner never told, from the trial's own verdict
            from .submit.search import tell_ended

            tell_ended(layout, list(manifest.trials.values()), manifest.select_metric, manifest.select_mode)
        if sync:
            from .track.mlflow_runs import sync as send
            from .track.trial_dir import WriterHeld

            tracking.import_records(manifest, layout, wait=True, again=True)  # a sqlite store: all again
            for r in manifest.trials.values():
                try:
                    sent, finished = send(Path(r.output_dir))
                except WriterHeld as running:  # its own job sends what it has
                    print(f"trial {r.id}: not synced: {running}", file=sys.stderr)
                    continue
                if sent or finished:
                    print(f"trial {r.id}: sent {sent} metric points{', finished its run' if finished else ''}")
            tracking.close_parent(manifest, layout)
            tracking.log_final(manifest, final.latest(manifest, layout))
        return manifest
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())

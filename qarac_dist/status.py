"""`python -m qarac_dist.status runs/<sweep>`: per trial, the state (from SLURM or the local
process, and the trial's own files), restarts, last step, best metric and the last error line.
Exits 1 if any trial failed, 0 otherwise. Imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .manifest import FAILED, Manifest
from .sweep import close_parent, print_summary, refresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory, runs/<sweep>")
    parser.add_argument("--sync", action="store_true",
                        help="send to MLflow what trials could not send (metrics, end of run)")
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.sweep_dir)
    if manifest is None:
        print(f"{args.sweep_dir}: no manifest.json here; expected a sweep directory such as runs/<sweep>",
              file=sys.stderr)
        return 2
    refresh(manifest)
    manifest.save(args.sweep_dir)
    if args.sync:
        from .tracking import sync

        for r in manifest.trials.values():
            sent, finished = sync(Path(r.output_dir))
            if sent or finished:
                print(f"trial {r.id}: sent {sent} metric points{', finished its run' if finished else ''}")
    close_parent(manifest)
    print_summary(manifest)
    return 1 if any(r.state in FAILED for r in manifest.trials.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

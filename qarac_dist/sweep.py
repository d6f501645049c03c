"""`python -m qarac_dist.sweep SWEEP.yaml [dotted.key=value ...]`: plan a sweep, submit its
trials (SLURM job arrays, or local processes when there is no SLURM), and follow them.

    --dry-run   print the plan: trials, resources, sbatch text, GPU-hours (imports no torch)
    --wait      follow the trials until they end (the default with the local executor)
    --cancel    cancel the sweep's jobs

Running the same command again submits nothing for trials that are pending, running or
completed; it submits failed, cancelled, timed-out and lost trials again (a new attempt each),
which resume from their newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from typing import Callable, Optional

from .base.secrets import redact_text
from .config import UserError
from .config.sweep import SweepSpec, load_sweep
from .plan import plan
from .submit.executors import resolve_kind
from .submit.sweep_dir import layout_for, read_micro_batches


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        with _cyclic_gc_paused():
            spec, base = load_sweep(args.sweep, args.overrides)
            layout = layout_for(spec)
            trials = plan(spec, base, args.sweep, read_micro_batches(layout.root))
        kind = resolve_kind(spec, args.sweep)
        if args.dry_run:
            from .submit.plan_text import print_plan

            print_plan(spec, trials, kind, args.sweep)
            return 0
        if args.cancel:
            from .submit.cancel import cancel

            return cancel(layout)
        if spec.environment.hub_offline:  # before anything is created: every trial would fail on it
            from .preflight.hub_cache import go_offline, refuse_missing, sweep_configs

            refuse_missing(spec.environment, sweep_configs(spec, trials), args.sweep, args.overrides,
                           spec.final.split if spec.final is not None else None)
            go_offline(spec.environment)
        from .submit import submission

        # The command as the user gave it, for the lines printed to copy (follow, cancel, resume).
        command = ["python", "-m", "qarac_dist.sweep", args.sweep, *args.overrides,
                   *(["--no-preflight"] if args.no_preflight else [])]
        return submission.Submission(spec, base, trials, kind, args.sweep, command, args.wait,
                                     _preflight(spec, args.sweep, args.no_preflight)).run()
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # before any trial was followed (planning, preflight, submitting)
        print("\ninterrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Planning builds a few small acyclic objects per trial; with the cyclic collector running,
    scanning them again and again costs a fifth of a 10,000-trial plan (bench/sweep.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override sweep-file values")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    parser.add_argument("--wait", action="store_true", help="follow the trials until they end")
    parser.add_argument("--cancel", action="store_true", help="cancel the sweep's jobs")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the gradient-flow and consistency checks before submitting")
    return parser


def _preflight(spec: SweepSpec, source: str, skip: bool) -> Optional[Callable]:
    """The audit of the trials about to be submitted (preflight/), or None with --no-preflight."""
    if skip:
        return None

    def audit(records: list) -> tuple[str, bool]:
        from .preflight.audit import audit_sweep

        return audit_sweep(spec, [r.config for r in records], source)

    return audit


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--dry-run | head`: the reader stopped early; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

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
import shutil
import sys
import time
from pathlib import Path

from .config import UserError
from .config.schema import to_dict
from .config.sweep import SweepSpec, load_sweep
from .plan import Trial, plan, select_defaults
from .submit import cluster, driver, sbatch
from .submit.executors import LocalProcesses, SlurmArrays, resolve_executor
from .submit.sweep_dir import DONE, RESUBMIT, Manifest, SweepLock, path_for, read_micro_batches, write_sweep_file
from .track.secrets import redact_text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        with _cyclic_gc_paused():
            spec, base = load_sweep(args.sweep, args.overrides)
            trials = plan(spec, base, args.sweep, read_micro_batches(path_for(spec)))
        executor = resolve_executor(spec, args.sweep)
        if args.dry_run:
            print_plan(spec, trials, executor)
            return 0
        if args.cancel:
            return cancel(path_for(spec))
        return Submission(args, spec, base, trials, executor).run()
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return 2


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


def gpu_hours(spec: SweepSpec, num_trials: int) -> float:
    r = spec.resources
    return num_trials * r.nodes * r.gpus_per_node * r.time_min / 60


def print_plan(spec: SweepSpec, trials: list[Trial], executor: str, shown: int = 50) -> None:
    """The plan as plain text: no wrapping, no markup, so the sbatch scripts copy as they are."""
    print(f"sweep {spec.name}: {len(trials)} trials, executor {executor}")
    width = max([len("trial")] + [len(t.id) for t in trials[:shown]])
    print(f"{'trial':<{width}}  overrides")
    for trial in trials[:shown]:
        print(f"{trial.id:<{width}}  {trial.label}")
    if len(trials) > shown:
        print(f"... and {len(trials) - shown} more trials")
    if spec.set:
        print("every trial also sets: " + redact_text(" ".join(f"{k}={v}" for k, v in spec.set.items())))
    r = spec.resources
    print(f"resources per trial: {r.nodes} node(s) x {r.tasks_per_node} task(s), {r.gpus_per_node} GPU(s)/node, "
          f"{r.cpus_per_task} CPU(s)/task, mem {r.mem_gb or 'default'} GB, {r.time_min} min; "
          f"at most {r.max_parallel} at once")
    print(f"requested GPU-hours: {gpu_hours(spec, len(trials)):.1f}")
    if spec.asha is not None and trials:
        print_rungs(spec, trials)
    if executor == "slurm" or spec.executor != "local":
        size = cluster.max_array_size() if cluster.available() else 1001
        folder = sbatch.submitit_folder(path_for(spec))
        for array in sbatch.arrays(len(trials), size):
            print(f"\n# sbatch script of the array with trials {array.start}..{array.stop - 1}")
            print(sbatch.sbatch_text(spec.resources, sbatch.job_name(spec.name), folder, sys.executable, len(array)))


def print_rungs(spec: SweepSpec, trials: list[Trial]) -> None:
    from collections import Counter

    from .plan.asha import budget

    asha = trials[0].config["asha"]
    groups = Counter((t.config["training"]["max_steps"], tuple(t.config["asha"]["rungs"])) for t in trials)
    most = sum(steps * n for (steps, _), n in groups.items())
    halving = sum(budget(n, steps, list(rungs), asha["reduction_factor"]).halving for (steps, rungs), n in groups.items())
    print(f"successive halving on {asha['mode']} {asha['metric']}: rungs at steps "
          f"{', '.join(map(str, asha['rungs'])) or '(none below max_steps)'}, reduction factor {asha['reduction_factor']}")
    print(f"training steps: at most {most:,} (no trial stopped); about {halving:,} if each rung passes "
          f"1/{asha['reduction_factor']} of the trials reaching it")
    order = "in the order of their ids, a reproducible shuffle" if spec.asha.start == "shuffled" else "in the order listed"
    print(f"trials start {order} (asha.start: {spec.asha.start}); at a rung, a tie on {asha['metric']} goes to the "
          f"lower validation loss")


class Submission:
    """One run of the sweep command past planning, in the order its steps happen: take the
    sweep's lock, read the manifest, decide what to run, check it (sbatch --test-only,
    preflight), write the sweep's files, make the MLflow runs, submit, report, follow."""

    def __init__(self, args, spec: SweepSpec, base: dict, trials: list[Trial], executor: str):
        self.args, self.spec, self.base, self.trials, self.executor = args, spec, base, trials, executor
        self.source = args.sweep
        self.directory = path_for(spec)
        self.lock = SweepLock(self.directory)
        self.submitted = False
        self.preflight_text = None

    def run(self) -> int:
        created = _first_missing(self.directory)
        self.lock.acquire()
        try:
            manifest = self.manifest()
            todo = self.to_run(manifest)
            code = self.check(todo)
            if code:
                self.discard(created)
                return code
            jobs = self.submit(manifest, todo)
        except BaseException:
            self.discard(created)
            raise
        try:
            self.report(manifest, todo)
            if self.executor == "local" or self.args.wait:
                follow(manifest, self.directory, jobs, todo if self.executor == "local" else [],
                       self.spec.resources.max_parallel)
                driver.close_parent(manifest)
                from .summary import print_summary

                best = print_summary(manifest)
                unfinished = [r for r in manifest.trials.values() if r.state not in DONE]
                return 1 if unfinished or best is None else 0
            return 0
        finally:
            self.lock.release()

    def discard(self, created: Path | None) -> None:
        """Nothing was submitted: release the sweep, and leave no directory behind that this
        run created."""
        self.lock.release()
        if created is None or self.submitted:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        for folder in self.directory.parents:  # the folders made for it, while empty (another
            if not folder.is_relative_to(created):  # sweep may be starting beside it)
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def manifest(self) -> Manifest:
        manifest = Manifest.load(self.directory)
        if manifest is None:
            if (self.directory / "sweep.json").exists():
                raise UserError(f"{self.directory}: sweep.json is here but manifest.json is not; rebuild it with "
                                f"python -m qarac_dist.status --repair {self.directory}")
            from .track.mlflow_client import absolute_uri

            metric, mode = select_defaults(self.spec, self.trials)
            return Manifest(self.spec.name, self.executor, metric, mode, tracking_uri=absolute_uri(self.spec.tracking.uri),
                            experiment=self.spec.tracking.experiment or self.spec.name)
        if manifest.executor != self.executor:
            raise UserError(f"{self.source}: executor: {self.directory} was submitted with {manifest.executor}, now "
                            f"{self.executor}; use another sweep name")
        return manifest

    def to_run(self, manifest: Manifest) -> list:
        manifest.trials = driver.records_for(self.trials, self.executor, manifest)
        driver.refresh(manifest)
        planned = {t.id for t in self.trials}
        return [r for r in manifest.trials.values() if r.id in planned and r.state in RESUBMIT]

    def check(self, todo: list) -> int:
        """sbatch --test-only and preflight: 0 when the trials may be submitted."""
        if self.executor == "slurm" and todo:
            text = sbatch.sbatch_text(self.spec.resources, sbatch.job_name(self.spec.name),
                                      sbatch.submitit_folder(self.directory), sys.executable, len(todo))
            refusal = cluster.test_submission(text)
            if refusal:
                raise UserError(f"{self.source}: resources: sbatch refused the job: {refusal}")
        if todo and not self.args.no_preflight:
            self.preflight_text, passed = run_preflight(self.spec, todo, self.source)
            if not passed:
                print(f"{self.source}: preflight failed; nothing submitted (see above; --no-preflight skips it)",
                      file=sys.stderr)
                return 1
        return 0

    def submit(self, manifest: Manifest, todo: list):
        from .track.sweep_runs import log_text, trial_params

        self.directory.mkdir(parents=True, exist_ok=True)
        write_sweep_file(self.directory, to_dict(self.spec), self.base, str(self.source), self.trials)
        manifest.save(self.directory)
        driver.ensure_runs(manifest, todo, {r.id: trial_params(r.config) for r in todo}, varied_keys(self.spec))
        manifest.save(self.directory)
        if self.preflight_text is not None:
            try:
                log_text(manifest.tracking_uri, manifest.mlflow_parent_run_id, self.preflight_text, "preflight.txt")
            except Exception as err:  # noqa: BLE001 - the report was printed; MLflow may lag
                print(f"qarac_dist: could not log the preflight report to MLflow: {type(err).__name__}", file=sys.stderr)
        if self.executor == "slurm":
            jobs = SlurmArrays(self.directory, self.spec.resources, self.spec.name, self.spec.max_requeues)
            if todo:
                self.submitted = True
                driver.submit_records(manifest, self.directory, jobs, todo)
            return jobs
        return LocalProcesses(self.directory, self.spec.resources)  # runs now, in `follow`

    def report(self, manifest: Manifest, todo: list) -> None:
        print(f"sweep {self.spec.name}: {len(self.trials)} trials, {len(todo)} to run, "
              f"{len(self.trials) - len(todo)} already pending, running or completed; directory {self.directory}")
        if self.executor == "slurm" and todo:
            arrays: dict[str, int] = {}
            for r in todo:
                arrays[r.job_id.split("_")[0]] = arrays.get(r.job_id.split("_")[0], 0) + 1
            for job, count in arrays.items():
                print(f"submitted: SLURM job {job}, an array of {count} trial(s)" if count > 1 else
                      f"submitted: SLURM job {job}")
            if not self.args.wait:
                print(f"follow:    python -m qarac_dist.sweep {self.source} --wait\n"
                      f"status:    python -m qarac_dist.status {self.directory}\n"
                      f"results:   {mlflow_ui_command(manifest.tracking_uri)}")


def _first_missing(directory: Path) -> Path | None:
    """The outermost folder of `directory`'s path that does not exist yet (None: it exists)."""
    missing = None
    for folder in [directory, *directory.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def varied_keys(spec: SweepSpec) -> list[str]:
    """The keys the sweep varies between trials: grid, variants and random search."""
    keys = set(spec.grid) | {k for v in spec.variants for k in v.set}
    if spec.random:
        keys |= set(spec.random.params)
    return sorted(keys)


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}  (then open the experiment's Runs)"
    return f"open {redact_text(uri)} (the experiment's Runs)"


def run_preflight(spec: SweepSpec, records: list, source: str) -> tuple[str, bool]:
    """Audit each distinct architecture among the trials to submit; print and return the report."""
    import io

    from .config import config_from_dict
    from .preflight.audit import print_result, run_many

    configs = [config_from_dict(r.config, source) for r in records]
    try:
        results = run_many(configs, spec.resources.world_size, spec.resources)
    except UserError as err:
        raise UserError(f"{source}: preflight: {err}") from None
    out = io.StringIO()
    for result in results:
        print_result(result, out)
    print(out.getvalue(), end="")
    return out.getvalue(), all(r.ok for r in results)


def follow(manifest: Manifest, directory: Path, jobs, queued: list, max_parallel: int, poll_s: float = 2.0) -> None:
    """Follow the trials until none is pending or running; with the local executor, start
    queued trials as slots free up (at most `max_parallel` at once)."""
    from rich.console import Console
    from rich.live import Live

    from .summary import progress_table

    console = Console(width=200)
    local = jobs if isinstance(jobs, LocalProcesses) else None
    queue = list(queued)
    last_states: dict[str, str] = {}
    with Live(console=console, auto_refresh=False, transient=True) as live:
        while True:
            driver.refresh(manifest, local)
            if queue:
                running = sum(r.active for r in manifest.trials.values())
                start = queue[: max(0, max_parallel - running)]
                queue = queue[len(start):]
                if start:
                    driver.submit_records(manifest, directory, jobs, start)
                    continue
            manifest.save(directory)
            states = {r.id: r.state for r in manifest.trials.values()}
            if console.is_terminal:
                live.update(progress_table(manifest), refresh=True)
            else:
                for tid, state in states.items():
                    if last_states.get(tid) != state:
                        print(f"trial {tid} [{manifest.trials[tid].label}]: {state}", flush=True)
            last_states = states
            if not queue and manifest.all_ended():
                return
            time.sleep(poll_s)


def cancel(directory: Path) -> int:
    manifest = Manifest.load(directory)
    if manifest is None:
        raise UserError(f"{directory}: no sweep here")
    lock = SweepLock(directory)
    try:
        lock.acquire()
    except UserError:  # a driver follows the sweep: it records the cancellation itself
        lock = None
    try:
        driver.refresh(manifest)
        cancelled = driver.cancel(manifest)
        if lock is not None:
            manifest.save(directory)
    finally:
        if lock is not None:
            lock.release()
    print(f"cancelled {len(cancelled)} trial(s) of {manifest.sweep}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `--dry-run | head`: the reader stopped early; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

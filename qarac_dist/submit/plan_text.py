"""What `--dry-run` prints: the trials, the resources, the GPU-hours and the exact sbatch
scripts, as plain text (no wrapping, no markup, so the scripts copy as they are)."""

from __future__ import annotations

import dataclasses

import shlex
import sys
from collections import Counter

from ..base.secrets import redact_text
from ..config.sweep import SweepSpec
from ..plan import Trial, select_defaults
from ..plan.asha import budget
from . import claims, cluster, environment, sbatch
from .pack import srun_command
from .search import check_record, warm_start
from .sweep_dir import Manifest, layout_for, same_record


def print_plan(spec: SweepSpec, trials: list[Trial], kind: str, source: str, shown: int = 50) -> None:
    # Checked before anything is printed, as the run checks them: one line, exit 2.
    select = select_defaults(spec, trials)
    manifest = Manifest.load(layout_for(spec).root)
    if manifest is not None:
        same_record(manifest, layout_for(spec), spec, select, source)
        if spec.search is not None:
            check_record(layout_for(spec), spec.search)
    told = warm_start(spec.search, *select)[1] if spec.search is not None else ""
    seeds = f" ({len(trials) // spec.repeats} configurations x {spec.repeats} seeds, chosen by the mean)" \
        if spec.repeats > 1 else ""
    print(f"sweep {spec.name}: {len(trials)} trials{seeds}, executor {kind}")
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
    if spec.search is not None:
        print_search(spec, told)
    if spec.trials_as_steps():
        job = sbatch.job_resources(r)
        step = "an srun step" if kind == "slurm" else "started by the job's runner"
        print(f"packed: {r.pack} trial(s) per job, each {step} on its share; "
              f"{sbatch.num_jobs(r, len(trials), True)} job(s) of {job.nodes} node(s) x {job.tasks_per_node} task(s), "
              f"{job.gpus_per_node} GPU(s)/node, {r.time_min} min each, starting the next waiting trial as one ends")
    allocations = " at most (the allocations)" if spec.trials_as_steps() else ""
    requested = sbatch.requested_hours(spec.resources, len(trials), spec.trials_as_steps())
    print(f"requested GPU-hours: {requested['gpu_hours']:.1f}{allocations}; CPU-hours: {requested['cpu_hours']:.1f}")
    if spec.asha is not None and trials:
        print_rungs(spec, trials)
    if spec.final is not None:
        where = "a SLURM job of one task after every job of the sweep, afterany" if kind == "slurm" else \
            "here, after the last trial"
        models = "best model of each seed is"
        if spec.final.retrain:
            again = sbatch.requested_hours(dataclasses.replace(spec.resources, pack=1), spec.repeats, False)
            models = (f"{spec.repeats} seed(s), each trained again on train + validation for its best model's steps "
                      f"(a trial's job each, {'an array held by afterany on the sweep' if kind == 'slurm' else 'here'}; "
                      f"at most {again['gpu_hours']:.1f} GPU-hours, {again['cpu_hours']:.1f} CPU-hours more), are")
            where = where.replace("after every job of the sweep", "after them")
        print(f"final: once the sweep has chosen, the chosen configuration's {models} evaluated once "
              f"on the split {spec.final.split!r}, which no trial reads ({where})")
    if kind == "slurm" or spec.executor != "local":
        size = cluster.max_array_size() if cluster.available() else 1001
        folder = sbatch.job_folder(layout_for(spec).submitit)
        bad = claims.bad_nodes(layout_for(spec))
        for nodes, why in bad.items():
            print(f"excluded: {nodes} ({why}); delete {layout_for(spec).bad_nodes} to allow them again")
        r = sbatch.excluding(r, bad)
        run = environment.launch(spec.environment, environment.trial_paths(layout_for(spec).root, trials,
                                                                           spec.tracking.uri), source=source)
        job = environment.job_parameters(spec.environment, r.extra_sbatch, run, spec.trials_as_steps(), shown=True)
        if spec.trials_as_steps():
            print(f"\n# sbatch script of the jobs that run the {len(trials)} trials as steps")
            print(sbatch.sbatch_text(r, sbatch.job_name(spec.name), folder, shlex.quote(sys.executable),
                                     sbatch.num_jobs(r, len(trials), True), True, job))
            print(f"# each trial's step: {shlex.join(srun_command(spec.resources, run))}")
            return
        for array in sbatch.arrays(len(trials), size):
            print(f"\n# sbatch script of the array with trials {array.start}..{array.stop - 1}")
            print(sbatch.sbatch_text(r, sbatch.job_name(spec.name), folder, shlex.join(run.python), len(array),
                                     job=job))


def print_search(spec: SweepSpec, told: str) -> None:
    """The search's sampler and space; `told`: what a warm start tells the sampler first."""
    search = spec.search
    each = f"{search.trials} trials, each given its values when a job starts it" if spec.repeats == 1 else \
        f"{search.trials} configurations x {spec.repeats} seeds, each configuration given its values when its first " \
        f"seed starts"
    mean = "" if spec.repeats == 1 else ", and told the mean over its seeds once all have ended"
    print(f"model-based search: Optuna's {search.sampler} sampler (seed {search.seed}), {each}, from every result "
          f"recorded before{mean}")
    for key, d in search.params.items():
        where = f"one of {d.values}" if d.distribution == "choice" else f"[{d.low:g}, {d.high:g}]"
        print(f"  {key}: {d.distribution} {where}")
    if told:
        print(f"  {told}")


def print_rungs(spec: SweepSpec, trials: list[Trial]) -> None:
    asha = trials[0].config["asha"]
    most = sum(t.config["training"]["max_steps"] for t in trials)
    # With repeats a rung passes configurations, each with all its seeds: counted by first seeds.
    groups = Counter((t.config["training"]["max_steps"], tuple(t.config["asha"]["rungs"])) for t in trials
                     if t.configuration in (None, t.id))
    halving = spec.repeats * sum(budget(n, steps, list(rungs), asha["reduction_factor"]).halving
                                 for (steps, rungs), n in groups.items())
    print(f"successive halving on {asha['mode']} {asha['metric']}: rungs at steps "
          f"{', '.join(map(str, asha['rungs'])) or '(none below max_steps)'}, reduction factor {asha['reduction_factor']}")
    passed = "trials" if spec.repeats == 1 else f"configurations ({spec.repeats} seeds each, decided on their mean)"
    print(f"training steps: at most {most:,} (no trial stopped); about {halving:,} if each rung passes "
          f"1/{asha['reduction_factor']} of the {passed} reaching it")
    if spec.search is not None:  # slots start in order; each is asked for when it starts
        return
    order = "in the order of their ids, a reproducible shuffle" if spec.asha.start == "shuffled" else "in the order listed"
    print(f"trials start {order} (asha.start: {spec.asha.start}); at a rung, a tie on {asha['metric']} goes to the "
          f"lower validation loss")

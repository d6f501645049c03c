"""The planner: sweep spec -> trials, with no I/O, no clock and no randomness but a seeded
generator. A trial's id is a hash of its resolved training config, so planning the
same file again gives the same ids.

Trials are the product variants x grid points x random samples; each trial's overrides are
the sweep's `set`, then the variant's, the grid point's and the sample's (no key may be set by
two of the last three).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import dataclasses
import random as _random
from dataclasses import dataclass
from typing import Optional

from ..base.layout import SweepLayout
from ..config import ConfigError
from ..config.choice import final_problem
from ..config.rules import against_direction
from ..config.sections import METRIC_MODES, TASK_METRICS
from ..config.sweep import RandomSearch, SweepSpec
from . import micro_batch
from .asha import rung_steps
from .seeds import repeat_seeds
from .resolve import ADDED_OFF, MOVED_OUT, NOT_IDENTITY, TEST_SPLIT, Resolver, in_id


@dataclass(frozen=True)
class Trial:
    id: str
    """Short stable hash of the resolved training config (output directory excluded)."""
    label: str
    """Human-readable: variant and the values set by the grid and sampler."""
    overrides: dict
    """Dotted key -> value, as applied on top of the base config."""
    config: dict
    """The resolved training config, output.dir pointing at the trial's directory. Trials share
    the sections they do not change: read-only."""
    slot: Optional[int] = None
    """A model-based search's slot: its searched values are asked for when a job starts it
    (submit/search.py); `config` holds everything else. With repeats, the slot of every seed
    of one configuration."""
    configuration: Optional[str] = None
    """With repeats: the configuration this trial is a seed of (the id of its first seed's
    trial); None without (each trial is its own configuration)."""


# ---------------------------------------------------------------- planning (pure)

def sample(random_spec: Optional[RandomSearch]) -> list[dict]:
    """The random-search samples, drawn from a generator seeded by the spec alone."""
    if random_spec is None or not random_spec.params:
        return [{}]
    rng = _random.Random(random_spec.seed)
    samples = []
    for _ in range(random_spec.num_samples):
        values = {}
        for key in sorted(random_spec.params):
            d = random_spec.params[key]
            if d.distribution == "choice":
                values[key] = d.values[rng.randrange(len(d.values))]
            elif d.distribution == "uniform":
                values[key] = rng.uniform(d.low, d.high)
            elif d.distribution == "loguniform":
                values[key] = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            else:
                values[key] = rng.randint(int(d.low), int(d.high))
        samples.append(values)
    return samples


def varied_keys(spec: SweepSpec) -> list[str]:
    """The keys the sweep varies between trials: grid, variants, random and model-based search."""
    keys = set(spec.grid) | {k for v in spec.variants for k in v.set}
    if spec.random:
        keys |= set(spec.random.params)
    if spec.search:
        keys |= set(spec.search.params)
    return sorted(keys)


def trial_id(resolved: dict) -> str:
    """A trial's id: a hash of its resolved config, less where it writes and is tracked. The
    definition; the planner computes the same from its cached sections (plan/resolve.py)."""
    identity = {**resolved, "tracking": None}
    for section in NOT_IDENTITY.keys() | MOVED_OUT.keys() | ADDED_OFF.keys():
        if isinstance(resolved.get(section), dict):
            identity[section] = {**resolved[section], **{k: None for k in (*NOT_IDENTITY.get(section, ()),
                                                                             *MOVED_OUT.get(section, ()))}}
            for k in ADDED_OFF.get(section, ()):
                if identity[section].get(k) is None:
                    identity[section].pop(k, None)
    if isinstance(resolved.get("data"), dict):
        identity["data"] = {k: in_id("data", k, v) for k, v in identity["data"].items() if ("data", k) != TEST_SPLIT}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def plan(spec: SweepSpec, base: dict, source: str = "sweep", micro_batches: dict | None = None) -> list[Trial]:
    """Expand the sweep into trials. Raises ConfigError (naming `source`) for a plan over the
    cap, conflicting keys, or trial configs that do not validate. `micro_batches` holds what
    `--find-batch-size` found (see micro_batch.py); it is applied before a trial's id is taken."""
    world = spec.resources.world_size
    total = spec.num_trials()
    if total > spec.max_trials:  # before anything proportional to it is built
        raise ConfigError([f"{source}: max_trials: the plan has {total:,} trials, over the cap of {spec.max_trials:,} "
                           f"(raise max_trials to allow it)"])
    grid_keys = sorted(spec.grid)
    variants = spec.variants or [None]
    samples = sample(spec.random)
    errors: list[str] = []
    trial_errors: list[tuple[str, str]] = []  # (trial label, problem)
    trials: dict[str, Trial] = {}
    layout = SweepLayout.of(spec.runs_dir, spec.name)
    trials_dir = str(layout.trials) + "/"
    varied = set(varied_keys(spec))
    extra = {"training.micro_batch_size", "training.gradient_accumulation_steps", "asha"}
    if spec.repeats > 1:
        extra.add("training.seed")
    resolver = Resolver(base, varied | extra)
    if spec.search is not None:
        return _slots(spec, resolver, trials_dir, source)
    checked: dict[tuple, list[str]] = {}
    for variant in variants:  # a key set by two of variant, grid and sampler: the same for all their trials
        seen: dict[str, str] = {}
        for where, keys in [("variant " + variant.name, variant.set) if variant else ("", {}), ("grid", grid_keys),
                            ("random", sorted(spec.random.params) if spec.random else ())]:
            for key in keys:
                if key in seen:
                    errors.append(f"{source}: {key}: set by both {seen[key]} and {where}")
                seen[key] = where
    for variant, values, drawn in itertools.product(variants, itertools.product(*(spec.grid[k] for k in grid_keys)), samples):
        point = dict(zip(grid_keys, values))
        overrides = {**spec.set, **(variant.set if variant else {}), **point, **drawn}
        label = " ".join(filter(None, [variant.name if variant else "",
                                       *(f"{k}={_short(v)}" for k, v in {**point, **drawn}.items())])) or "base"
        try:
            resolved, tid = resolver.resolve(overrides)
            if spec.final is not None and (problem := final_problem(spec.final, resolved)):
                raise ConfigError([problem])
            found = micro_batch.found(resolved, micro_batches, world) if micro_batches else {}
            if found:
                label += f" (found micro batch {found['training.micro_batch_size']})"
            asha = {"asha": successive_halving(spec, resolved["training"]["max_steps"], resolved["evaluation"])} \
                if spec.asha else {}
            rungs = tuple(asha["asha"]["rungs"]) if asha else None
            key = (resolved["model"]["task"], resolved["evaluation"]["every_steps"], rungs,
                   resolved["evaluation"]["metric"])
            problems = checked.get(key)
            if problems is None:  # a few distinct answers per sweep: worked out once each
                problems = checked[key] = _sweep_problems(spec, source, *key)
            if problems:
                errors += problems
                continue
            if found or asha:
                resolved, tid = resolver.resolve({**overrides, **found, **asha})
        except ConfigError as err:
            trial_errors.extend((label, e) for e in err.errors)
            continue
        if tid in trials:
            errors.append(f"{source}: trials [{trials[tid].label}] and [{label}] resolve to the same config")
            continue
        if spec.repeats == 1:
            trials[tid] = _trial(spec.name, trials_dir, tid, label, overrides, resolved)
            continue
        for k, seed in enumerate(repeat_seeds(resolved["training"]["seed"], spec.repeats)):
            seeded, seed_id = (resolved, tid) if k == 0 else \
                resolver.resolve({**overrides, **found, **asha, "training.seed": seed})
            trials[seed_id] = _trial(spec.name, trials_dir, seed_id, f"{label} seed {seed}",
                                     {**overrides, "training.seed": seed}, seeded, configuration=tid)
    errors += _by_problem(source, trial_errors)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    if spec.asha is not None and spec.asha.start == "shuffled":  # why: plan/asha.py
        return sorted(trials.values(), key=lambda t: t.id)
    return list(trials.values())


def _trial(sweep: str, trials_dir: str, tid: str, label: str, overrides: dict, resolved: dict,
           configuration: Optional[str] = None) -> Trial:
    resolved["name"] = f"{sweep}-{tid}"  # resolve() returns a fresh top-level dict
    resolved["output"] = {**resolved["output"], "dir": trials_dir + tid}
    return Trial(tid, label, overrides, resolved, configuration=configuration)


def _slots(spec: SweepSpec, resolver: Resolver, trials_dir: str, source: str) -> list[Trial]:
    """A model-based search's trials: `search.trials` slots, each the base config with the
    sweep's `set`, given its searched values when a job starts it. With repeats a slot is a
    configuration: K trials, its seeds, that share one ask (submit/search.py); its first seed
    keeps the id the slot has without repeats. Each searched key is tried
    here at the ends of its range (every value of a choice), so a value the config cannot take
    is found before anything is spent."""
    overrides = dict(spec.set)
    try:
        resolved, tid = resolver.resolve(overrides)
        asha = {"asha": successive_halving(spec, resolved["training"]["max_steps"], resolved["evaluation"])} \
            if spec.asha else {}
        problems = _sweep_problems(spec, source, resolved["model"]["task"], resolved["evaluation"]["every_steps"],
                                   tuple(asha["asha"]["rungs"]) if asha else None, resolved["evaluation"]["metric"])
        if spec.final is not None and (problem := final_problem(spec.final, resolved)):
            problems.append(f"{source}: {problem}")
        if problems:
            raise ConfigError(problems)
        resolved, tid = resolver.resolve({**overrides, **asha})
    except ConfigError as err:
        raise ConfigError([e if e.startswith(source) else f"{source}: {e}" for e in err.errors]) from None
    errors = []
    for key, d in spec.search.params.items():
        ends = d.values if d.distribution == "choice" else [int(d.low), int(d.high)] if d.distribution == "randint" \
            else [d.low, d.high]
        for value in ends:
            try:
                resolver.resolve({**overrides, **asha, key: value})
            except ConfigError as err:
                errors.append(f"{source}: search.params.{key}: at {value!r}: {err.errors[0]}")
                break
    if errors:
        raise ConfigError(errors)
    space = {"base": tid, "sampler": spec.search.sampler, "seed": spec.search.seed,
             "params": {k: dataclasses.asdict(d) for k, d in spec.search.params.items()}}
    if spec.repeats == 1:
        seeded = {None: resolved}
    else:  # a seed differs from its siblings in training.seed alone
        first, *others = repeat_seeds(resolved["training"]["seed"], spec.repeats)
        seeded = {first: resolved, **{seed: resolver.resolve({**overrides, **asha, "training.seed": seed})[0]
                                      for seed in others}}
    slots = []
    for k in range(spec.search.trials):
        sid = hashlib.sha256(json.dumps({**space, "slot": k}, sort_keys=True).encode()).hexdigest()[:10]
        for n, (seed, of_seed) in enumerate(seeded.items()):
            tid = sid if n == 0 else hashlib.sha256(json.dumps({**space, "slot": k, "seed": seed},
                                                               sort_keys=True).encode()).hexdigest()[:10]
            config = {**of_seed, "name": f"{spec.name}-{tid}", "output": {**of_seed["output"], "dir": trials_dir + tid}}
            if seed is None:
                slots.append(Trial(tid, f"slot {k}", overrides, config, slot=k))
            else:
                slots.append(Trial(tid, f"slot {k} seed {seed}", {**overrides, "training.seed": seed}, config, slot=k,
                                   configuration=sid))
    return slots


def _by_problem(source: str, trial_errors: list[tuple[str, str]]) -> list[str]:
    """One line per problem, naming the first trial that has it and how many more do."""
    labels: dict[str, list[str]] = {}
    for label, problem in trial_errors:
        labels.setdefault(problem, []).append(label)
    return [f"{source}: trial [{names[0]}]{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {problem}"
            for problem, names in labels.items()]


def successive_halving(spec: SweepSpec, max_steps: int, evaluation: dict) -> dict:
    """A trial's `asha` section: its rungs and the sweep's select metric. Where the record is
    travels in the job's context."""
    metric, mode = select_defaults(spec, [], evaluation)
    return {"rungs": rung_steps(spec.asha.grace_steps, spec.asha.reduction_factor, max_steps),
            "reduction_factor": spec.asha.reduction_factor, "metric": metric, "mode": mode}


def _sweep_problems(spec: SweepSpec, source: str, task: str, every: int, rungs: Optional[tuple],
                    evaluation_metric: str) -> list[str]:
    """What the sweep's own keys ask of a trial that its config cannot give, named by those keys."""
    problems = []
    metric = spec.select.metric
    if metric is not None and metric not in TASK_METRICS[task]:
        problems.append(f"{source}: select.metric: {metric!r} is not logged by a {task} trial; it logs "
                        f"{', '.join(TASK_METRICS[task])}")
    metric, mode = select_defaults(spec, [], {"metric": evaluation_metric, "mode": spec.select.mode})
    problems += [f"{source}: {problem}" for problem in against_direction("select.mode", metric, mode)]
    if rungs is not None:
        off = [step for step in rungs if step % every]
        if off:
            problems.append(f"{source}: asha.grace_steps: a rung falls at step {off[0]}, but the trials validate "
                            f"every {every} steps (evaluation.every_steps); make grace_steps a multiple of it")
    return problems


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def select_defaults(spec: SweepSpec, trials: list[Trial], evaluation: dict | None = None) -> tuple[str, str]:
    """The metric and mode that pick the best trial (default: the trials' own evaluation
    metric, and the direction that metric is better in)."""
    evaluation = evaluation or (trials[0].config["evaluation"] if trials else {"metric": "loss", "mode": "min"})
    metric = spec.select.metric or evaluation["metric"]
    return metric, spec.select.mode or METRIC_MODES.get(metric) or evaluation["mode"]

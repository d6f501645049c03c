"""The sweep file and the planner: sweep file -> trials, with no I/O, no clock and no randomness
but a seeded generator. A trial's id is a hash of its resolved training config, so planning the
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
import random as _random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from . import batchsize
from .config import TrainConfig, config_from_dict, config_to_dict
from .schema import ConfigError, apply_overrides, build, field_types, parse_overrides, read_yaml


@dataclass
class Distribution:
    distribution: Literal["uniform", "loguniform", "choice", "randint"]
    """uniform and loguniform draw a float in [low, high); randint an integer in [low, high];
    choice one of `values`."""
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list] = None


@dataclass
class RandomSearch:
    num_samples: int = 1
    """Samples drawn, each crossed with every grid point and variant."""
    seed: int = 0
    """Seed of the sampler: the same seed gives the same values."""
    params: dict = field(default_factory=dict)
    """Dotted training-config key -> {distribution, low, high | values}."""


@dataclass
class Variant:
    name: str
    """Shown in tables and MLflow."""
    set: dict = field(default_factory=dict)
    """Dotted training-config key -> value."""


@dataclass
class Resources:
    nodes: int = 1
    """Nodes per trial."""
    tasks_per_node: int = 1
    """Processes (ranks) per node; one per GPU on GPU nodes."""
    gpus_per_node: int = 0
    """GPUs per node."""
    cpus_per_task: int = 1
    """CPU cores per process."""
    mem_gb: Optional[float] = None
    """Memory per node in GB (SLURM --mem); null leaves it to the cluster's default."""
    time_min: int = 60
    """Time limit per trial, minutes."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpu_memory_gb: Optional[float] = None
    """Memory of one GPU, for preflight's memory plan."""
    extra_sbatch: dict = field(default_factory=dict)
    """More sbatch options, e.g. {exclusive: true, reservation: my_res}."""
    max_parallel: int = 4
    """Trials running at once (the job array's %parallelism)."""


@dataclass
class Select:
    metric: Optional[str] = None
    """Validation metric that picks the best trial; default: the training config's evaluation.metric."""
    mode: Optional[Literal["max", "min"]] = None
    """max or min; default: the training config's evaluation.mode."""


@dataclass
class Tracking:
    uri: Optional[str] = None
    """MLflow tracking URI; default sqlite:///mlflow.db in the working directory."""
    experiment: Optional[str] = None
    """MLflow experiment; default: the sweep's name."""


@dataclass
class SweepSpec:
    name: str
    """Name of the sweep: its directory is `<runs_dir>/<name>`."""
    base: Union[str, dict]
    """The training config: a path (relative to the sweep file) or an inline mapping."""
    set: dict = field(default_factory=dict)
    """Overrides applied to every trial."""
    grid: dict = field(default_factory=dict)
    """Dotted training-config key -> list of values; the cartesian product is taken."""
    variants: list[Variant] = field(default_factory=list)
    """Named override sets, each crossed with the grid."""
    random: Optional[RandomSearch] = None
    """Random search over distributions, sampled here, at plan time."""
    resources: Resources = field(default_factory=Resources)
    select: Select = field(default_factory=Select)
    tracking: Tracking = field(default_factory=Tracking)
    executor: Literal["auto", "slurm", "local"] = "auto"
    """slurm, local, or auto: slurm when sbatch is on PATH."""
    max_trials: int = 1000
    """Refuse plans with more trials than this."""
    runs_dir: str = "runs"
    """Where sweep directories go."""
    max_requeues: int = 3
    """Times a trial is requeued after preemption or its time limit."""


@dataclass(frozen=True)
class Trial:
    id: str
    """Short stable hash of the resolved training config (output directory excluded)."""
    label: str
    """Human-readable: variant and the values set by the grid and sampler."""
    overrides: dict
    """Dotted key -> value, as applied on top of the base config."""
    config: dict
    """The resolved training config, output.dir pointing at the trial's directory."""


# ---------------------------------------------------------------- loading

def _flatten_keys(mapping: dict, leaf=lambda v: not isinstance(v, dict), prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if leaf(value) or not value:
            out[dotted] = value
        else:
            out.update(_flatten_keys(value, leaf, dotted))
    return out


def _is_distribution(value) -> bool:
    return not isinstance(value, dict) or "distribution" in value


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepSpec, dict]:
    """Read and validate a sweep file; returns the spec and the base training config dict."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), parse_overrides(list(overrides)))
    errors: list[str] = []
    spec = build(SweepSpec, data, "", errors)
    if spec is None or errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    spec.set = _flatten_keys(spec.set)
    spec.grid = _flatten_keys(spec.grid, leaf=lambda v: not isinstance(v, dict))
    for variant in spec.variants:
        variant.set = _flatten_keys(variant.set)
    if spec.random is not None:
        flat = _flatten_keys(spec.random.params, leaf=_is_distribution)
        spec.random.params = {}
        for key, value in flat.items():
            dist = build(Distribution, value, f"random.params.{key}", errors) if isinstance(value, dict) else None
            if not isinstance(value, dict):
                errors.append(f"random.params.{key}: expected a mapping with a distribution, got {value!r}")
            spec.random.params[key] = dist
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
        try:
            base = read_yaml(base_path)
        except ConfigError as err:
            errors.append(f"base: {err.errors[0]}")
            base = {}
    else:
        base = spec.base
    _check_spec(spec, errors)
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return spec, base


def _check_key(key: str) -> Optional[str]:
    """Why `key` is not a training-config key, or None when it is."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        types = field_types(cls)
        if part not in types:
            where = ".".join(parts[:i]) or "the top level"
            return f"not a key of the training config ({'.'.join(parts[: i + 1])}: valid keys of {where}: {', '.join(sorted(types))})"
        cls = types[part]
        if field_types(cls) is None:  # a leaf, or a free-form mapping such as model.config
            if i < len(parts) - 1 and not _is_mapping(cls):
                return f"not a key of the training config ({'.'.join(parts[: i + 1])} is a value, not a section)"
            return None
    return None


def _is_mapping(tp) -> bool:
    import typing

    return tp is dict or typing.get_origin(tp) is dict or any(
        a is dict or typing.get_origin(a) is dict for a in typing.get_args(tp))


def _check_spec(spec: SweepSpec, errors: list[str]) -> None:
    for key, values in spec.grid.items():
        if not isinstance(values, list):
            errors.append(f"grid.{key}: expected a list of values, got {values!r}")
        elif not values:
            errors.append(f"grid.{key}: empty list; give at least one value or remove the key")
    keyed = [("set", spec.set), ("grid", spec.grid)]
    keyed += [(f"variants[{i}].set", v.set) for i, v in enumerate(spec.variants)]
    if spec.random:
        keyed.append(("random.params", spec.random.params))
    for section, mapping in keyed:
        for key in mapping:
            problem = _check_key(key)
            if problem:
                errors.append(f"{section}.{key}: {problem}")
    names = [v.name for v in spec.variants]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"variants: the name {name!r} is used twice")
    if spec.random:
        if spec.random.num_samples < 1:
            errors.append(f"random.num_samples: expected at least 1, got {spec.random.num_samples}")
        for key, dist in spec.random.params.items():
            if dist is None:
                continue
            where = f"random.params.{key}"
            if dist.distribution == "choice":
                if not dist.values:
                    errors.append(f"{where}.values: choice needs a non-empty list of values")
            elif dist.low is None or dist.high is None:
                errors.append(f"{where}: {dist.distribution} needs low and high")
            elif not dist.low < dist.high and not (dist.distribution == "randint" and dist.low == dist.high):
                errors.append(f"{where}: low ({dist.low}) must be below high ({dist.high})")
            elif dist.distribution == "loguniform" and dist.low <= 0:
                errors.append(f"{where}.low: loguniform needs low > 0, got {dist.low}")
    r = spec.resources
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "max_parallel"):
        if getattr(r, key) < 1:
            errors.append(f"resources.{key}: expected at least 1, got {getattr(r, key)}")
    if r.gpus_per_node < 0:
        errors.append(f"resources.gpus_per_node: expected 0 or more, got {r.gpus_per_node}")
    if spec.max_trials < 1:
        errors.append(f"max_trials: expected at least 1, got {spec.max_trials}")
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        errors.append(f"name: expected a plain directory name, got {spec.name!r}")


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


def trial_id(resolved: dict) -> str:
    # Where a trial writes and where it is tracked are not what it is.
    identity = {**resolved, "output": {**resolved["output"], "dir": None}, "tracking": None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def plan(spec: SweepSpec, base: dict, source: str = "sweep", micro_batches: dict | None = None) -> list[Trial]:
    """Expand the sweep into trials. Raises ConfigError (naming `source`) for a plan over the
    cap, conflicting keys, or trial configs that do not validate. `micro_batches` holds what
    `--find-batch-size` found (see batchsize.py); it is applied before a trial's id is taken."""
    world = spec.resources.nodes * spec.resources.tasks_per_node
    grid_keys = sorted(spec.grid)
    num_points = math.prod(len(spec.grid[k]) for k in grid_keys) if grid_keys else 1
    variants = spec.variants or [None]
    samples = sample(spec.random)
    total = len(variants) * num_points * len(samples)
    if total > spec.max_trials:
        raise ConfigError([f"{source}: max_trials: the plan has {total} trials, over the cap of {spec.max_trials} "
                           f"(raise max_trials to allow it)"])
    errors: list[str] = []
    trials: dict[str, Trial] = {}
    sweep_dir = Path(spec.runs_dir) / spec.name
    for variant, values, drawn in itertools.product(variants, itertools.product(*(spec.grid[k] for k in grid_keys)), samples):
        point = dict(zip(grid_keys, values))
        parts = [("variant " + variant.name, variant.set) if variant else ("", {}), ("grid", point), ("random", drawn)]
        seen: dict[str, str] = {}
        for where, mapping in parts:
            for key in mapping:
                if key in seen:
                    errors.append(f"{source}: {key}: set by both {seen[key]} and {where}")
                seen[key] = where
        overrides = {**spec.set, **(variant.set if variant else {}), **point, **drawn}
        label = " ".join(filter(None, [variant.name if variant else "",
                                       *(f"{k}={_short(v)}" for k, v in {**point, **drawn}.items())])) or "base"
        try:
            cfg = config_from_dict(_with(base, overrides), source)
        except ConfigError as err:
            errors.extend(e.replace(f"{source}: ", f"{source}: trial [{label}]: ", 1) for e in err.errors)
            continue
        resolved = config_to_dict(cfg)
        if micro_batches and batchsize.apply(resolved, micro_batches, world):
            label += f" (found micro batch {resolved['training']['micro_batch_size']})"
            resolved = config_to_dict(config_from_dict(resolved, source))
        tid = trial_id(resolved)
        resolved["output"]["dir"] = str(sweep_dir / "trials" / tid)
        resolved["name"] = f"{spec.name}-{tid}"
        if tid in trials:
            errors.append(f"{source}: trials [{trials[tid].label}] and [{label}] resolve to the same config")
            continue
        trials[tid] = Trial(tid, label, overrides, resolved)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    return list(trials.values())


def _with(base: dict, overrides: dict) -> dict:
    return apply_overrides(base, list(overrides.items()))


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def select_defaults(spec: SweepSpec, trials: list[Trial]) -> tuple[str, str]:
    """The metric and mode that pick the best trial."""
    evaluation = trials[0].config["evaluation"] if trials else {"metric": "loss", "mode": "min"}
    return spec.select.metric or evaluation["metric"], spec.select.mode or evaluation["mode"]

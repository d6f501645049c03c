"""The sweep file: what to vary, on what resources, how to pick the best trial.

`load_sweep(path, overrides)` reads and validates it (every key a training-config key, every
count within `max_trials` before anything proportional to it is built, names the filesystem
accepts) and returns the spec and the base training config as a plain mapping.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..base.errors import ConfigError
from ..base.layout import SweepLayout
from . import sbatch_options
from .choice import Final, check_final, check_not_varied, check_repeats
from .environment import Environment, check_environment
from .schema import apply_overrides, bounded, build, field_types, parse_overrides
from .sections import TrainConfig
from .yaml_file import read_yaml

NAME_BYTES = 100
"""Longest sweep or variant name, in UTF-8 bytes (it names a directory and a SLURM job)."""


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
    num_samples: int = bounded(1, ge=1)
    """Samples drawn, each crossed with every grid point and variant."""
    seed: int = bounded(0, ge=0, lt=2**32)
    """Seed of the sampler: the same seed gives the same values."""
    params: dict = field(default_factory=dict)
    """Dotted training-config key -> {distribution, low, high | values}."""


@dataclass
class Search:
    """Model-based search: each of `trials` slots is given its values when a job starts it, by
    an Optuna sampler told every result recorded before (submit/search.py)."""

    trials: int = bounded(dataclasses.MISSING, ge=1, le=100_000)
    """Configurations to try, each asked for when its first trial starts; with repeats each
    runs as `repeats` trials, its seeds, and the sampler is told their mean."""
    sampler: Literal["tpe", "gp", "cmaes", "qmc", "random"] = "tpe"
    """Optuna's sampler: tpe (constant liar for trials still running), gp (at most GP_TRIALS trials),
    qmc, random. cmaes is refused with its reason (NOT_OFFERED)."""
    seed: int = bounded(0, ge=0, lt=2**32)
    """Seed of the sampler: the same seed and the same results give the same values."""
    startup_trials: Optional[int] = bounded(None, ge=0, le=100_000)
    """Trials drawn at random before tpe or gp model the results; null: Optuna's default
    (10). Lower it for small budgets."""
    params: dict = field(default_factory=dict)
    """Dotted training-config key -> {distribution, low, high | values}, as random.params."""
    warm_start: Optional[str] = None
    """Another sweep's directory: its finished trials over the same keys are told first."""


@dataclass
class Variant:
    name: str
    """Shown in tables and MLflow."""
    set: dict = field(default_factory=dict)
    """Dotted training-config key -> value."""


@dataclass
class Resources:
    nodes: int = bounded(1, ge=1, le=100_000)
    """Nodes per trial."""
    tasks_per_node: int = bounded(1, ge=1, le=1024)
    """Processes (ranks) per node; one per GPU on GPU nodes."""
    gpus_per_node: int = bounded(0, ge=0, le=1024)
    """GPUs per node."""
    cpus_per_task: int = bounded(1, ge=1, le=100_000)
    """CPU cores per process."""
    mem_gb: Optional[float] = bounded(None, gt=0)
    """Memory per node in GB (SLURM --mem); null leaves it to the cluster's default."""
    time_min: int = bounded(60, ge=1, le=10_000_000)
    """Time limit per trial, minutes."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpu_memory_gb: Optional[float] = bounded(None, gt=0)
    """Memory of one GPU, for preflight's memory plan."""
    extra_sbatch: dict = field(default_factory=dict)
    """More sbatch options, e.g. {exclusive: true, reservation: my_res}."""
    max_parallel: int = bounded(4, ge=1, le=1_000_000)
    """Trials running at once (the job array's %parallelism)."""
    pack: int = bounded(1, ge=1, le=1024)
    """Trials per job. 1: one trial per array task. K > 1: each job holds the resources of K
    trials and runs K at once, each an `srun` job step on its own share, starting the next
    waiting trial whenever one ends (submit/pack.py); ceil(max_parallel / K) jobs in all."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class Asha:
    """Asynchronous successive halving: stop losing trials at rungs (plan/asha.py)."""

    grace_steps: int = bounded(dataclasses.MISSING, ge=1)
    """The first rung: every trial trains at least this many steps."""
    reduction_factor: int = bounded(3, ge=2, le=1000)
    """Rungs at grace_steps x reduction_factor**k steps; at each, a trial continues only if it is
    in the top 1/reduction_factor of the trials recorded there so far."""
    start: Literal["shuffled", "listed"] = "shuffled"
    """The order trials start in: `shuffled`, in the order of their ids (reproducible); `listed`,
    in the order the sweep file gives (to start the most promising first, say). The first
    arrivals at a rung always continue (plan/asha.py)."""


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
    search: Optional[Search] = None
    """Model-based search: values asked of a sampler when each trial starts (not with grid,
    variants or random)."""
    resources: Resources = field(default_factory=Resources)
    select: Select = field(default_factory=Select)
    tracking: Tracking = field(default_factory=Tracking)
    executor: Literal["auto", "slurm", "local"] = "auto"
    """slurm, local, or auto: slurm when sbatch is on PATH."""
    max_trials: int = bounded(1000, ge=1, le=1_000_000)
    """Refuse plans with more trials than this."""
    runs_dir: str = "runs"
    """Where sweep directories go."""
    max_requeues: int = bounded(3, ge=0, le=1000)
    """Times a trial is requeued after preemption or its time limit."""
    asha: Optional[Asha] = None
    """Successive halving on the select metric; absent: every trial runs to the end."""
    environment: Environment = field(default_factory=Environment)
    """Setup lines and variables of every job (`environment.setup=[]` runs a cluster's file here)."""
    repeats: int = bounded(1, ge=1, le=100)
    """Seeds per configuration. K > 1: each configuration runs K times, the first with its own
    `training.seed`, the others with seeds derived from it (plan/seeds.py), and the sweep picks
    the configuration by the mean over its seeds (track/best.py). 1: one trial per configuration."""
    final: Optional[Final] = None
    """One look at the test set, once the sweep has chosen (config/choice.py)."""

    def trials_as_steps(self) -> bool:
        """Jobs run trials as steps, started by a runner (submit/pack.py): packed, or a search."""
        return self.resources.pack > 1 or self.search is not None

    def num_trials(self) -> int:
        """Variants x grid points x random samples, computed without building any of them."""
        points = math.prod(len(v) for v in self.grid.values() if isinstance(v, list))
        samples = self.random.num_samples if self.random and self.random.params else 1
        if self.search is not None:  # search.trials counts configurations
            return self.search.trials * self.repeats
        return max(1, len(self.variants)) * points * samples * self.repeats


def is_sweep(raw) -> bool:
    """Whether a YAML file's contents are a sweep file (else a training config)."""
    return isinstance(raw, dict) and ("grid" in raw or "base" in raw)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepSpec, dict]:
    """Read and validate a sweep file; returns the spec and the base training config dict."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), parse_overrides(list(overrides)))
    errors: list[str] = []
    spec = build(SweepSpec, data, "", errors)
    if spec is None or errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    spec.set = _flatten_keys(spec.set)
    spec.grid = _flatten_keys(spec.grid)
    for variant in spec.variants:
        variant.set = _flatten_keys(variant.set)
    for section, searched in (("random", spec.random), ("search", spec.search)):
        if searched is None:
            continue
        flat = _flatten_keys(searched.params, leaf=lambda v: not isinstance(v, dict) or "distribution" in v)
        searched.params = {}
        for key, value in flat.items():
            if not isinstance(value, dict):
                errors.append(f"{section}.params.{key}: expected a mapping with a distribution, got {value!r}")
                continue
            searched.params[key] = build(Distribution, value, f"{section}.params.{key}", errors)
    base = _read_base(path, spec, errors)
    _check_spec(spec, errors)
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return spec, base


def _flatten_keys(mapping: dict, leaf=lambda v: not isinstance(v, dict), prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if leaf(value) or not value:
            out[dotted] = value
        else:
            out.update(_flatten_keys(value, leaf, dotted))
    return out


def _read_base(path: Path, spec: SweepSpec, errors: list[str]) -> dict:
    if not isinstance(spec.base, str):
        return spec.base
    base_path = Path(spec.base) if Path(spec.base).is_absolute() else path.parent / spec.base
    try:
        return read_yaml(base_path)
    except ConfigError as err:
        errors.append(f"base: {err.errors[0]}")
        return {}


def _check_key(key: str) -> Optional[str]:
    """Why `key` is not a training-config key, or None when it is."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        types = field_types(cls)
        if part not in types:
            where = ".".join(parts[:i]) or "the top level"
            return (f"not a key of the training config ({'.'.join(parts[: i + 1])}: valid keys of {where}: "
                    f"{', '.join(sorted(types))})")
        cls = types[part]
        if field_types(cls) is None:  # a leaf, or a free-form mapping such as model.config
            if i < len(parts) - 1 and not _is_mapping(cls):
                return f"not a key of the training config ({'.'.join(parts[: i + 1])} is a value, not a section)"
            return None
    return None


def _is_mapping(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict or any(
        a is dict or typing.get_origin(a) is dict for a in typing.get_args(tp))


def has_control_characters(text: str) -> bool:
    """Any control character at all: C0 and C1 controls, line and paragraph separators, and
    invisible format characters (bidi overrides, zero-width), which print as something else."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a directory and a job, or None."""
    if not name or name in (".", "..") or name.startswith("."):
        return f"expected a plain directory name, got {name!r}"
    if "/" in name or has_control_characters(name):
        return f"expected a name without '/' or control characters, got {name!r}"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_BYTES:
        return f"expected at most {NAME_BYTES} bytes, got {len(name.encode('utf-8', 'surrogatepass'))}"
    return None


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
    if spec.search:
        keyed.append(("search.params", spec.search.params))
    for section, mapping in keyed:
        for key in mapping:
            problem = _check_key(key)
            if problem:
                errors.append(f"{section}.{key}: {problem}")
    names = [v.name for v in spec.variants]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"variants: the name {name!r} is used twice")
    for i, name in enumerate(names):
        if has_control_characters(name):
            errors.append(f"variants[{i}].name: expected a name without control characters, got {name!r}")
    if spec.random:
        _check_distributions("random", spec.random.params, errors)
    if spec.search:
        _check_search(spec, errors)
    check_not_varied(keyed, errors)
    if spec.repeats > 1:
        check_repeats(spec, keyed, errors)
    if spec.final is not None:
        check_final(spec.final, errors)
    for key in spec.resources.extra_sbatch:
        if (problem := sbatch_options.problem(key)) is not None:
            errors.append(f"resources.extra_sbatch.{key}: {problem}")
    check_environment(spec.environment, errors)
    if (problem := name_problem(spec.name)) is not None:
        errors.append(f"name: {problem}")
    runs = Path(spec.runs_dir)
    if runs.exists() and not runs.is_dir():
        errors.append(f"runs_dir: {spec.runs_dir} exists and is not a directory")
    if not errors and spec.num_trials() > spec.max_trials:
        errors.append(f"max_trials: the plan has {spec.num_trials():,} trials, over the cap of {spec.max_trials:,} "
                      f"(raise max_trials to allow it)")


GP_TRIALS = 100
"""Trials at most for search.sampler gp: its ask refits a Gaussian process on every trial told,
cubic in their number (bench/RESULTS.md, 2 cores: up to 1 s an ask at 100, 1.3 s at 200)."""
NOT_OFFERED = {"cmaes": "CMA-ES keeps its state in a pickled optimizer among the trials' attributes, which a record "
                        "of data cannot carry, so its asks would not follow Optuna's own; use tpe, gp, qmc or random"}


def _check_search(spec: SweepSpec, errors: list[str]) -> None:
    """A model-based search chooses every trial's values itself: nothing else may multiply them."""
    search = spec.search
    if search.sampler in NOT_OFFERED:
        errors.append(f"search.sampler: {search.sampler} is not offered: {NOT_OFFERED[search.sampler]}")
    if search.sampler == "gp" and search.trials > GP_TRIALS:
        errors.append(f"search.trials: gp takes at most {GP_TRIALS} (got {search.trials:,}): each ask refits its "
                      f"model on every result, over a second an ask past {GP_TRIALS}; use tpe for more trials")
    for key, given in (("grid", spec.grid), ("variants", spec.variants), ("random", spec.random)):
        if given:
            errors.append(f"search: cannot be combined with {key} (the sampler chooses each trial's values; "
                          f"fixed values go under set, searched ones under search.params)")
    if not spec.search.params:
        errors.append("search.params: give at least one key to search over")
    _check_distributions("search", spec.search.params, errors)
    warm = spec.search.warm_start
    if warm is not None:  # jobs read it from wherever they run: made absolute here
        spec.search.warm_start = str(Path(warm).resolve())
        record = SweepLayout(Path(warm)).search
        if not record.is_file():
            errors.append(f"search.warm_start: {warm} holds no search record ({record.name}); give the directory "
                          f"of an earlier sweep with a search section")


def _check_distributions(section: str, params: dict, errors: list[str]) -> None:
    for key, dist in params.items():
        if dist is None:
            continue
        where = f"{section}.params.{key}"
        if dist.distribution == "choice":
            if not dist.values:
                errors.append(f"{where}.values: choice needs a non-empty list of values")
        elif dist.low is None or dist.high is None:
            errors.append(f"{where}: {dist.distribution} needs low and high")
        elif not dist.low < dist.high and not (dist.distribution == "randint" and dist.low == dist.high):
            errors.append(f"{where}: low ({dist.low}) must be below high ({dist.high})")
        elif dist.distribution == "loguniform" and dist.low <= 0:
            errors.append(f"{where}.low: loguniform needs low > 0, got {dist.low}")

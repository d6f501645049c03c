"""Rules between fields of the training config (types and ranges are checked by the schema).

Each rule names the keys it reads, so a planner that changes a few keys per trial re-checks only
the rules those keys can break (`check(cfg, touched=...)`).
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .deepspeed import raw_key_conflicts
from .sections import METRIC_MODES, TrainConfig


@dataclass(frozen=True)
class Rule:
    reads: tuple[str, ...]
    """Dotted keys (fields or whole sections) the rule depends on."""
    check: Callable[[TrainConfig], Iterable[str]]

    def touched_by(self, keys: Iterable[str]) -> bool:
        return any(k == r or k.startswith(r + ".") or r.startswith(k + ".") for k in keys for r in self.reads)


RULES: list[Rule] = []


def rule(*reads: str):
    def register(fn: Callable[[TrainConfig], Iterable[str]]):
        RULES.append(Rule(reads, fn))
        return fn
    return register


def check(cfg: TrainConfig, touched: Optional[Iterable[str]] = None) -> list[str]:
    """Every rule's problems; with `touched`, only the rules that read one of those keys."""
    chosen = RULES if touched is None else reading(frozenset(touched))
    return [problem for r in chosen for problem in r.check(cfg)]


@functools.lru_cache(maxsize=1024)
def reading(keys: frozenset) -> list[Rule]:
    """The rules that read one of `keys` (a sweep's trials vary the same few keys)."""
    return [r for r in RULES if r.touched_by(keys)]


@rule("model.name_or_path", "model.config", "model.factory")
def one_model_source(cfg: TrainConfig) -> Iterator[str]:
    m = cfg.model
    sources = [k for k in ("name_or_path", "config", "factory") if getattr(m, k) is not None]
    if len(sources) != 1:
        yield ("model: set exactly one of model.name_or_path, model.config, model.factory"
               + (f" (got {', '.join('model.' + s for s in sources)})" if sources else ""))
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        yield "model.config.model_type: required, a transformers model type such as longformer"
    if m.factory is not None and (m.factory.count(":") != 1 or not all(m.factory.split(":"))):
        yield f"model.factory: expected 'package.module:function', got {m.factory!r}"


@rule("model.kind", "model.factory", "model.task", "data.text_pair_column", "data.synthetic")
def dual_encoder_needs(cfg: TrainConfig) -> Iterator[str]:
    m, d = cfg.model, cfg.data
    if m.kind != "dual_encoder":
        return
    if m.factory is not None:
        yield "model.factory: a factory brings its own composition; use it without model.kind: dual_encoder"
    if m.task != "regression":
        yield "model.task: a dual encoder scores similarity; set model.task: regression"
    if d.text_pair_column is None and not (d.synthetic is not None and d.synthetic.task == "similarity"):
        yield "data.text_pair_column: a dual encoder needs text pairs"


@rule("data.dataset", "data.train_files", "data.synthetic", "data.validation_files", "data.validation_fraction",
      "data.validation_split")
def one_data_source(cfg: TrainConfig) -> Iterator[str]:
    d = cfg.data
    sources = [k for k in ("dataset", "train_files", "synthetic") if getattr(d, k) is not None]
    if len(sources) != 1:
        yield ("data: set exactly one of data.dataset, data.train_files, data.synthetic"
               + (f" (got {', '.join('data.' + s for s in sources)})" if sources else ""))
    if d.train_files is not None and d.validation_files is None and d.validation_fraction is None:
        yield "data.validation_files: required with data.train_files (or set data.validation_fraction)"
    if d.dataset is not None and d.validation_split is None and d.validation_fraction is None:
        yield "data.validation_split: required with data.dataset (or set data.validation_fraction)"


@rule("data.train_files", "data.validation_files", "data.test_files")
def data_files_exist(cfg: TrainConfig) -> Iterator[str]:
    keys = ["train_files", "validation_files", "test_files"]
    if cfg.data.test_files is not None and cfg.data.train_files is None:
        yield "data.test_files: a test split of local files goes with data.train_files"
        keys.pop()
    for key in keys:
        paths = getattr(cfg.data, key) or []
        if key != "validation_files" and getattr(cfg.data, key) == []:
            yield f"data.{key}: an empty list; give at least one file"
        for i, path in enumerate(paths):
            if not Path(path).is_file():
                yield f"data.{key}[{i}]: file not found: {path}"
            elif Path(path).suffix not in (".csv", ".json", ".jsonl", ".parquet"):
                yield f"data.{key}[{i}]: expected a .csv, .json, .jsonl or .parquet file, got {path}"
    suffixes = {Path(p).suffix.replace(".jsonl", ".json") for p in [*(cfg.data.train_files or []),
                                                                      *(cfg.data.validation_files or []),
                                                                      *(cfg.data.test_files or [])]
                if Path(p).is_file()}
    if len(suffixes) > 1:
        yield f"data.validation_files: all data files must be of one kind, got {', '.join(sorted(suffixes))}"


@rule("data.synthetic", "model.task")
def synthetic_set(cfg: TrainConfig) -> Iterator[str]:
    s, task = cfg.data.synthetic, cfg.model.task
    if s is None:
        return
    if s.min_tokens > s.max_tokens:
        yield f"data.synthetic.min_tokens: expected at most max_tokens ({s.max_tokens}), got {s.min_tokens}"
    if s.task == "classification" and s.evidence_after >= s.min_tokens:
        yield f"data.synthetic.evidence_after: must be below min_tokens ({s.min_tokens}), got {s.evidence_after}"
    if s.task == "classification" and task != "classification":
        yield "data.synthetic.task: the classification set needs model.task: classification"
    if s.task == "similarity" and task != "regression":
        yield "data.synthetic.task: the similarity set has scores; set model.task: regression"


@rule("training.global_batch_size", "training.micro_batch_size", "training.gradient_accumulation_steps")
def global_batch(cfg: TrainConfig) -> Iterator[str]:
    t = cfg.training
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * t.gradient_accumulation_steps):
        yield (f"training.global_batch_size: {t.global_batch_size} is not a multiple of "
               f"training.micro_batch_size x training.gradient_accumulation_steps "
               f"({t.micro_batch_size} x {t.gradient_accumulation_steps})")


def batch_on_ranks(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """training.global_batch_size against the ranks a job has (known only when it starts)."""
    t = cfg.training
    actual = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    if t.global_batch_size is not None and actual != t.global_batch_size:
        yield (f"training.global_batch_size: {t.global_batch_size} != training.micro_batch_size x "
               f"training.gradient_accumulation_steps x world size ({t.micro_batch_size} x "
               f"{t.gradient_accumulation_steps} x {world_size} = {actual})")


@rule("evaluation.metric", "model.task")
def metric_fits_task(cfg: TrainConfig) -> Iterator[str]:
    metric, task = cfg.evaluation.metric, cfg.model.task
    if task == "classification" and metric == "spearman":
        yield "evaluation.metric: spearman is a regression metric; model.task is classification"
    if task == "regression" and metric in ("accuracy", "macro_f1"):
        yield f"evaluation.metric: {metric} is a classification metric; model.task is regression"


def against_direction(key: str, metric: str, mode: str) -> Iterator[str]:
    """A metric selected against its known direction (the worst checkpoint or trial would win)."""
    if METRIC_MODES.get(metric, mode) != mode:
        better = "smaller" if METRIC_MODES[metric] == "min" else "larger"
        yield (f"{key}: {mode} selects the worst {metric} ({metric} is better {better}); "
               f"set it to {METRIC_MODES[metric]}")


@rule("evaluation.metric", "evaluation.mode")
def evaluation_direction(cfg: TrainConfig) -> Iterator[str]:
    yield from against_direction("evaluation.mode", cfg.evaluation.metric, cfg.evaluation.mode)


@rule("asha")
def asha_direction(cfg: TrainConfig) -> Iterator[str]:
    if cfg.asha is not None:
        yield from against_direction("asha.mode", cfg.asha.metric, cfg.asha.mode)


@rule("optimizer.betas")
def adam_betas(cfg: TrainConfig) -> Iterator[str]:
    betas = cfg.optimizer.betas
    if len(betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1 for b in betas):
        yield f"optimizer.betas: expected two numbers in [0, 1), got {betas}"


@rule("deepspeed")
def zero_settings(cfg: TrainConfig) -> Iterator[str]:
    ds = cfg.deepspeed
    if ds.offload_param and ds.zero_stage != 3:
        yield f"deepspeed.offload_param: needs deepspeed.zero_stage 3, got {ds.zero_stage}"
    if ds.offload_optimizer and ds.zero_stage == 0:
        yield "deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3, got 0"


@rule("deepspeed", "precision", "training.micro_batch_size", "training.gradient_accumulation_steps",
      "training.global_batch_size")
def raw_deepspeed_keys(cfg: TrainConfig) -> Iterator[str]:
    yield from raw_key_conflicts(cfg)


@rule("asha", "evaluation.every_steps", "training.max_steps", "evaluation.metric", "model.task")
def rungs_are_validations(cfg: TrainConfig) -> Iterator[str]:
    a = cfg.asha
    if a is None:
        return
    every, last = cfg.evaluation.every_steps, cfg.training.max_steps
    for k, step in enumerate(a.rungs):
        if step % every and step != last:
            yield (f"asha.rungs: rung {k} is at step {step}, but the trial validates every {every} steps "
                   f"(evaluation.every_steps); make every rung a multiple of it")
            return
    regression = cfg.model.task == "regression"
    if a.metric in (("accuracy", "macro_f1") if regression else ("spearman",)):
        yield f"asha.metric: {a.metric} is not a validation metric of a {cfg.model.task} trial"


@rule("training.spikes", "checkpointing.every_steps")
def spikes_need_checkpoints(cfg: TrainConfig) -> Iterator[str]:
    if cfg.training.spikes is not None and not cfg.checkpointing.every_steps:
        yield ("training.spikes: a rollback goes back to a checkpoint; set checkpointing.every_steps (the steps a "
               "rollback retrains are at most that many)")


@rule("tracking.register_model", "tracking.log_model")
def registrable_name(cfg: TrainConfig) -> Iterator[str]:
    name = cfg.tracking.register_model
    if name is None:
        return
    norm = posixpath.normpath(name)  # MLflow keeps a name as a path: one that normalises to another is refused
    if not name.strip() or any(c in name for c in "/:") or name != name.strip() or norm != name or norm == "." or \
            norm.startswith(".."):
        yield (f"tracking.register_model: {name!r} is not a name MLflow's registry takes (not empty, no / or :, "
               f"not . or ..)")
    elif not cfg.tracking.log_model:
        yield "tracking.register_model: registers the logged model; it needs tracking.log_model: true"

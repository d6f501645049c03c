"""The training config: one dataclass per YAML section, validated at load time.

`load_config(path, overrides)` reads YAML with `yaml.safe_load`, applies `dotted.key=value`
overrides, checks every field's type and the rules between fields, and raises one
`ConfigError` listing every problem as `file: dotted.key: what was expected`.

This module must stay light: the sweep's `--dry-run` imports it and must not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .schema import ConfigError, apply_overrides, build, flatten, parse_overrides, read_yaml, to_dict

Task = Literal["classification", "regression"]
Metric = Literal["loss", "accuracy", "macro_f1", "spearman"]


@dataclass
class DualEncoderConfig:
    """Two encoders (or one, shared), a pooling head each, one similarity loss."""

    shared: bool = True
    """One encoder for both texts (siamese); false gives each text its own encoder."""
    pooling: Literal["mean", "cls", "attention"] = "mean"
    """How token states become one vector: masked mean, the first token, or attention pooling."""
    loss: Literal["cosine", "contrastive"] = "cosine"
    """cosine: regression of the cosine similarity on the score label; contrastive: in-batch
    negatives (each text's positive is its own pair)."""
    temperature: float = 0.05
    """Temperature of the contrastive loss."""
    pooler: bool = True
    """Keep the encoder's own pooler layer (BERT/RoBERTa-style). Our pooling head does not use it,
    so its parameters get no gradient: preflight reports them unless allowed or removed here."""


@dataclass
class ModelConfig:
    kind: Literal["sequence_classification", "dual_encoder"] = "sequence_classification"
    """sequence_classification: one transformers model with a classification/regression head;
    dual_encoder: two encoders compared by cosine similarity (text-pair data)."""
    dual_encoder: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    """Settings of model.kind: dual_encoder."""
    name_or_path: Optional[str] = None
    """Hub name or local directory of a pretrained model, loaded with
    AutoModelForSequenceClassification (a 1-output regression head when task is regression)."""
    config: Optional[dict] = None
    """An architecture for random init: `model_type` (e.g. longformer) and fields of its config
    class. `vocab_size` and `pad_token_id` default to the tokenizer's; `max_position_embeddings`
    defaults to data.max_length + 2."""
    factory: Optional[str] = None
    """`package.module:function` returning an nn.Module, called as
    function(num_labels=..., tokenizer=..., **factory_kwargs). Its forward takes the batch and
    returns an object or dict with `loss` and `logits`."""
    factory_kwargs: dict = field(default_factory=dict)
    """Keyword arguments passed to the factory."""
    task: Task = "classification"
    """classification (cross-entropy over labels) or regression (one output, MSE)."""
    num_labels: Optional[int] = None
    """Number of classes; by default read from the training data's labels."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (non-reentrant) to save memory."""


@dataclass
class SyntheticConfig:
    """The generated long-document set: the label is only visible after `evidence_after` tokens."""

    num_train: int = 2000
    """Training documents."""
    num_validation: int = 400
    """Validation documents."""
    min_tokens: int = 1024
    """Shortest document, in words (one word is one token of the trained tokenizer)."""
    max_tokens: int = 4096
    """Longest document, in words."""
    evidence_after: int = 512
    """No class evidence before this word position."""
    evidence_rate: float = 0.05
    """Fraction of words after `evidence_after` drawn from the class's word list."""
    num_classes: int = 4
    """Number of labels."""
    seed: int = 0
    """Seed of the generator: the same seed gives byte-identical files."""
    task: Literal["classification", "similarity"] = "classification"
    """classification: long documents, label after evidence_after; similarity: text pairs with
    a score in [0, 1] (columns text, text_pair, label), for dual encoders."""


@dataclass
class PreflightConfig:
    allow_no_grad: list[str] = field(default_factory=list)
    """Glob patterns of parameter names known to get no gradient (e.g. '*pooler*')."""


@dataclass
class DataConfig:
    dataset: Optional[str] = None
    """A `datasets` hub name (e.g. stanfordnlp/imdb)."""
    dataset_config: Optional[str] = None
    """The hub dataset's configuration name, if it has several."""
    train_files: Optional[list[str]] = None
    """Local training files (csv, json, jsonl or parquet), relative to the working directory."""
    validation_files: Optional[list[str]] = None
    """Local validation files; or give validation_fraction to hold out part of the training set."""
    synthetic: Optional[SyntheticConfig] = None
    """Generate the long-document demo set instead of reading one."""
    train_split: str = "train"
    """Split of a hub dataset to train on."""
    validation_split: Optional[str] = "validation"
    """Split of a hub dataset to validate on (ignored when validation_fraction is set)."""
    validation_fraction: Optional[float] = None
    """Hold out this fraction of the training set (seeded) for validation."""
    text_column: str = "text"
    """Column with the input text."""
    text_pair_column: Optional[str] = None
    """Second text column for pair tasks (similarity, entailment)."""
    label_column: str = "label"
    """Column with the class id (classification) or score (regression)."""
    max_length: int = 512
    """Tokens per example after truncation."""
    max_train_examples: Optional[int] = None
    """Use only the first N training examples (quick runs)."""
    max_validation_examples: Optional[int] = None
    """Use only the first N validation examples."""
    length_grouping: bool = True
    """Batch examples of similar length together so little padding is computed."""
    cache_dir: str = "data_cache"
    """Where generated data, trained tokenizers and tokenized datasets are cached."""


@dataclass
class TokenizerConfig:
    name_or_path: Optional[str] = None
    """Hub name or local directory. Default: the model's; for a model built from config, a
    WordLevel tokenizer trained on the training texts."""
    vocab_size: int = 8000
    """Vocabulary size when a tokenizer is trained on the data."""


@dataclass
class OptimizerConfig:
    """AdamW; weight decay applies to weights only, never to biases or LayerNorm weights."""

    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay of the decay group."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's beta1, beta2."""
    eps: float = 1e-8
    """Adam's epsilon."""


@dataclass
class SchedulerConfig:
    kind: Literal["constant", "linear", "cosine"] = "linear"
    """Shape after warmup: constant, linear decay to 0, or cosine decay to 0 at training.max_steps."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to optimizer.lr."""


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO-Offload; stage 1 or more)."""
    offload_param: bool = False
    """Keep parameters on CPU (stage 3 only)."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    config: dict = field(default_factory=dict)
    """Raw DeepSpeed JSON keys passed through, such as zero_optimization.reduce_bucket_size.
    Keys the trainer sets itself (batch sizes, precision, ZeRO stage, clipping) may appear only
    with the same value."""


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. fp16 uses DeepSpeed's dynamic loss scaling and needs a GPU."""
    initial_scale_power: int = 16
    """fp16: the first loss scale is 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale is raised."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never goes below this."""


@dataclass
class TrainingConfig:
    micro_batch_size: int = 8
    """Examples per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro batches per optimizer step."""
    global_batch_size: Optional[int] = None
    """If given, must equal micro_batch_size x gradient_accumulation_steps x world size."""
    max_steps: int = 1000
    """Optimizer steps to train for (epochs repeat the data as needed)."""
    seed: int = 0
    """Seeds model init, data order and dropout."""
    log_every: int = 10
    """Write per-step metrics to metrics.jsonl every N steps."""
    max_nonfinite_steps: int = 3
    """Fail the trial after this many consecutive steps with a NaN or inf loss (skipped fp16
    overflow steps are not counted: their loss is finite)."""


@dataclass
class EvaluationConfig:
    every_steps: int = 100
    """Validate every N optimizer steps, and at the end."""
    metric: Metric = "accuracy"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller metric is better."""
    batch_size: int = 16
    """Examples per rank per validation forward pass."""


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = None
    """Stop after this many validations without improvement; null disables."""
    min_delta: float = 0.0
    """Improvement smaller than this does not count."""


@dataclass
class CheckpointingConfig:
    every_steps: Optional[int] = None
    """Save a resumable DeepSpeed checkpoint every N steps; null saves none."""
    keep_last: int = 2
    """Resumable checkpoints kept on disk."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the output directory, if there is one."""


@dataclass
class OutputConfig:
    dir: str = "runs/train"
    """Directory for metrics.jsonl, checkpoints and the exported best model."""
    export_best: bool = True
    """Export the best model as a save_pretrained directory (safetensors) with its tokenizer."""
    export_last: bool = False
    """Also export the final weights to `last/` in the same form."""


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI (sqlite:///mlflow.db, http://host:port); null keeps metrics in
    metrics.jsonl only. A sweep sets this for its trials from its own tracking section."""
    experiment: Optional[str] = None
    """MLflow experiment; default: the run's name."""
    run_id: Optional[str] = None
    """The MLflow run to log to; set by the sweep, which creates each trial's run at submit time."""
    parent_run_id: Optional[str] = None
    """The sweep's parent run, whose best trial is updated when this trial ends (set by the sweep)."""
    select_metric: Optional[str] = None
    """Metric that picks the sweep's best trial; default evaluation.metric."""
    select_mode: Optional[Literal["max", "min"]] = None
    """max or min; default evaluation.mode."""
    register_model: Optional[str] = None
    """Register the best model in the MLflow model registry under this name."""
    tags: dict = field(default_factory=dict)
    """Extra run tags (the sweep sets sweep, trial_id and executor)."""


@dataclass
class TrainConfig:
    name: str = "train"
    """Name of the run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)


# DeepSpeed keys the trainer derives itself, with the config key they come from.
_OWNED_DS_KEYS = {
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "train_batch_size": "training.global_batch_size",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "fp16": "precision.dtype",
    "bf16": "precision.dtype",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
}


def _check_rules(cfg: TrainConfig, errors: list[str]) -> None:
    """The rules between fields. Type errors were already collected by `build`."""
    m, d, t = cfg.model, cfg.data, cfg.training
    sources = [k for k in ("name_or_path", "config", "factory") if getattr(m, k) is not None]
    if len(sources) != 1:
        errors.append("model: set exactly one of model.name_or_path, model.config, model.factory"
                      + (f" (got {', '.join('model.' + s for s in sources)})" if sources else ""))
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        errors.append("model.config.model_type: required, a transformers model type such as longformer")
    if m.factory is not None and (m.factory.count(":") != 1 or not all(m.factory.split(":"))):
        errors.append(f"model.factory: expected 'package.module:function', got {m.factory!r}")
    if m.kind == "dual_encoder":
        if m.factory is not None:
            errors.append("model.factory: a factory brings its own composition; use it without model.kind: dual_encoder")
        if m.task != "regression":
            errors.append("model.task: a dual encoder scores similarity; set model.task: regression")
        if d.text_pair_column is None and not (d.synthetic is not None and d.synthetic.task == "similarity"):
            errors.append("data.text_pair_column: a dual encoder needs text pairs")
    if m.num_labels is not None and m.num_labels < 1:
        errors.append(f"model.num_labels: expected at least 1, got {m.num_labels}")

    data_sources = [k for k in ("dataset", "train_files", "synthetic") if getattr(d, k) is not None]
    if len(data_sources) != 1:
        errors.append("data: set exactly one of data.dataset, data.train_files, data.synthetic"
                      + (f" (got {', '.join('data.' + s for s in data_sources)})" if data_sources else ""))
    for key in ("train_files", "validation_files"):
        for i, path in enumerate(getattr(d, key) or []):
            if isinstance(path, str) and not Path(path).is_file():
                errors.append(f"data.{key}[{i}]: file not found: {path}")
            elif isinstance(path, str) and Path(path).suffix not in (".csv", ".json", ".jsonl", ".parquet"):
                errors.append(f"data.{key}[{i}]: expected a .csv, .json, .jsonl or .parquet file, got {path}")
    if d.train_files is not None and d.validation_files is None and d.validation_fraction is None:
        errors.append("data.validation_files: required with data.train_files (or set data.validation_fraction)")
    if d.validation_fraction is not None and not 0 < d.validation_fraction < 1:
        errors.append(f"data.validation_fraction: expected a number between 0 and 1, got {d.validation_fraction}")
    if d.dataset is not None and d.validation_split is None and d.validation_fraction is None:
        errors.append("data.validation_split: required with data.dataset (or set data.validation_fraction)")
    if d.max_length < 8:
        errors.append(f"data.max_length: expected at least 8, got {d.max_length}")
    if s := d.synthetic:
        if not 0 < s.min_tokens <= s.max_tokens:
            errors.append(f"data.synthetic.min_tokens: expected 0 < min_tokens <= max_tokens ({s.max_tokens}), got {s.min_tokens}")
        if s.task == "classification" and s.evidence_after >= s.min_tokens:
            errors.append(f"data.synthetic.evidence_after: must be below min_tokens ({s.min_tokens}), got {s.evidence_after}")
        if not 0 < s.evidence_rate <= 1:
            errors.append(f"data.synthetic.evidence_rate: expected a number in (0, 1], got {s.evidence_rate}")
        if s.num_classes < 2:
            errors.append(f"data.synthetic.num_classes: expected at least 2, got {s.num_classes}")
        if s.task == "classification" and m.task != "classification":
            errors.append("data.synthetic.task: the classification set needs model.task: classification")
        if s.task == "similarity" and m.task != "regression":
            errors.append("data.synthetic.task: the similarity set has scores; set model.task: regression")

    for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "max_nonfinite_steps"):
        if getattr(t, key) < 1:
            errors.append(f"training.{key}: expected at least 1, got {getattr(t, key)}")
    if t.global_batch_size is not None and t.global_batch_size % max(t.micro_batch_size * t.gradient_accumulation_steps, 1):
        errors.append(f"training.global_batch_size: {t.global_batch_size} is not a multiple of "
                      f"training.micro_batch_size x training.gradient_accumulation_steps "
                      f"({t.micro_batch_size} x {t.gradient_accumulation_steps})")
    if cfg.evaluation.every_steps < 1:
        errors.append(f"evaluation.every_steps: expected at least 1, got {cfg.evaluation.every_steps}")
    if cfg.checkpointing.every_steps is not None and cfg.checkpointing.every_steps < 1:
        errors.append(f"checkpointing.every_steps: expected at least 1 or null, got {cfg.checkpointing.every_steps}")
    if cfg.checkpointing.keep_last < 1:
        errors.append(f"checkpointing.keep_last: expected at least 1, got {cfg.checkpointing.keep_last}")
    metric = cfg.evaluation.metric
    if m.task == "classification" and metric == "spearman":
        errors.append("evaluation.metric: spearman is a regression metric; model.task is classification")
    if m.task == "regression" and metric in ("accuracy", "macro_f1"):
        errors.append(f"evaluation.metric: {metric} is a classification metric; model.task is regression")
    if len(cfg.optimizer.betas) != 2:
        errors.append(f"optimizer.betas: expected two numbers, got {cfg.optimizer.betas}")

    ds = cfg.deepspeed
    if ds.offload_param and ds.zero_stage != 3:
        errors.append(f"deepspeed.offload_param: needs deepspeed.zero_stage 3, got {ds.zero_stage}")
    if ds.offload_optimizer and ds.zero_stage == 0:
        errors.append("deepspeed.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3, got 0")
    if ds.gradient_clipping < 0:
        errors.append(f"deepspeed.gradient_clipping: expected 0 or more, got {ds.gradient_clipping}")
    ours = flatten(_derived_deepspeed(cfg, world_size=None))
    for raw_key, value in flatten(ds.config).items():
        owner = next((k for k in _OWNED_DS_KEYS if raw_key == k or raw_key.startswith(k + ".")), None)
        if owner is None:
            continue
        if owner in ("optimizer", "scheduler"):
            errors.append(f"deepspeed.config.{raw_key}: set by the {owner}: section, not the raw DeepSpeed config")
            continue
        mine = ours.get(raw_key, _MISSING)
        if mine is _MISSING or mine != value:
            errors.append(f"deepspeed.config.{raw_key}: {value!r} disagrees with {_OWNED_DS_KEYS[owner]}"
                          f" ({'unset' if mine is _MISSING else repr(mine)}); set it there instead")


_MISSING = object()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: Optional[int]) -> dict:
    """The DeepSpeed JSON for this config: the values the trainer also knows, derived in one
    place, with the raw `deepspeed.config` keys merged over them (validation made sure the two
    agree). `world_size=None` leaves out train_batch_size (used before launch)."""
    return _merge(_derived_deepspeed(cfg, world_size), cfg.deepspeed.config)


def _derived_deepspeed(cfg: TrainConfig, world_size: Optional[int]) -> dict:
    t, ds, p = cfg.training, cfg.deepspeed, cfg.precision
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        # The client optimizer (torch AdamW with decay/no-decay groups) is ours by design.
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": p.dtype == "fp16"},
        "bf16": {"enabled": p.dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.dtype == "fp16":
        config["fp16"].update(loss_scale=0, initial_scale_power=p.initial_scale_power,
                              loss_scale_window=p.loss_scale_window, hysteresis=p.hysteresis,
                              min_loss_scale=p.min_loss_scale)
    if world_size is not None:
        config["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    return config


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a training config; raises ConfigError naming file and keys."""
    data = read_yaml(path)
    return config_from_dict(data, str(path), overrides)


def config_from_dict(data: dict, source: str, overrides: list[str] = ()) -> TrainConfig:
    if overrides:
        data = apply_overrides(data, parse_overrides(list(overrides)))
    errors: list[str] = []
    cfg = build(TrainConfig, data, "", errors)
    if not errors:
        _check_rules(cfg, errors)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)

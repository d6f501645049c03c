"""The training config: one dataclass per YAML section, a docstring under every field.

Every number carries its range (`bounded`), checked when the YAML is read, as are the types;
the rules between fields are in rules.py. Light: no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from .schema import bounded

Task = Literal["classification", "regression"]
Metric = Literal["loss", "accuracy", "macro_f1", "spearman"]
TASK_METRICS = {"classification": ("loss", "accuracy", "macro_f1"), "regression": ("loss", "spearman")}
"""The validation metrics a trial of each model.task logs (train/metrics.py)."""
METRIC_MODES = {"loss": "min", "accuracy": "max", "macro_f1": "max", "spearman": "max"}
"""Which way each validation metric is better: selecting it the other way picks the worst."""


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
    temperature: float = bounded(0.05, gt=0)
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
    num_labels: Optional[int] = bounded(None, ge=1)
    """Number of classes; by default read from the training data's labels."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (non-reentrant) to save memory."""
    longformer_attention: Literal["blocked", "hf"] = "blocked"
    """Longformer self-attention: blocked (qarac_dist's, through scaled_dot_product_attention,
    the same outputs and gradients as Hugging Face's, several times faster) or hf (theirs)."""


@dataclass
class SyntheticConfig:
    """The generated long-document set: the label is only visible after `evidence_after` tokens."""

    num_train: int = bounded(2000, ge=1, le=10_000_000)
    """Training documents."""
    num_validation: int = bounded(400, ge=1, le=10_000_000)
    """Validation documents."""
    num_test: Optional[int] = bounded(None, ge=1, le=10_000_000)
    """Test documents, drawn after validation's, for a sweep's `final:` evaluation alone (no
    trial reads them); null: none."""
    min_tokens: int = bounded(1024, ge=1, le=1_000_000)
    """Shortest document, in words (one word is one token of the trained tokenizer)."""
    max_tokens: int = bounded(4096, ge=1, le=1_000_000)
    """Longest document, in words."""
    evidence_after: int = bounded(512, ge=0)
    """No class evidence before this word position."""
    evidence_rate: float = bounded(0.05, gt=0, le=1)
    """Fraction of words after `evidence_after` drawn from the class's word list."""
    num_classes: int = bounded(4, ge=2, le=1000)
    """Number of labels."""
    seed: int = bounded(0, ge=0, lt=2**32)
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
    test_files: Optional[list[str]] = None
    """Local test files, read only by a sweep's `final:` evaluation, never by a trial."""
    synthetic: Optional[SyntheticConfig] = None
    """Generate the long-document demo set instead of reading one."""
    train_split: str = "train"
    """Split of a hub dataset to train on."""
    validation_split: Optional[str] = "validation"
    """Split of a hub dataset to validate on (ignored when validation_fraction is set)."""
    validation_fraction: Optional[float] = bounded(None, gt=0, lt=1)
    """Hold out this fraction of the training set for validation, chosen by split_seed."""
    split_seed: Optional[int] = bounded(None, ge=0, lt=2**32)
    """Seed of the validation_fraction hold-out; null: 0. Never training.seed: the validation rows
    are a property of the data, the same for every trial of a sweep, whatever its seed."""
    text_column: str = "text"
    """Column with the input text."""
    text_pair_column: Optional[str] = None
    """Second text column for pair tasks (similarity, entailment)."""
    label_column: str = "label"
    """Column with the class id (classification) or score (regression)."""
    max_length: int = bounded(512, ge=8, le=1_000_000)
    """Tokens per example after truncation."""
    max_train_examples: Optional[int] = bounded(None, ge=1)
    """Use only the first N training examples (quick runs)."""
    max_validation_examples: Optional[int] = bounded(None, ge=1)
    """Use only the first N validation examples."""
    length_grouping: bool = True
    """Batch examples of similar length together so little padding is computed."""
    cache_dir: str = "data_cache"
    """Where generated data, trained tokenizers and tokenized datasets are cached."""

    @property
    def datasets_cache(self) -> str:
        """Where `datasets` keeps what it loads and prepares (prefetch fills it for offline nodes)."""
        return datasets_cache(self.cache_dir)


def datasets_cache(cache_dir: str) -> str:
    return os.path.join(cache_dir, "hf")


@dataclass
class TokenizerConfig:
    name_or_path: Optional[str] = None
    """Hub name or local directory. Default: the model's; for a model built from config, a
    WordLevel tokenizer trained on the training texts."""
    vocab_size: int = bounded(8000, ge=16, le=10_000_000)
    """Vocabulary size when a tokenizer is trained on the data."""


@dataclass
class OptimizerConfig:
    """AdamW; weight decay applies to weights only, never to biases or LayerNorm weights."""

    lr: float = bounded(5e-5, gt=0, le=10)
    """Peak learning rate."""
    weight_decay: float = bounded(0.01, ge=0, le=10)
    """Decoupled weight decay of the decay group."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's beta1, beta2."""
    eps: float = bounded(1e-8, gt=0, le=1)
    """Adam's epsilon."""


@dataclass
class SchedulerConfig:
    kind: Literal["constant", "linear", "cosine"] = "linear"
    """Shape after warmup: constant, linear decay to 0, or cosine decay to 0 at training.max_steps."""
    warmup_steps: int = bounded(0, ge=0)
    """Optimizer steps of linear warmup from 0 to optimizer.lr."""


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO-Offload; stage 1 or more)."""
    offload_param: bool = False
    """Keep parameters on CPU (stage 3 only)."""
    gradient_clipping: float = bounded(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables)."""
    config: dict = field(default_factory=dict)
    """Raw DeepSpeed JSON keys passed through, such as zero_optimization.reduce_bucket_size.
    Keys the trainer sets itself (batch sizes, precision, ZeRO stage, clipping) may appear only
    with the same value."""


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. fp16 uses DeepSpeed's dynamic loss scaling and needs a GPU."""
    initial_scale_power: int = bounded(16, ge=0, le=64)
    """fp16: the first loss scale is 2**initial_scale_power."""
    loss_scale_window: int = bounded(1000, ge=1)
    """fp16: steps without overflow before the loss scale is raised."""
    hysteresis: int = bounded(2, ge=1)
    """fp16: overflows tolerated before the loss scale is lowered."""
    min_loss_scale: float = bounded(1.0, gt=0)
    """fp16: the loss scale never goes below this."""


@dataclass
class SpikesConfig:
    """Loss spikes and NaN: roll back to the newest checkpoint, skip the data that led there, go
    on (train/spikes.py). A step is a spike when its loss is NaN or inf, or more than `z`
    standard deviations above the mean of the previous `window` steps' losses; the same for the
    gradient norm where DeepSpeed reports it. Each rank checks its own loss; any rank's spike
    rolls every rank back. Off by default for this release."""

    z: float = bounded(6.0, gt=0)
    """Standard deviations above the window's mean that make a spike (OLMo-core skips an update
    at 6). Detection by z starts once half the window is filled; non-finite losses always count."""
    min_ratio: float = bounded(1.5, ge=1)
    """A spike must also be at least this many times the window's mean: a nearly constant
    window (the plateau before a model starts to learn) has so small a deviation that ordinary
    noise would pass `z` many times over."""
    window: int = bounded(128, ge=4, le=1_000_000)
    """Steps of loss (and gradient norm) history the mean and deviation are taken over
    (OLMo-core's rolling interval: 128). Spikes never enter it."""
    grad_norm: bool = False
    """Also watch the global gradient norm (ZeRO stages report it; fp16 overflow steps, which
    DeepSpeed skips by itself, are left out). Off by default: a norm that rises while a model
    starts to learn is many deviations above a window of the plateau before it (measured: a
    false rollback at step 26 of a 60-step run, window 16), and every false rollback skips data."""
    margin: int = bounded(8, ge=0, le=1_000_000)
    """Batches skipped after the spike's own batch, on top of those from the checkpoint to it."""
    lr_factor: float = bounded(1.0, gt=0, le=1)
    """Multiply the learning rate by this for `lr_steps` steps after a rollback (1: no cut)."""
    lr_steps: int = bounded(0, ge=0, le=10**12)
    """Steps the learning-rate cut lasts after each rollback."""
    max_rollbacks: int = bounded(3, ge=1, le=1000)
    """Rollbacks a trial may make; the next spike fails it (pruned, under successive halving)."""


@dataclass
class TrainingConfig:
    micro_batch_size: int = bounded(8, ge=1, le=1_000_000)
    """Examples per rank per forward pass."""
    gradient_accumulation_steps: int = bounded(1, ge=1, le=1_000_000)
    """Micro batches per optimizer step."""
    global_batch_size: Optional[int] = bounded(None, ge=1)
    """If given, must equal micro_batch_size x gradient_accumulation_steps x world size."""
    max_steps: int = bounded(1000, ge=1, le=10**12)
    """Optimizer steps to train for (epochs repeat the data as needed)."""
    seed: int = bounded(0, ge=0, lt=2**32)
    """Seeds model init, data order and dropout."""
    log_every: int = bounded(10, ge=1)
    """Write per-step metrics to metrics.jsonl every N steps."""
    max_nonfinite_steps: int = bounded(3, ge=1)
    """Fail the trial after this many consecutive steps with a NaN or inf loss (skipped fp16
    overflow steps are not counted: their loss is finite)."""
    spikes: Optional[SpikesConfig] = None
    """Roll back and skip the data on a loss spike or NaN instead of failing (null: off; then
    max_nonfinite_steps applies)."""


@dataclass
class EvaluationConfig:
    every_steps: int = bounded(100, ge=1)
    """Validate every N optimizer steps, and at the end."""
    metric: Metric = "accuracy"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller metric is better: min for loss, max for the others."""
    batch_size: int = bounded(16, ge=1, le=1_000_000)
    """Examples per rank per validation forward pass."""


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = bounded(None, ge=1)
    """Stop after this many validations without improvement; null disables."""
    min_delta: float = bounded(0.0, ge=0)
    """Improvement smaller than this does not count."""


@dataclass
class CheckpointingConfig:
    every_steps: Optional[int] = bounded(None, ge=1)
    """Save a resumable DeepSpeed checkpoint every N steps; null saves none."""
    keep_last: int = bounded(2, ge=1)
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
    log_model: bool = True
    """Log the best model as an MLflow model (transformers or pytorch flavour); false keeps it
    out of MLflow, its files stay in the trial's best/ folder."""
    register_model: Optional[str] = None
    """Register the best model in the MLflow model registry under this name (needs log_model); in
    a sweep, only the sweep's choice, with the alias `champion` (track/champion.py)."""
    tags: dict = field(default_factory=dict)
    """Extra run tags (a sweep adds sweep, trial_id and executor)."""
    system_metrics_every_s: float = bounded(10.0, ge=0, le=86400)
    """Seconds between samples of the node's load (the GPUs in CUDA_VISIBLE_DEVICES, CPU, host
    memory), logged as MLflow system metrics with the training's rows (track/system_metrics.py);
    0: none."""


@dataclass
class AshaConfig:
    """Set by a sweep with an `asha` section (successive halving, plan/asha.py): at each rung this
    trial records its validation metric in the sweep's record (the job's context says where)
    and stops unless it is in the top 1/reduction_factor of the trials recorded there so far."""

    rungs: list[int] = field(default_factory=list)
    """Steps at which the trial meets a rung; each must be a validation step."""
    reduction_factor: int = bounded(3, ge=2, le=1000)
    """A trial continues when it is in the top 1/reduction_factor at a rung."""
    metric: Metric = "accuracy"
    """Validation metric compared at the rungs."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller metric is better."""


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
    asha: Optional[AshaConfig] = None

"""The DeepSpeed JSON: a pure function of the training config (golden-file tested).

The values the trainer also knows (batch sizes, precision, ZeRO stage, clipping) are derived
here, in one place; the raw `deepspeed.config` keys are merged over them, and may repeat an
owned key only with the same value.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from .schema import flatten
from .sections import TrainConfig

# DeepSpeed keys the trainer derives itself, with the config key they come from.
OWNED_KEYS = {
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
_MISSING = object()


def deepspeed_config(cfg: TrainConfig, world_size: Optional[int]) -> dict:
    """The DeepSpeed JSON for this config. `world_size=None` leaves out train_batch_size
    (before launch, when the number of ranks is not known)."""
    return _merge(_derived(cfg, world_size), cfg.deepspeed.config)


def raw_key_conflicts(cfg: TrainConfig) -> Iterator[str]:
    """Raw `deepspeed.config` keys that the sections above already set, differently."""
    ours = flatten(_derived(cfg, world_size=None))
    for raw_key, value in flatten(cfg.deepspeed.config).items():
        owner = next((k for k in OWNED_KEYS if raw_key == k or raw_key.startswith(k + ".")), None)
        if owner is None:
            continue
        if owner in ("optimizer", "scheduler"):
            yield f"deepspeed.config.{raw_key}: set by the {owner}: section, not the raw DeepSpeed config"
            continue
        mine = ours.get(raw_key, _MISSING)
        if mine is _MISSING or mine != value:
            yield (f"deepspeed.config.{raw_key}: {value!r} disagrees with {OWNED_KEYS[owner]}"
                   f" ({'unset' if mine is _MISSING else repr(mine)}); set it there instead")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _derived(cfg: TrainConfig, world_size: Optional[int]) -> dict:
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

"""The exported model: a consolidated save_pretrained directory (safetensors) with its
tokenizer and what it scored, written under a temporary name and renamed into place, so a
reader never sees half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..base.files import writing_folder
from ..base.secrets import redact
from ..config import TrainConfig
from . import models


def export(engine, zero_stage: int, is_main: bool, tokenizer, target: Path, info_file: str, info: dict) -> None:
    """Write the engine's model to `target`. Collective under ZeRO-3 (every rank calls it)."""

    module = engine.module
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = module.state_dict() if is_main else None
    if not is_main:
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing_folder(tmp):
        _write(module, state, tokenizer, tmp, info_file, info)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)


def _write(module, state: dict, tokenizer, tmp: Path, info_file: str, info: dict) -> None:
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        module.save_pretrained(str(tmp), state_dict=state)
        # The model's config is the user's, but a secret-shaped string in it must not reach the
        # artifacts we write (base/secrets.py).
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps(redact(json.loads(config_file.read_text())), indent=2))
    else:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp))
    (tmp / info_file).write_text(json.dumps(info, indent=2))


def reload_module(cfg: TrainConfig, engine, num_labels: int, tokenizer, exported: Path):
    """The exported model as a CPU module, for MLflow's pytorch flavour; None when it is a
    transformers model (MLflow takes those from the exported folder). Built with Hugging Face's
    own Longformer attention and no checkpointing (the same weights and outputs): the module is
    pickled whole, and the blocked attention's forward, bound to each module, does not pickle."""
    import dataclasses

    from transformers import PreTrainedModel

    if isinstance(engine.module, PreTrainedModel):
        return None
    from safetensors.torch import load_file

    plain = dataclasses.replace(cfg.model, longformer_attention="hf", activation_checkpointing=False)
    module = models.build_model(dataclasses.replace(cfg, model=plain), num_labels, tokenizer)
    module.load_state_dict(load_file(str(exported / "model.safetensors")))
    return module.eval()

"""The final evaluation: each best model of a sweep's chosen configuration, once, on the test
split no trial read (the sweep file's `final:`; submit/final.py decides when and records it).

    python -m qarac_dist.train.final < request.json > result.json

The request: {"split": name, "trials": [{"id", "config" (the trial's resolved config), "best"
(its exported best model)}]}; the result: {"metrics": {trial id: {metric: value}}, "rows": n}.
One process on this machine (a GPU where there is one): the test split is read, tokenized
with the trial's own tokenizer, and each model run over it in evaluation mode.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, UserError, config_from_dict
from . import batches, data, models
from .ranks import Ranks
from .validation import evaluate


def _best_model(cfg: TrainConfig, splits: data.Splits, best: Path) -> torch.nn.Module:
    """The exported best model: a transformers folder as MLflow loads it, else the config's
    model with the exported weights."""
    if (best / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(best))
        if cfg.model.longformer_attention == "blocked":
            from .longformer_attention import install

            install(model)
        return model
    from safetensors.torch import load_file

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))
    model = models.build_model(plain, splits.num_labels, splits.tokenizer)
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    return model


def evaluate_test(cfg: TrainConfig, best: Path, split: str) -> tuple[dict[str, float], int]:
    """The test metrics of the model exported in `best`, and the rows they cover."""
    if not (best / "model.safetensors").is_file() and not (best / "config.json").is_file():
        raise UserError(f"{best}: no exported best model here (output.export_best: false, or it was removed)")
    if cfg.model.task == "classification" and cfg.model.num_labels is None:  # the classes it was trained on:
        trained = data.prepare(cfg).num_labels  # a test label past them is a bad row, not a wider model
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_labels=trained))
    splits = data.prepare(cfg, test=split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _best_model(cfg, splits, best).to(device).eval()
    spec = models.input_spec(model)
    collate = batches.Collator(splits.tokenizer.pad_token_id, spec.pad_multiple, spec.global_first_token,
                               cfg.model.task == "regression")
    order = np.argsort(-np.asarray(splits.test["length"][:]), kind="stable")
    metrics = evaluate(model, dataclasses.replace(splits, validation=splits.test), collate, order, Ranks(0, 0, 1),
                       cfg, lambda b: {k: v.to(device) for k, v in b.items()})
    return metrics, len(splits.test)


def main() -> int:
    request = json.load(sys.stdin)
    out: dict = {"metrics": {}, "rows": None}
    try:
        for trial in request["trials"]:
            cfg = config_from_dict(trial["config"], f"trial {trial['id']}")
            out["metrics"][trial["id"]], out["rows"] = evaluate_test(cfg, Path(trial["best"]), request["split"])
    except UserError as err:
        print(f"qarac_dist: final: {err}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

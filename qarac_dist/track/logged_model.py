"""The best model of a trial as an MLflow model, linked to the trial's run: it shows in the UI's
model columns, can be registered, and loads through MLflow's own API.

- A transformers model (the `best/` folder holds save_pretrained output): the transformers
  flavour, as a text-classification pipeline (`mlflow.pyfunc.load_model(uri).predict([...])` or
  `mlflow.transformers.load_model(uri)`).
- Any other `nn.Module` (a dual encoder, a user factory's model): the pytorch flavour, with the
  tokenizer's files beside it (`mlflow.pytorch.load_model(uri)`); the module's class must be
  importable where it is loaded.

The hub is never asked for a model card or licence: the model is a trial's, not a hub name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt")


@contextlib.contextmanager
def _hub_offline():
    """MLflow's transformers flavour looks up the model's card and licence on the hub; for a
    model trained here that only costs retries (minutes without network)."""
    import huggingface_hub.constants as constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "qarac_dist"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def log(uri: str, run_id: str, best_dir: Path, step: int, module=None,
        registered_name: Optional[str] = None) -> Optional[str]:
    """Log the best model, of best step `step` (its tag `best_step`), to `run_id`; returns its
    model id (None when there is nothing to log)."""
    from .mlflow_client import client

    client(uri)  # the environment MLflow is used with here: no URL printing, short timeouts
    import mlflow

    best_dir = Path(best_dir)
    mlflow.set_tracking_uri(uri)
    card = f"qarac_dist trial model, best validation {best_dir.name}"
    with _hub_offline(), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        if (best_dir / "config.json").exists() and module is None:
            import transformers
            from huggingface_hub import ModelCard

            transformers.utils.logging.disable_progress_bar()  # in a job's log or the importer's table: clutter

            pipe = transformers.pipeline("text-classification", model=str(best_dir), tokenizer=str(best_dir))
            info = mlflow.transformers.log_model(pipe, name="model", pip_requirements=_requirements(),
                                                 tags={"best_step": str(step)},
                                                 model_card=ModelCard(f"---\nlicense: other\n---\n# {card}\n"),
                                                 registered_model_name=registered_name)
        elif module is not None:
            extra = [str(best_dir / f) for f in _TOKENIZER_FILES if (best_dir / f).exists()]
            # Pickled, not torch.export'ed: a composite's forward takes keyword batches export cannot trace.
            info = mlflow.pytorch.log_model(module, name="model", extra_files=extra, pip_requirements=_requirements(),
                                            registered_model_name=registered_name, serialization_format="pickle",
                                            tags={"best_step": str(step)})
        else:
            return None
    return info.model_id

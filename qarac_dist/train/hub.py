"""Loading by name from the Hugging Face hub (or its local cache), with failures as one line
that says which key named it and whether the hub was offline."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import UserError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)


def load_error(key: str, name: str, err: BaseException) -> UserError:
    """`key: cannot load 'name': why` for a failed from_pretrained / load_dataset."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    lowered = detail.lower()
    if Path(name).exists():
        reason = f"the local path does not hold it ({detail})"
    elif offline():
        reason = f"the hub is offline here (HF_HUB_OFFLINE is set) and the local cache did not give it ({detail})"
    elif any(word in lowered for word in ("connect", "resolve", "network", "timed out", "offline")):
        reason = f"the hub could not be reached and it is not in the local cache ({detail})"
    else:
        reason = f"not found on the hub nor as a local path ({detail})"
    return UserError(f"{key}: cannot load {name!r}: {reason}")

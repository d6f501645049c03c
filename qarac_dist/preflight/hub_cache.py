"""What the trials load from the Hugging Face hub by name (models, tokenizers, data sets), whether
it is in the caches the trials use, and fetching it there: for compute nodes without internet
(`environment.hub_offline`, `python -m qarac_dist.prefetch`). Imports no torch.

The caches are the trials' own. Models and tokenizers: the hub cache of Environment.hub_cache
(HF_HUB_CACHE or HF_HOME in `environment.variables`, else this shell's, else
~/.cache/huggingface/hub), which an offline job is given as HF_HUB_CACHE. Data sets: prepared
under the trial's `data.cache_dir` (DataConfig.datasets_cache), as `datasets.load_dataset` leaves them.

What counts as cached, for the main revision: a model's snapshot holds config.json and its
weights (model.safetensors, pytorch_model.bin, or an index with every shard it names); a
tokenizer's, tokenizer.json or a vocabulary beside tokenizer_config.json or config.json; a data
set is found prepared by `datasets` itself, offline, with the splits the trials read. That last
is asked of a child process (given only the hub's variables): `datasets` reads the offline
switch once, at import, and this one may be online.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..base.errors import ConfigError, UserError
from ..config.environment import HUB_OFFLINE, Environment
from ..config.schema import apply_overrides
from ..config.sections import datasets_cache

HEADS = "qarac_dist.train.heads:sentence_classifier"
"""The model factory whose `encoder` keyword is a pretrained name."""
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
TEXT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
"""What prefetch takes of a repository besides weights (configs, tokenizers, vocabularies)."""
NO_SPLIT = "has no split"
PYTORCH_WEIGHTS = r"pytorch_model(-\d+-of-\d+)?\.bin"


@dataclass(frozen=True)
class Needed:
    kind: str
    """model, tokenizer or dataset."""
    name: str
    key: str
    """The dotted key of the trial config that names it."""
    config: Optional[str] = None
    """A data set's configuration."""
    splits: tuple[str, ...] = ()
    """The splits of a data set the trials read."""
    cache: str = ""
    """Where `datasets` keeps a data set (under data.cache_dir), absolute."""

    def __str__(self) -> str:
        what = f"{self.name}/{self.config}" if self.config else self.name
        return f"{self.key}: {self.kind} {what}" + (f" (splits {', '.join(self.splits)})" if self.splits else "")


def needed(configs: Iterable[dict], test_split: Optional[str] = None) -> list[Needed]:
    """What trial configs (dicts) load from the hub by name, each once: local paths are not.
    `test_split`: the sweep's final.split, read from each data set once the sweep has chosen."""
    found: dict[tuple, Needed] = {}
    for c in configs:
        model, data = c["model"], c["data"]
        encoder = (model.get("factory_kwargs") or {}).get("encoder") if model.get("factory") == HEADS else None
        tokenizer = c["tokenizer"].get("name_or_path")
        for kind, key, name in (("model", "model.name_or_path", model.get("name_or_path")),
                                ("model", "model.factory_kwargs.encoder", encoder),
                                ("tokenizer", "tokenizer.name_or_path" if tokenizer else "model.name_or_path",
                                 tokenizer or model.get("name_or_path"))):
            if isinstance(name, str) and _on_hub(name):
                found.setdefault((kind, name), Needed(kind, name, key))
        if data.get("dataset"):
            validation = data.get("validation_split") if data.get("validation_fraction") is None else None
            splits = (data["train_split"], *([validation] if validation else []), *([test_split] if test_split else []))
            cache = str(Path(datasets_cache(data["cache_dir"])).resolve())
            ident = ("dataset", data["dataset"], data.get("dataset_config"), cache)
            was = found.get(ident)
            splits = tuple(dict.fromkeys((*(was.splits if was else ()), *splits)))
            found[ident] = Needed("dataset", data["dataset"], "data.dataset", data.get("dataset_config"), splits, cache)
    return list(found.values())


HUB_KEYS = ("model.name_or_path", "model.factory_kwargs.encoder", "tokenizer.name_or_path", "data.")
"""Searched keys whose choices change what the trials load, or where (data.*: the data set, its
splits, its cache)."""


def sweep_configs(spec, trials: list) -> list[dict]:
    """The trials' configs; for a model-based search, whose values are asked for when its jobs
    start, one more for each value a searched key of HUB_KEYS may take."""
    configs = [t.config for t in trials]
    params = spec.search.params if spec.search is not None and configs else {}
    return configs + [apply_overrides(configs[0], [(key, value)]) for key, d in params.items()
                      if key.startswith(HUB_KEYS) and d.distribution == "choice" for value in d.values]


def _on_hub(name: str) -> bool:
    return not name.startswith(("/", ".", "~")) and HUB_NAME.fullmatch(name) is not None and not Path(name).exists()


def missing(items: list[Needed], hub_cache: Path, variables: dict) -> dict[Needed, str]:
    """The items not in the caches, each with what is missing (the hub cache `hub_cache`; data
    sets as `datasets` finds them, with the hub's variables among `variables`)."""
    absent = {n: why for n in items if n.kind != "dataset" and (why := _absent(n, hub_cache))}
    sets = [n for n in items if n.kind == "dataset"]
    return {**absent, **(_datasets_missing(sets, variables) if sets else {})}


def _snapshot(cache: Path, name: str) -> Optional[Path]:
    repo = cache / f"models--{name.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def _weights(snapshot: Path) -> bool:
    """config.json and the weights, every shard of an index (the files are links into blobs:
    is_file follows them, so a link whose blob is gone is missing)."""
    if not (snapshot / "config.json").is_file():
        return False
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (snapshot / single).is_file():
            return True
        try:
            shards = set(json.loads((snapshot / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if shards and all((snapshot / s).is_file() for s in shards):
            return True
    return False


def _absent(item: Needed, cache: Path) -> Optional[str]:
    """What of `item` the hub cache lacks, or None."""
    snapshot = _snapshot(cache, item.name)
    if snapshot is None:
        return "is not in the trials' cache"
    if item.kind == "model":
        return None if _weights(snapshot) else "is in the trials' cache without config.json or its weights"
    return None if _tokenizer(snapshot) else ("is in the trials' cache without tokenizer.json or a vocabulary, "
                                              "or without tokenizer_config.json or config.json")


def _tokenizer(snapshot: Path) -> bool:
    """A tokenizer's own files: tokenizer.json, or a vocabulary (a BPE's vocab.json with its merges),
    and what AutoTokenizer reads first to know its class: tokenizer_config.json or config.json
    (tokenizers' own from_pretrained leaves tokenizer.json alone)."""
    have = {f for f in TOKENIZER_FILES if (snapshot / f).is_file()}
    vocabulary = bool(have - {"vocab.json"}) or ("vocab.json" in have and (snapshot / "merges.txt").is_file())
    return vocabulary and any((snapshot / f).is_file() for f in ("tokenizer_config.json", "config.json"))


def _hub_variables(variables: dict) -> dict:
    """Of the trials' variables, the hub's (a child here gets no PYTHONHOME or LD_PRELOAD meant
    for the jobs)."""
    return {k: str(v) for k, v in variables.items() if k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}


def _split_names(split: str) -> list[str]:
    """The splits `datasets` reads for a split expression: train[:50%]+validation -> both names."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def _datasets_missing(sets: list[Needed], variables: dict) -> dict[Needed, str]:
    asked = [[n.name, n.config, n.cache] for n in sets]
    env = {**os.environ, **_hub_variables(variables), **HUB_OFFLINE}
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(asked), env=env, capture_output=True,
                          text=True, timeout=600)
    try:
        answers = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        said = (proc.stderr.strip().splitlines() or ["no answer"])[-1][:300]
        raise UserError(f"could not ask datasets what it has cached ({sys.executable}: {said})") from None
    out = {}
    for n, have in zip(sets, answers):
        if have is None:
            out[n] = "is not prepared in the trials' cache"
        elif lacking := [s for split in n.splits for s in _split_names(split) if s not in have]:
            out[n] = (f"{NO_SPLIT} {lacking[0]!r} (it has {', '.join(have) or 'none'}; data.train_split, "
                      f"data.validation_split, data.validation_fraction or final.split choose)")
    return out


def fetch(item: Needed, hub_cache: Path) -> None:
    """Download `item` into its cache (huggingface_hub's and datasets' own progress bars): a
    model's top-level configs, tokenizer files and weights (safetensors, else PyTorch's), a
    tokenizer's files without weights, a data set prepared as the trials load it."""
    if item.kind == "dataset":
        import datasets

        datasets.load_dataset(item.name, item.config, cache_dir=item.cache)
        return
    from huggingface_hub import list_repo_files, snapshot_download

    top = [f for f in list_repo_files(item.name) if "/" not in f]
    text = [f for f in top if f.endswith(TEXT_SUFFIXES)]
    weights = [f for f in top if f.endswith(".safetensors")] or [f for f in top if re.fullmatch(PYTORCH_WEIGHTS, f)]
    snapshot_download(item.name, cache_dir=hub_cache, allow_patterns=text + (weights if item.kind == "model" else []))


def refuse_missing(env: Environment, configs: Iterable[dict], source: str, overrides: Iterable[str] = (),
                   test_split: Optional[str] = None) -> None:
    """For an offline sweep: ConfigError, one line for each thing its trials (or its final
    evaluation, on `test_split`) would not find in their caches, naming it and the command that
    fetches it (not for a split the data set lacks)."""
    cache = env.hub_cache(os.environ)
    absent = missing(needed(configs, test_split), cache, env.exported())
    if absent:
        command = shlex.join(["python", "-m", "qarac_dist.prefetch", source, *overrides])
        raise ConfigError([f"{source}: environment.hub_offline: {n} {why} ({n.cache or cache})"
                           + ("" if config_mistake(why) else f"; on a node that reaches the hub: {command}")
                           for n, why in absent.items()])


def config_mistake(why: str) -> bool:
    """Whether what `missing` says is a mistake of the config (a split the data set lacks), which
    fetching cannot mend."""
    return why.startswith(NO_SPLIT)


def go_offline(env: Environment) -> None:
    """This process loads as the trials do: offline, from their hub cache (the preflight audit
    loads their models here; huggingface_hub reads these once, when first imported)."""
    os.environ.update({k: v for k, v in env.exported().items() if k in HUB_OFFLINE or k == "HF_HUB_CACHE"})


def hub_variables(env: Environment) -> dict:
    """What prefetch takes of the trials' variables: the hub's (HF_HOME, HF_TOKEN, HF_ENDPOINT),
    not its offline switches."""
    return {k: v for k, v in _hub_variables(env.variables).items() if k not in HUB_OFFLINE}


def _answer() -> None:
    """In the child, offline: for each [name, config, cache] on stdin, the splits datasets finds
    prepared there, or None."""
    import datasets

    answers = []
    for name, config, cache in json.loads(sys.stdin.read()):
        try:
            builder = datasets.load_dataset_builder(name, config, cache_dir=cache)
            answers.append(sorted(builder.info.splits or {}) if os.path.isdir(builder.cache_dir) else None)
        except Exception:  # noqa: BLE001 - not cached: datasets says so in many ways
            answers.append(None)
    print(json.dumps(answers))


if __name__ == "__main__":
    _answer()

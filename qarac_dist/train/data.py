"""Data: the generated long-document set, loading with `datasets`, tokenization, batching.

Batching is planned per optimizer step: one step takes `micro_batch x accumulation x world`
examples, which are split into micro batches per rank. So micro batch 2 x accumulation 4 sees
exactly the examples of micro batch 8, and a step's examples do not depend on the ZeRO stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config import TrainConfig, UserError
from ..config.sections import DataConfig
from . import labels
from .synthetic import generate_similarity, generate_synthetic

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterator[str], vocab_size: int, directory: Path):
    """Train a WordLevel tokenizer (whitespace words) and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(directory))
    return fast


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_dir(final: Path, fill) -> None:
    """Build a directory under a temporary name and rename it into place (rank 0 only)."""
    if final.exists():
        return
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def synthetic_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"synthetic-{_fingerprint(asdict(cfg.synthetic))}"


# ---------------------------------------------------------------- loading and tokenizing

@dataclass
class Splits:
    """Tokenized train and validation sets (`datasets.Dataset` with input_ids, length, labels)."""

    train: object
    validation: object
    tokenizer: object
    num_labels: int
    label_names: Optional[list[str]]
    report: dict
    """Per split: rows, unlabelled rows left out, documents and tokens cut by data.max_length
    (`data_report`)."""


def _raw_splits(cfg: TrainConfig) -> list[labels.Split]:
    """The splits as loaded, train first; with validation_fraction, the training split alone."""
    import sys

    import datasets

    if not sys.stderr.isatty():  # progress bars only clutter job logs
        datasets.disable_progress_bars()

    d = cfg.data
    cache = str(Path(d.cache_dir) / "hf")
    if d.synthetic is not None:
        directory = synthetic_dir(d)
        generate = generate_similarity if d.synthetic.task == "similarity" else generate_synthetic
        _atomic_dir(directory, lambda tmp: generate(d.synthetic, tmp))
        return [labels.Split(name, _load_files("data.synthetic", "json", [str(directory / f"{name}.jsonl")], cache),
                             f"data.synthetic ({directory / name}.jsonl)") for name in ("train", "validation")]
    if d.train_files is not None:
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}[Path(d.train_files[0]).suffix]
        named = [("train", "data.train_files", d.train_files)]
        if d.validation_fraction is None:
            named.append(("validation", "data.validation_files", d.validation_files))
        return [labels.Split(name, _load_files(key, kind, files, cache), f"{key} ({', '.join(files)})")
                for name, key, files in named]
    named = [("train", d.train_split)] + ([("validation", d.validation_split)] if d.validation_fraction is None else [])
    return [labels.Split(name, _load_hub(d.dataset, d.dataset_config, split, cache),
                         f"data.dataset ({d.dataset}{'/' + d.dataset_config if d.dataset_config else ''}, "
                         f"split {split!r})") for name, split in named]


def _held_out(cfg: TrainConfig, train):
    """Train and validation from one split: the validation rows depend on `data.split_seed`
    only, so every trial of a sweep, whatever its training.seed, validates on the same rows."""
    if len(train) < 2:
        raise UserError(f"data.validation_fraction: the training split has {len(train)} row(s), too few to hold "
                        f"some out")
    held = train.train_test_split(test_size=cfg.data.validation_fraction, seed=cfg.data.split_seed or 0)
    return held["train"], held["test"]


def _load_files(key: str, kind: str, files: list[str], cache: str):
    """One split from local files; unreadable, empty or row-less files are one line."""
    import datasets

    for path in files:
        if os.path.getsize(path) == 0:
            raise UserError(f"{key}: {path} is empty")
    try:
        split = datasets.load_dataset(kind, data_files={"split": list(files)}, cache_dir=cache)["split"]
    except Exception as err:  # noqa: BLE001 - datasets' and pyarrow's many parse errors, in one line
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{key}: cannot read {', '.join(files)} as {kind}: {type(err).__name__}: {first}") from None
    if len(split) == 0:
        raise UserError(f"{key}: {', '.join(files)} hold no rows")
    return split


def _load_hub(name: str, config: Optional[str], split: str, cache: str):
    import datasets

    from .hub import load_error

    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"data.{'validation_split' if split != 'train' else 'train_split'}: {name} has no split "
                            f"{split!r} ({str(err).splitlines()[0][:200]})") from None
        raise load_error("data.dataset", name, err) from None
    except Exception as err:  # noqa: BLE001 - hub, network and cache errors, in one line
        raise load_error("data.dataset", name, err) from None


def _load_tokenizer(cfg: TrainConfig, train):
    from transformers import AutoTokenizer

    name = cfg.tokenizer.name_or_path or cfg.model.name_or_path
    if name is not None:
        from .hub import load_error

        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as err:  # noqa: BLE001 - hub, network and cache errors, in one line
            key = "tokenizer.name_or_path" if cfg.tokenizer.name_or_path else "model.name_or_path"
            raise load_error(key, name, err) from None
    texts_fp = train._fingerprint if hasattr(train, "_fingerprint") else "none"
    directory = Path(cfg.data.cache_dir) / f"tokenizer-{_fingerprint([texts_fp, cfg.tokenizer.vocab_size, cfg.data.text_column, cfg.data.text_pair_column])}"

    def fill(tmp: Path) -> None:
        cols = [c for c in (cfg.data.text_column, cfg.data.text_pair_column) if c]
        texts = (row[c] for row in train.select_columns(cols) for c in cols)
        train_tokenizer(texts, cfg.tokenizer.vocab_size, tmp)

    _atomic_dir(directory, fill)
    return AutoTokenizer.from_pretrained(str(directory))


def prepared_marker(cfg: TrainConfig) -> Path:
    """A file that says `prepare` has completed for this data recipe, so the caches are warm
    and every rank may read them at once. Local files count with their size and mtime."""
    import datasets

    files = [*(cfg.data.train_files or []), *(cfg.data.validation_files or [])]
    stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] if os.path.exists(f) else [f] for f in files]
    recipe = [asdict(cfg.data), asdict(cfg.tokenizer), cfg.model.name_or_path, cfg.model.kind, cfg.model.task,
              cfg.model.num_labels, stats, datasets.__version__]
    return Path(cfg.data.cache_dir) / "prepared" / _fingerprint(recipe)


def prepare(cfg: TrainConfig) -> Splits:
    """Load, label-encode and tokenize both splits. Results are cached by `datasets`; under
    several ranks, on a cold cache call it on rank 0 first, then on the others; once
    `prepared_marker(cfg)` exists, on all of them at once (see train.py)."""
    splits = _prepare(cfg)
    marker = prepared_marker(cfg)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return splits


def _prepare(cfg: TrainConfig) -> Splits:
    d = cfg.data
    if d.synthetic is not None and d.synthetic.task == "similarity" and d.text_pair_column is None:
        import dataclasses

        d = dataclasses.replace(d, text_pair_column="text_pair")
        cfg = dataclasses.replace(cfg, data=d)
    separate = cfg.model.kind == "dual_encoder"  # each text encoded on its own
    raw = _raw_splits(cfg)
    _check_columns(d, raw)
    task_labels, keep_rows = labels.check(cfg, raw)
    unlabelled = {s.name: len(s.rows) - len(keep_rows[s.name]) for s in raw if s.name in keep_rows}
    loaded = {s.name: s.rows.select(keep_rows[s.name]) if s.name in keep_rows else s.rows for s in raw}
    train, validation = (loaded["train"], loaded["validation"]) if "validation" in loaded else _held_out(cfg, loaded["train"])
    if d.max_train_examples is not None:
        train = train.select(range(min(d.max_train_examples, len(train))))
    if d.max_validation_examples is not None:
        validation = validation.select(range(min(d.max_validation_examples, len(validation))))
    tokenizer = _load_tokenizer(cfg, train)
    to_id = task_labels.to_id
    keep = [n for n in tokenizer.model_input_names if n != "attention_mask"]

    def encode(batch):
        pair = batch[d.text_pair_column] if d.text_pair_column else None
        sides = [(batch[d.text_column], None if separate else pair, "")] + ([(pair, None, "_b")] if separate else [])
        out = {"length": [0] * len(batch[d.text_column])}
        out["tokens_whole"] = out["tokens_cut"] = out["length"]
        for text, text_pair, suffix in sides:
            enc = tokenizer(text, text_pair, truncation=True, max_length=d.max_length)
            # Again without truncation, to count what it cut (verbose=False: no warning per long text).
            whole = [len(ids) for ids in tokenizer(text, text_pair, verbose=False)["input_ids"]]
            lengths = [len(ids) for ids in enc["input_ids"]]
            out.update({f"{k}{suffix}": enc[k] for k in keep if k in enc})
            out["length"] = [max(x, n) for x, n in zip(out["length"], lengths)]
            out["tokens_whole"] = [x + w for x, w in zip(out["tokens_whole"], whole)]
            out["tokens_cut"] = [x + w - n for x, w, n in zip(out["tokens_cut"], whole, lengths)]
        values = batch[d.label_column]
        if to_id is not None:
            values = [to_id[label] for label in values]
        out["labels"] = [float(v) for v in values] if cfg.model.task == "regression" else [int(v) for v in values]
        return out

    # Our own fingerprint: datasets' hash of `encode` changes once the tokenizer has been called
    # (it keeps truncation state), which would defeat the cache on every run.
    recipe = [separate, d.max_length, d.text_column, d.text_pair_column, d.label_column, cfg.model.task,
              task_labels.names, keep, _tokenizer_digest(tokenizer), "tokens_cut"]

    def tokenize(split):
        return split.map(encode, batched=True, batch_size=256, remove_columns=split.column_names,
                         desc="tokenizing", new_fingerprint=_fingerprint([split._fingerprint, recipe]))

    report = {}
    tokenized = {}
    for name, split in (("train", train), ("validation", validation)):
        split = tokenize(split)
        whole, cut = np.asarray(split["tokens_whole"][:]), np.asarray(split["tokens_cut"][:])
        report[name] = {"rows": len(split), "unlabelled_rows": unlabelled.get(name, 0),
                        "truncated_documents": int((cut > 0).sum()), "tokens": int(whole.sum()),
                        "truncated_tokens": int(cut.sum())}
        tokenized[name] = split.remove_columns(["tokens_whole", "tokens_cut"])
    return Splits(tokenized["train"], tokenized["validation"], tokenizer, task_labels.num_labels, task_labels.names,
                  report)


HEAVY_TRUNCATION = 0.01
"""Above this fraction of a split's tokens cut, truncation is a warning (preflight), not a note."""


def report_lines(report: dict, max_length: int) -> list[tuple[str, str]]:
    """What a reader of the metric must know, as (level, line): rows left out, documents cut,
    and (once the trainer added it) each epoch's tail that does not fill a step."""
    lines = []
    if report.get("dropped_per_epoch"):
        lines.append(("note", f"data: each epoch leaves out {report['dropped_per_epoch']} of {report['train']['rows']} "
                              f"training rows, drawn anew each epoch (a step takes {report['examples_per_step']})"))
    for name in ("train", "validation"):
        r = report[name]
        if r["unlabelled_rows"]:
            lines.append(("note", f"data: {r['unlabelled_rows']} unlabelled row(s) (label {labels.UNLABELLED}) of the "
                                  f"{name} split left out; {r['rows']} remain"))
        if r["truncated_documents"]:
            level = "warn" if r["truncated_tokens"] > HEAVY_TRUNCATION * r["tokens"] else "note"
            lines.append((level, f"data.max_length: {r['truncated_documents']} of {r['rows']} {name} documents cut at "
                                 f"{max_length} tokens ({r['truncated_tokens']:,} of {r['tokens']:,} tokens cut)"))
    return lines


def _check_columns(d: DataConfig, splits: list[labels.Split]) -> None:
    """Every split holds the configured columns."""
    for split in splits:
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(d, key)
            if column and column not in split.rows.column_names:
                raise UserError(f"data.{key}: column {column!r} not in the {split.name} split "
                                f"(columns: {', '.join(split.rows.column_names)})")


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps([tokenizer.name_or_path, len(tokenizer)])
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- batching

class StepBatches:
    """Deterministic, length-grouped, rank-sharded batches, planned one optimizer step at a time.

    Per epoch, the indices are shuffled with `seed + epoch`, cut into windows of 50 steps,
    sorted by length inside each window (so a micro batch holds similar lengths), cut into
    steps, and the steps shuffled. A step's sorted examples are dealt as `accumulation x world`
    micro batches; micro batch `a` of rank `r` is chunk `a * world + r`, so ranks process
    similar lengths at the same time. The tail that does not fill a step is dropped.
    """

    WINDOW_STEPS = 50

    def __init__(self, lengths: np.ndarray, micro_batch: int, accumulation: int, world_size: int,
                 rank: int, seed: int, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.micro, self.accumulation, self.world, self.rank = micro_batch, accumulation, world_size, rank
        self.seed, self.group = seed, group_by_length
        self.step_size = micro_batch * accumulation * world_size
        self.steps_per_epoch = len(self.lengths) // self.step_size
        if self.steps_per_epoch == 0:
            raise UserError(f"training.micro_batch_size: a step needs {self.step_size} examples "
                             f"(micro x accumulation x world), the training set has {len(self.lengths)}")

    def epoch_steps(self, epoch: int) -> np.ndarray:
        """All steps of an epoch, shape (steps, step_size), each row sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.step_size]
        if self.group:
            window = self.WINDOW_STEPS * self.step_size
            order = np.concatenate([
                chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(window, len(order), window))])
        steps = order.reshape(self.steps_per_epoch, self.step_size)
        return steps[rng.permutation(self.steps_per_epoch)]

    def for_rank(self, step_indices: np.ndarray) -> list[np.ndarray]:
        chunks = step_indices.reshape(self.accumulation * self.world, self.micro)
        return [chunks[a * self.world + self.rank] for a in range(self.accumulation)]

    def iterate(self, start_step: int = 0) -> Iterator[list[np.ndarray]]:
        """Yield this rank's micro batches for each optimizer step, from global step `start_step`."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            steps = self.epoch_steps(epoch)
            for row in steps[offset:]:
                yield self.for_rank(row)
            epoch, offset = epoch + 1, 0


@dataclass
class Collator:
    """Pads a micro batch to its longest example, rounded up to `pad_multiple`; for Longformer,
    the multiple is the attention window and the first token gets global attention."""

    pad_token_id: int
    pad_multiple: int = 8
    global_first_token: bool = False
    regression: bool = False

    def __call__(self, rows: dict) -> dict:
        import torch

        batch = self._side(rows, "")
        if "input_ids_b" in rows:  # a dual encoder's second text
            batch.update(self._side(rows, "_b"))
        batch["labels"] = torch.tensor(rows["labels"], dtype=torch.float if self.regression else torch.long)
        return batch

    def _side(self, rows: dict, suffix: str) -> dict:
        import torch

        ids = rows[f"input_ids{suffix}"]
        longest = max(len(x) for x in ids)
        width = -(-longest // self.pad_multiple) * self.pad_multiple
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x)
            attention[i, : len(x)] = 1
        batch = {f"input_ids{suffix}": input_ids, f"attention_mask{suffix}": attention}
        if f"token_type_ids{suffix}" in rows:
            types_ = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(rows[f"token_type_ids{suffix}"]):
                types_[i, : len(x)] = torch.as_tensor(x)
            batch[f"token_type_ids{suffix}"] = types_
        if self.global_first_token:
            glob = torch.zeros_like(attention)
            glob[:, 0] = 1
            batch[f"global_attention_mask{suffix}"] = glob
        return batch

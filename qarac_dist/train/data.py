"""Data: the generated long-document set, loading with `datasets`, the checks of what reaches
the metric (train/labels.py), tokenization and its report. Batching: train/batches.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
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
    """The generated train and validation files; the same folder whatever the test split."""
    spec = {k: v for k, v in asdict(cfg.synthetic).items() if k != "num_test"}
    return Path(cfg.cache_dir) / f"synthetic-{_fingerprint(spec)}"


def synthetic_test_dir(cfg: DataConfig) -> Path:
    """The generated test split, in a folder of its own that only the final evaluation makes:
    the documents the generator draws after train and validation."""
    return Path(cfg.cache_dir) / f"synthetic-test-{_fingerprint(asdict(cfg.synthetic))}"


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
    inputs: list = field(default_factory=list)
    """Per split, what the run's MLflow dataset inputs name: where it came from, a digest of
    its rows as read (datasets' fingerprint, its own cache key: the files' paths, sizes and
    modification times, or the hub revision), how many (track/mlflow_client.dataset_inputs)."""
    test: object = None
    """The test split, tokenized; only the final evaluation asks for it (`prepare(cfg, test=...)`)."""


def _raw_splits(cfg: TrainConfig, test: Optional[str] = None) -> list[labels.Split]:
    """The splits as loaded, train first; with validation_fraction, the training split alone;
    the test split (named `test`: a hub split, or test_files, or the generated one) last, only
    when asked for: no trial asks."""
    import sys

    import datasets

    if not sys.stderr.isatty():  # progress bars only clutter job logs
        datasets.disable_progress_bars()

    d = cfg.data
    cache = d.datasets_cache
    if d.synthetic is not None:
        directory = synthetic_dir(d)
        generate = generate_similarity if d.synthetic.task == "similarity" else generate_synthetic
        _atomic_dir(directory, lambda tmp: generate(d.synthetic, tmp))
        named = [(name, directory) for name in ("train", "validation")]
        if test is not None:
            if not d.synthetic.num_test:
                raise UserError("data.synthetic.num_test: the generated set has no test split; set it")
            named.append(("test", synthetic_test_dir(d)))
            _atomic_dir(named[-1][1], lambda tmp: generate(d.synthetic, tmp, ("test",)))
        return [labels.Split(name, _load_files("data.synthetic", "json", [str(folder / f"{name}.jsonl")], cache),
                             f"data.synthetic ({folder / name}.jsonl)") for name, folder in named]
    if d.train_files is not None:
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}[Path(d.train_files[0]).suffix]
        named = [("train", "data.train_files", d.train_files)]
        if d.validation_fraction is None:
            named.append(("validation", "data.validation_files", d.validation_files))
        if test is not None:
            if not d.test_files:
                raise UserError("data.test_files: the test split's files are not set")
            named.append(("test", "data.test_files", d.test_files))
        return [labels.Split(name, _load_files(key, kind, files, cache), f"{key} ({', '.join(files)})")
                for name, key, files in named]
    named = [("train", d.train_split)] + ([("validation", d.validation_split)] if d.validation_fraction is None else [])
    named += [("test", test)] if test is not None else []
    return [labels.Split(name, _load_hub(d.dataset, d.dataset_config, split, cache, name),
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


def _load_hub(name: str, config: Optional[str], split: str, cache: str, role: str):
    import datasets

    from .hub import load_error

    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache)
    except ValueError as err:
        if "split" in str(err).lower():
            key = {"train": "data.train_split", "validation": "data.validation_split"}.get(role, "final.split")
            raise UserError(f"{key}: {name} has no split "
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


def prepare(cfg: TrainConfig, test: Optional[str] = None) -> Splits:
    """Load, label-encode and tokenize both splits. Results are cached by `datasets`; under
    several ranks, on a cold cache call it on rank 0 first, then on the others; once
    `prepared_marker(cfg)` exists, on all of them at once (see train.py)."""
    splits = _prepare(cfg, test)
    marker = prepared_marker(cfg)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return splits


def _prepare(cfg: TrainConfig, test: Optional[str] = None) -> Splits:
    d = cfg.data
    if d.synthetic is not None and d.synthetic.task == "similarity" and d.text_pair_column is None:
        d = dataclasses.replace(d, text_pair_column="text_pair")
        cfg = dataclasses.replace(cfg, data=d)
    separate = cfg.model.kind == "dual_encoder"  # each text encoded on its own
    raw = _raw_splits(cfg, test)
    _check_columns(d, raw)
    task = labels.check(cfg, raw)
    read = {s.name: len(s.rows) for s in raw}
    loaded = {s.name: _checked(s.rows, task, s.name) for s in raw}
    train, validation = (loaded["train"], loaded["validation"]) if "validation" in loaded \
        else _held_out(cfg, loaded["train"])
    if d.max_train_examples is not None:
        train = train.select(range(min(d.max_train_examples, len(train))))
    if d.max_validation_examples is not None:
        validation = validation.select(range(min(d.max_validation_examples, len(validation))))
    tokenizer = _load_tokenizer(cfg, train)
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
        out["labels"] = batch[CHECKED_LABEL]
        return out

    # Our own fingerprint: datasets' hash of `encode` changes once the tokenizer has been called
    # (it keeps truncation state), which would defeat the cache on every run.
    recipe = [separate, d.max_length, d.text_column, d.text_pair_column, keep, _tokenizer_digest(tokenizer),
              "tokens_cut"]

    def tokenize(split):
        return split.map(encode, batched=True, batch_size=256, remove_columns=split.column_names,
                         desc="tokenizing", new_fingerprint=_fingerprint([split._fingerprint, recipe]))

    report = {}
    tokenized = {}
    for name, split in (("train", train), ("validation", validation), *([("test", loaded["test"])] if test else [])):
        split = tokenize(split)
        whole, cut = np.asarray(split["tokens_whole"][:]), np.asarray(split["tokens_cut"][:])
        report[name] = {"rows": len(split), "rows_read": read.get(name), "unlabelled_rows":
                        read[name] - len(loaded[name]) if name in read else 0,
                        "truncated_documents": int((cut > 0).sum()), "tokens": int(whole.sum()),
                        "truncated_tokens": int(cut.sum())}
        tokenized[name] = split.remove_columns(["tokens_whole", "tokens_cut"])
    return Splits(tokenized["train"], tokenized["validation"], tokenizer, task.num_labels, task.names, report,
                  [_input(d, name, split) for name, split in (("train", train), ("validation", validation))],
                  tokenized.get("test"))


def with_validation(splits: Splits) -> Splits:
    """Train on train + validation (a final retraining): the validation rows join the training
    split, and its report counts them (rows, tokens, documents cut); nothing is held out, so
    nothing is validated and the report has no validation split."""
    import datasets

    train = datasets.concatenate_datasets([splits.train, splits.validation])
    held, joined = splits.report["train"], splits.report["validation"]
    counts = {k: v + joined[k] if isinstance(v, int) and isinstance(joined.get(k), int) else v for k, v in held.items()}
    report = {**{k: v for k, v in splits.report.items() if k != "validation"},
              "train": {**counts, "rows": len(train), "validation_rows_added": len(splits.validation)}}
    return dataclasses.replace(splits, train=train, report=report)


def _input(d: DataConfig, context: str, rows) -> dict:
    """A split as an MLflow dataset input (as mlflow.data's sources spell theirs)."""
    if d.synthetic is not None:
        name, kind, source = "generated", "local", {"uri": str(synthetic_dir(d).absolute())}
    elif d.train_files is not None:
        files = d.train_files if context == "train" or d.validation_fraction is not None else d.validation_files
        name, kind, source = Path(files[0]).stem, "local", {"uri": ", ".join(str(Path(f).absolute()) for f in files)}
    else:
        split = d.train_split if context == "train" or d.validation_fraction is not None else d.validation_split
        name, kind = d.dataset, "hugging_face"
        source = {"path": d.dataset, "config_name": d.dataset_config, "split": split}
    return {"context": context, "name": name, "source_type": kind, "source": source,
            "digest": str(rows._fingerprint)[:36], "rows": len(rows)}


CHECKED_LABEL = "qarac_label"
"""The column of checked labels (labels.Labels.values) that tokenizing turns into `labels`."""


def _checked(rows, task: labels.Labels, name: str):
    """`rows` with its checked labels as a column, less the rows without a label."""
    values = task.values[name]
    fingerprint = _fingerprint([rows._fingerprint, CHECKED_LABEL, hashlib.sha256(values.tobytes()).hexdigest()])
    rows = rows.add_column(CHECKED_LABEL, values.tolist(), new_fingerprint=fingerprint)
    return rows.select(task.keep[name]) if name in task.keep else rows


HEAVY_TRUNCATION = 0.01
"""Above this fraction of a split's tokens cut, truncation is a warning (preflight), not a note."""


def report_lines(report: dict, max_length: int) -> list[tuple[str, str]]:
    """What a reader of the metric must know, as (level, line): rows left out, documents cut,
    and (once the trainer added it) each epoch's tail that does not fill a step."""
    lines = []
    if report.get("dropped_per_epoch"):
        lines.append(("note", f"data: each epoch leaves out {report['dropped_per_epoch']} of {report['train']['rows']} "
                              f"training rows, drawn anew each epoch (a step takes {report['examples_per_step']})"))
    for name in [n for n in ("train", "validation") if n in report]:  # a retraining has none held out
        r = report[name]
        if r["unlabelled_rows"]:
            lines.append(("note", f"data: {r['unlabelled_rows']} of the {r['rows_read']} rows read for the {name} "
                                  f"split are unlabelled (label {labels.UNLABELLED}) and left out"))
        if r["truncated_documents"]:
            level = "warn" if r["truncated_tokens"] > HEAVY_TRUNCATION * r["tokens"] else "note"
            lines.append((level, f"data.max_length: {r['truncated_documents']} of {r['rows']} {name} documents cut at "
                                 f"{max_length} tokens ({r['truncated_tokens']:,} of {r['tokens']:,} tokens cut)"))
    return lines


def _check_columns(d: DataConfig, splits: list[labels.Split]) -> None:
    """Every split holds the configured columns, and text in every cell of its text columns."""
    for split in splits:
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(d, key)
            if column and column not in split.rows.column_names:
                raise UserError(f"data.{key}: column {column!r} not in the {split.name} split "
                                f"(columns: {', '.join(split.rows.column_names)})")
        for column in filter(None, (d.text_column, d.text_pair_column)):
            values = split.rows[column][:]
            if labels.kind(split.rows.features[column]) != "string" or None in values:
                row = next(i for i, v in enumerate(values) if not isinstance(v, str))
                raise labels.bad_row(split, column, row, values[row], "text")


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps([tokenizer.name_or_path, len(tokenizer)])
    return hashlib.sha256(text.encode()).hexdigest()

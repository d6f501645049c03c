"""The generated data sets: long documents whose class shows only after a cut, and scored
text pairs. Seeded: the same settings give byte-identical files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config.sections import SyntheticConfig


def _pseudo_words(rng: np.random.Generator, count: int, syllables: int, taken: set[str]) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _draws(spec: SyntheticConfig, written: tuple[str, ...], directory: Path):
    """(split, file or None) in the order the generator draws them: train, validation, then the
    test split's documents; a split not `written` is drawn and dropped, so the test documents
    are the same whichever folder holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", spec.num_train), ("validation", spec.num_validation), ("test", spec.num_test or 0)):
        if split not in written:
            yield count, None
            continue
        with open(directory / f"{split}.jsonl", "w") as f:
            yield count, f


def generate_synthetic(spec: SyntheticConfig, directory: Path, written=("train", "validation")) -> None:
    """Write train.jsonl and validation.jsonl (or the splits `written`): documents of min..max
    words whose label shows only after word `evidence_after`, as class-specific words at
    `evidence_rate`.

    Filler words are drawn from one class-independent list everywhere, and document length is
    independent of the label, so the first `evidence_after` words carry no information.
    """
    rng = np.random.default_rng(spec.seed)
    taken: set[str] = set()
    filler = np.array(_pseudo_words(rng, 2000, 3, taken))
    class_words = [np.array(_pseudo_words(rng, 20, 4, taken)) for _ in range(spec.num_classes)]
    for count, f in _draws(spec, written, directory):
        for _ in range(count):
            label = int(rng.integers(spec.num_classes))
            length = int(rng.integers(spec.min_tokens, spec.max_tokens + 1))
            words = filler[rng.integers(len(filler), size=length)]
            tail = np.arange(spec.evidence_after, length)
            hits = tail[rng.random(len(tail)) < spec.evidence_rate]
            words[hits] = class_words[label][rng.integers(20, size=len(hits))]
            if f is not None:
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


def generate_similarity(spec: SyntheticConfig, directory: Path, written=("train", "validation")) -> None:
    """Write text pairs scored by shared topics: each text mixes two of eight topics' words into
    neutral filler; the score is the fraction of topics the pair shares (0, 0.5 or 1)."""
    rng = np.random.default_rng(spec.seed)
    taken: set[str] = set()
    filler = np.array(_pseudo_words(rng, 2000, 3, taken))
    topics = [np.array(_pseudo_words(rng, 30, 4, taken)) for _ in range(8)]

    def text(chosen) -> str:
        length = int(rng.integers(spec.min_tokens, spec.max_tokens + 1))
        words = filler[rng.integers(len(filler), size=length)]
        hits = np.flatnonzero(rng.random(length) < max(spec.evidence_rate, 0.2))
        picks = rng.integers(len(chosen), size=len(hits))
        words[hits] = [topics[chosen[k]][rng.integers(30)] for k in picks]
        return " ".join(words)

    for count, f in _draws(spec, written, directory):
        for _ in range(count):
            a = rng.choice(8, size=2, replace=False)
            shared = int(rng.integers(3))  # 0, 1 or 2 topics in common
            others = [t for t in range(8) if t not in a]
            b = list(a[:shared]) + list(rng.choice(others, size=2 - shared, replace=False))
            pair = {"text": text(list(a)), "text_pair": text(b), "label": shared / 2}
            if f is not None:
                f.write(json.dumps(pair) + "\n")

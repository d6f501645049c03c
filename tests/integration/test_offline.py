"""Compute nodes without internet (`environment.hub_offline`): the sweep refuses, before anything
is created, while a model, tokenizer or data set its trials load is not in their caches;
`python -m qarac_dist.prefetch` fills them from the hub, here a stand-in on 127.0.0.1
(tests/helpers/hub_standin.py: nothing reaches the real hub); a second prefetch asks it nothing;
then the trial runs offline and completes, asking the hub nothing either."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qarac_dist.submit.sweep_dir import Manifest
from support import HELPERS, run_sweep, tiny_config, write_config

sys.path.insert(0, HELPERS)
from hub_standin import Hub  # noqa: E402


@pytest.fixture
def hub(tmp_path):
    """The stand-in hub with a tiny BERT (its tokenizer in the same repository) and a csv data set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    root = tmp_path / "hub"
    model = root / "models" / "tiny-org" / "tiny-bert"
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=64)).save_pretrained(model)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(model)
    data = root / "datasets" / "tiny-org" / "tiny-text"
    data.mkdir(parents=True)
    (data / "train.csv").write_text("text,label\n" + "".join(f"a b c {'x' * (i % 3)},{i % 2}\n" for i in range(24)))
    (data / "validation.csv").write_text("text,label\n" + "".join(f"b c {'y' * (i % 2)},{i % 2}\n" for i in range(8)))
    served = Hub(root).start()
    yield served
    served.shutdown()


def _prefetch(path, hub_url: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qarac_dist.prefetch", str(path)], cwd=path.parent,
                          env={**__import__("os").environ, "HF_ENDPOINT": hub_url, **env}, capture_output=True,
                          text=True, timeout=600)


def test_an_offline_sweep_is_refused_until_prefetch_fills_its_caches_then_runs_without_the_hub(tmp_path, hub):
    base = tiny_config(tmp_path / "data", tmp_path / "unused", training={"max_steps": 2, "micro_batch_size": 4},
                       evaluation={"every_steps": 2})
    base["model"] = {"name_or_path": "tiny-org/tiny-bert"}
    base["tokenizer"] = {}
    base["data"] = {"dataset": "tiny-org/tiny-text", "max_length": 16, "cache_dir": str(tmp_path / "data")}
    path = write_config(tmp_path / "offline.yaml", {
        "name": "offline", "base": base, "runs_dir": str(tmp_path / "runs"), "executor": "local",
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "grid": {"training.seed": [0]},
        "environment": {"hub_offline": True, "variables": {"HF_HOME": str(tmp_path / "hf")}}})

    refused = run_sweep(path, "--no-preflight", env={"HF_ENDPOINT": hub.url})
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 3, refused.stderr
    for named in ("model.name_or_path: model tiny-org/tiny-bert", "model.name_or_path: tokenizer tiny-org/tiny-bert",
                  "data.dataset: dataset tiny-org/tiny-text (splits train, validation)"):
        (line,) = [line for line in lines if named in line]
        assert line.endswith(f"python -m qarac_dist.prefetch {path}"), line
    assert "Traceback" not in refused.stderr and not (tmp_path / "runs").exists() and hub.requests == []

    fetched = _prefetch(path, hub.url)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "3 loaded by name, 0 cached already, 3 to fetch" in fetched.stdout
    assert "100%" in fetched.stderr  # huggingface_hub's and datasets' progress bars
    asked = len(hub.requests)
    assert any("/resolve/" in r and r.endswith("model.safetensors") for r in hub.requests), hub.requests

    again = _prefetch(path, hub.url)
    assert again.returncode == 0 and "3 loaded by name, 3 cached already, 0 to fetch" in again.stdout, again.stdout
    assert len(hub.requests) == asked, hub.requests[asked:]
    # A test split the data set lacks: one line before anything runs, not when the sweep has chosen.
    tested = run_sweep(path, "final.split=exam", "--no-preflight", env={"HF_ENDPOINT": hub.url})
    assert tested.returncode == 2 and len(tested.stderr.strip().splitlines()) == 1, tested.stderr
    assert "data.dataset: dataset tiny-org/tiny-text (splits train, validation, exam) has no split 'exam'" in \
        tested.stderr and "final.split choose" in tested.stderr and not (tmp_path / "runs").exists()

    # With preflight, which loads the model here: from the trials' cache, offline, not the shell's.
    ran = run_sweep(path, "--wait", env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "empty")})
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    (record,) = Manifest.load(tmp_path / "runs" / "offline").trials.values()
    assert record.state == "COMPLETED"
    assert len(hub.requests) == asked, hub.requests[asked:]  # neither preflight nor the trial asked the hub


def test_prefetch_of_what_the_hub_does_not_have_is_one_line_each_and_fails(tmp_path, hub):
    """A training config (not a sweep): a model the hub lacks is one line naming its key; a
    tokenizer taken from a model's repository comes without the weights; a data set is fetched,
    and a split it lacks (a slice of one it has is fine) is named after fetching; exit 1, no
    traceback, and a password in HF_ENDPOINT is never printed."""
    config = tiny_config(tmp_path / "data", tmp_path / "out")
    config["model"] = {"name_or_path": "tiny-org/no-such-model"}
    config["tokenizer"] = {"name_or_path": "tiny-org/tiny-bert"}
    config["data"] = {"dataset": "tiny-org/tiny-text", "train_split": "train[:50%]", "validation_split": "dev",
                      "max_length": 16, "cache_dir": str(tmp_path / "data")}
    path = write_config(tmp_path / "train.yaml", config)
    endpoint = hub.url.replace("http://", "http://alice:pa55w0rdXYZ@")
    proc = _prefetch(path, endpoint, HF_HOME=str(tmp_path / "hf"))  # a training config: the shell's cache
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 loaded by name, 0 cached already, 3 to fetch" in proc.stdout
    said = [line for line in proc.stderr.splitlines() if "no-such-model" in line]
    assert len(said) == 1 and said[0].startswith("model.name_or_path: cannot load 'tiny-org/no-such-model'"), said
    assert "data.dataset: dataset tiny-org/tiny-text (splits train[:50%], dev) has no split 'dev'" in proc.stderr
    assert "Traceback" not in proc.stderr and "pa55w0rdXYZ" not in proc.stdout + proc.stderr
    assert not any(r.endswith(".safetensors") for r in hub.requests), hub.requests  # the tokenizer alone
    again = _prefetch(path, endpoint, HF_HOME=str(tmp_path / "hf"))
    assert "3 loaded by name, 1 cached already, 2 to fetch" in again.stdout, again.stdout  # the tokenizer stays

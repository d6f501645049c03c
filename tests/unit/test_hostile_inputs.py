"""Hostile and careless input, through the commands as a user runs them: every case is one line
naming the file and the key, exit code 2, no traceback, nothing created or overwritten.

The table grows with every input the code touches; the cases an issue named are examples.
What trials write for the importer (their MLflow outboxes: lines cut short, refused names and
values, lone surrogates, lines past a read, runs and parents deleted) is in test_store_import.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from qarac_dist import status, sweep, ui
from support import tiny_config


def _sweep_text(tmp_path, **fields) -> str:
    spec = {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "local",
            "runs_dir": str(tmp_path / "runs"), **fields}
    return yaml.safe_dump(spec)


TEST_DOCS = {"data.synthetic.num_test": 10}


def _files(tmp_path, test=None, **fields) -> str:
    """A sweep of local csv files (train, validation; test.jsonl beside them), `test` as its
    data.test_files (relative to the sweep's folder, where it runs)."""
    for name in ("train.csv", "validation.csv"):
        (tmp_path / name).write_text("text,label\na b c,0\nd e f,1\n")
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": 0}\n')
    data = {"train_files": ["train.csv"], "validation_files": ["validation.csv"]}
    base = tiny_config(tmp_path / "cache", tmp_path / "out")
    base["data"] = {k: v for k, v in base["data"].items() if k != "synthetic"} | data | (
        {"test_files": test} if test is not None else {})
    return yaml.safe_dump({"name": "s", "base": base, "executor": "local", "runs_dir": str(tmp_path / "runs"),
                           **fields})


def _hub(tmp_path, **fields) -> str:
    base = tiny_config(tmp_path / "cache", tmp_path / "out")
    base["data"] = {k: v for k, v in base["data"].items() if k != "synthetic"} | {"dataset": "org/some-set"}
    return yaml.safe_dump({"name": "s", "base": base, "executor": "local", "runs_dir": str(tmp_path / "runs"),
                           **fields})


def _image(tmp_path, **fields) -> str:
    """A sweep file whose Charliecloud image is a directory with no mount points (a test's
    tmp_path is under /tmp, which the image lacks): its lines, then the image made."""
    text = _sweep_text(tmp_path, **fields)
    (tmp_path / "img").mkdir()
    return text


def _offline(tmp_path, snapshot: dict | None = None, ref: bytes = b"abc", offline: bool = True,
             tokenizer: str = "") -> str:
    """An offline sweep of one hub model, its tokenizer a local directory (or `tokenizer`), and
    the hub cache (in environment.variables) holding `snapshot` (file name -> text) for it, or nothing."""
    base = tiny_config(tmp_path / "cache", tmp_path / "out")
    base["model"], base["tokenizer"] = {"name_or_path": "org/absent"}, {"name_or_path": tokenizer or str(tmp_path)}
    hub = tmp_path / "hf" / "hub" / "models--org--absent"
    if snapshot is not None:
        (hub / "refs").mkdir(parents=True)
        (hub / "refs" / "main").write_bytes(ref)
        (hub / "snapshots" / "abc").mkdir(parents=True)
        for name, text in snapshot.items():
            (hub / "snapshots" / "abc" / name).write_text(text)
    return yaml.safe_dump({"name": "s", "base": base, "executor": "local", "runs_dir": str(tmp_path / "runs"),
                           "environment": {"hub_offline": offline, "variables": {"HF_HOME": str(tmp_path / "hf")}}})


def _base_with(tmp_path, section: str, values: dict) -> dict:
    base = tiny_config(tmp_path / "cache", tmp_path / "out")
    base[section] = {**base.get(section, {}), **values}
    return base


SEARCH = {"trials": 4, "params": {"optimizer.lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-2}}}

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))

# (id, how to write the sweep file: text, or bytes, or a function of tmp_path -> text, extra args, expected)
FILE_CASES = [
    ("billion-laughs", lambda t: LAUGHS + _sweep_text(t), (), "aliases expand to more than"),
    ("recursive-alias", lambda t: "x: &x [1, *x]\n" + _sweep_text(t), (), "an alias refers to a value that contains it"),
    ("duplicate-key", lambda t: _sweep_text(t) + "name: other\n", (), "the key 'name' is set twice"),
    ("nested-duplicate-key", lambda t: _sweep_text(t, resources={"nodes": 1}).replace(
        "resources:\n  nodes: 1\n", "resources:\n  nodes: 1\n  nodes: 2\n"), (), "the key 'nodes' is set twice"),
    ("not-utf8", lambda t: _sweep_text(t).encode() + b"# caf\xe9\n", (), "not UTF-8 text (byte 0xe9)"),
    ("utf16", lambda t: _sweep_text(t).encode("utf-16"), (), "UTF-16 text; save it as UTF-8"),
    ("top-level-list", lambda t: "- a\n- b\n", (), "expected a mapping at the top level, got list"),
    ("deeply-nested", lambda t: "x: " + "[" * 20000 + "]" * 20000 + "\n", (), "nested more than 64 levels deep"),
    ("python-tag", lambda t: "x: !!python/object/apply:os.system ['echo hi']\n" + _sweep_text(t), (), "invalid YAML"),
    ("name-too-long", lambda t: _sweep_text(t, name="n" * 101), (), "name: expected at most 100 bytes"),
    ("name-control-char", lambda t: _sweep_text(t, name="a\tb"), (), "name: expected a name without '/' or control"),
    ("name-dotdot", lambda t: _sweep_text(t, name=".."), (), "name: expected a plain directory name"),
    ("variant-control-char", lambda t: _sweep_text(t, variants=[{"name": "v\x07", "set": {}}]), (),
     "variants[0].name: expected a name without control characters"),
    ("runs-dir-is-a-file", lambda t: (t / "afile").write_text("") or _sweep_text(t) .replace(
        str(t / "runs"), str(t / "afile")), (), "runs_dir: "),
    ("huge-random-search", lambda t: _sweep_text(t, random={"num_samples": 10**9, "params": {
        "optimizer.lr": {"distribution": "uniform", "low": 1e-4, "high": 1e-3}}}), (),
     "max_trials: the plan has 1,000,000,000 trials"),
    ("huge-grid", lambda t: _sweep_text(t, grid={"training.seed": list(range(2000)), "optimizer.lr": [1e-3, 2e-3]}),
     (), "max_trials: the plan has 4,000 trials"),
    ("max-trials-zero", lambda t: _sweep_text(t), ("max_trials=0",), "max_trials: expected at least 1, got 0"),
    ("nodes-zero", lambda t: _sweep_text(t), ("resources.nodes=0",), "resources.nodes: expected at least 1, got 0"),
    ("time-zero", lambda t: _sweep_text(t), ("resources.time_min=0",), "resources.time_min: expected at least 1"),
    ("pack-zero", lambda t: _sweep_text(t), ("resources.pack=0",), "resources.pack: expected at least 1, got 0"),
    ("pack-past-bound", lambda t: _sweep_text(t), ("resources.pack=1025",), "resources.pack: expected at most 1024"),
    ("pack-fraction", lambda t: _sweep_text(t), ("resources.pack=2.5",), "resources.pack: expected an integer"),
    ("pack-text", lambda t: _sweep_text(t), ("resources.pack=two",), "resources.pack: expected an integer"),
    ("pack-bool", lambda t: _sweep_text(t), ("resources.pack=true",), "resources.pack: expected an integer"),
    ("negative-requeues", lambda t: _sweep_text(t), ("max_requeues=-1",), "max_requeues: expected at least 0"),
    ("lr-negative", lambda t: _sweep_text(t), ("set.optimizer.lr=-0.001",), "optimizer.lr: expected more than 0, got -0.001"),
    ("lr-nan", lambda t: _sweep_text(t), ("set.optimizer.lr=.nan",), "optimizer.lr: expected a finite number, got nan"),
    ("lr-inf", lambda t: _sweep_text(t), ("set.optimizer.lr=.inf",), "optimizer.lr: expected a finite number, got inf"),
    ("betas-out-of-range", lambda t: _sweep_text(t), ("set.optimizer.betas=[1.0,0.999]",),
     "optimizer.betas: expected two numbers in [0, 1)"),
    ("betas-negative", lambda t: _sweep_text(t), ("set.optimizer.betas=[-0.1,0.9]",), "optimizer.betas: expected two"),
    ("eps-negative", lambda t: _sweep_text(t), ("set.optimizer.eps=-1e-8",), "optimizer.eps: expected more than 0"),
    ("warmup-negative", lambda t: _sweep_text(t), ("set.scheduler.warmup_steps=-5",), "scheduler.warmup_steps: expected at least 0"),
    ("patience-zero", lambda t: _sweep_text(t), ("set.early_stopping.patience=0",), "early_stopping.patience: expected at least 1"),
    ("min-delta-nan", lambda t: _sweep_text(t), ("set.early_stopping.min_delta=.nan",), "early_stopping.min_delta: expected a finite"),
    ("eval-batch-zero", lambda t: _sweep_text(t), ("set.evaluation.batch_size=0",), "evaluation.batch_size: expected at least 1"),
    ("vocab-zero", lambda t: _sweep_text(t), ("set.tokenizer.vocab_size=0",), "tokenizer.vocab_size: expected at least 16"),
    ("max-length-zero", lambda t: _sweep_text(t), ("set.data.max_length=0",), "data.max_length: expected at least 8"),
    ("seed-negative", lambda t: _sweep_text(t), ("set.training.seed=-1",), "training.seed: expected at least 0"),
    ("steps-absurd", lambda t: _sweep_text(t), ("set.training.max_steps=10000000000000",), "training.max_steps: expected at most"),
    ("clipping-negative", lambda t: _sweep_text(t), ("set.deepspeed.gradient_clipping=-1",),
     "deepspeed.gradient_clipping: expected at least 0"),
    ("fraction-one", lambda t: _sweep_text(t), ("set.data.validation_fraction=1.0",), "data.validation_fraction: expected less than 1"),
    ("num-classes-one", lambda t: _sweep_text(t), ("set.data.synthetic.num_classes=1",), "data.synthetic.num_classes: expected at least 2"),
    ("keep-last-zero", lambda t: _sweep_text(t), ("set.checkpointing.keep_last=0",), "checkpointing.keep_last: expected at least 1"),
    ("bad-override", lambda t: _sweep_text(t), ("=3",), "expected dotted.key=value"),
    ("override-not-utf8", lambda t: _sweep_text(t), ("name=caf\udce9",), "not UTF-8 text"),
    ("base-missing", lambda t: yaml.safe_dump({"name": "s", "base": "nothere.yaml"}), (),
     "base: "),
    ("grid-value-type", lambda t: _sweep_text(t, grid={"training.max_steps": [10, "ten"]}), (),
     "trial [training.max_steps=ten]: training.max_steps: expected an integer"),
    ("nested-one-past-the-limit", lambda t: "x: " + "[" * 64 + "]" * 64 + "\n" + _sweep_text(t), (),
     "line 1: nested more than 64 levels deep"),
    ("grid-bool-for-an-integer", lambda t: _sweep_text(t, grid={"training.seed": [1, True]}), (),
     "trial [training.seed=True]: training.seed: expected an integer, got True"),
    ("grid-text-for-a-number", lambda t: _sweep_text(t, grid={"optimizer.lr": [1e-3, "fast"]}), (),
     "trial [optimizer.lr=fast]: optimizer.lr: expected a number, got 'fast'"),
    ("grid-nan", lambda t: _sweep_text(t, grid={"optimizer.weight_decay": [0.0, float("nan")]}), (),
     "optimizer.weight_decay: expected a finite number, got nan"),
    ("grid-one-value-twice", lambda t: _sweep_text(t, grid={"optimizer.lr": [0.001, "1e-3"]}), (),
     "trials [optimizer.lr=0.001] and [optimizer.lr=1e-3] resolve to the same config"),
    ("grid-of-a-key-outside-the-id", lambda t: _sweep_text(t, grid={"output.dir": ["a", "b"]}), (),
     "trials [output.dir=a] and [output.dir=b] resolve to the same config"),
    ("unknown-key", lambda t: _sweep_text(t, bogus=1), (), "bogus: unknown key"),
    # A metric selected against its direction exports (and picks) the worst checkpoint.
    ("loss-maximised", lambda t: _sweep_text(t), ("set.evaluation.metric=loss", "set.evaluation.mode=max"),
     "evaluation.mode: max selects the worst loss (loss is better smaller); set it to min"),
    ("accuracy-minimised", lambda t: _sweep_text(t), ("set.evaluation.mode=min",),
     "evaluation.mode: min selects the worst accuracy (accuracy is better larger); set it to max"),
    ("select-loss-max", lambda t: _sweep_text(t, select={"metric": "loss", "mode": "max"}), (),
     "select.mode: max selects the worst loss"),
    ("select-mode-against-the-trials-metric", lambda t: _sweep_text(t, select={"mode": "min"}), (),
     "select.mode: min selects the worst accuracy"),
    ("split-seed-negative", lambda t: _sweep_text(t), ("set.data.split_seed=-1",),
     "data.split_seed: expected at least 0"),
    ("empty-grid", lambda t: _sweep_text(t, grid={"optimizer.lr": []}), (), "grid.optimizer.lr: empty list"),
    ("grid-not-a-key", lambda t: _sweep_text(t, grid={"optimizer.lrr": [1]}), (),
     "grid.optimizer.lrr: not a key of the training config"),
    ("random-bad-bounds", lambda t: _sweep_text(t, random={"params": {"optimizer.lr": {
        "distribution": "uniform", "low": 1, "high": 0}}}), (),
     "random.params.optimizer.lr: low (1.0) must be below high (0.0)"),
    ("search-with-grid", lambda t: _sweep_text(t, grid={"training.seed": [0, 1]}, search=SEARCH), (),
     "search: cannot be combined with grid"),
    ("search-with-random", lambda t: _sweep_text(t, random={"params": SEARCH["params"]}, search=SEARCH), (),
     "search: cannot be combined with random"),
    ("search-no-params", lambda t: _sweep_text(t, search={**SEARCH, "params": {}}), (),
     "search.params: give at least one key to search over"),
    ("search-zero-trials", lambda t: _sweep_text(t, search={**SEARCH, "trials": 0}), (),
     "search.trials: expected at least 1, got 0"),
    ("search-no-trials", lambda t: _sweep_text(t, search={"params": SEARCH["params"]}), (), "search.trials: "),
    ("search-unknown-sampler", lambda t: _sweep_text(t, search={**SEARCH, "sampler": "bohb"}), (),
     "search.sampler: "),
    ("search-cmaes", lambda t: _sweep_text(t, search={**SEARCH, "sampler": "cmaes"}), (),
     "search.sampler: cmaes is not offered: CMA-ES keeps its state in a pickled optimizer"),
    ("search-gp-past-its-bound", lambda t: _sweep_text(t, search={**SEARCH, "sampler": "gp", "trials": 101}), (),
     "search.trials: gp takes at most 100 (got 101)"),
    ("search-gp-at-its-bound-overridden", lambda t: _sweep_text(t, search={**SEARCH, "sampler": "gp"}),
     ("search.trials=100000",), "search.trials: gp takes at most 100 (got 100,000)"),
    ("search-not-a-key", lambda t: _sweep_text(t, search={**SEARCH, "params": {"optimizer.lrr": {
        "distribution": "uniform", "low": 0.1, "high": 0.2}}}), (), "search.params.optimizer.lrr: not a key"),
    ("search-bad-bounds", lambda t: _sweep_text(t, search={**SEARCH, "params": {"optimizer.lr": {
        "distribution": "loguniform", "low": 0, "high": 1}}}), (), "search.params.optimizer.lr.low: loguniform needs"),
    ("search-value-the-config-refuses", lambda t: _sweep_text(t, search={**SEARCH, "params": {"optimizer.lr": {
        "distribution": "uniform", "low": -1, "high": 1}}}), (),
     "search.params.optimizer.lr: at -1.0: optimizer.lr: expected more than 0"),
    ("search-warm-start-nowhere", lambda t: _sweep_text(t, search={**SEARCH, "warm_start": str(t / "nowhere")}), (),
     "search.warm_start: "),
    ("search-over-the-cap", lambda t: _sweep_text(t, search={**SEARCH, "trials": 50}), ("max_trials=20",),
     "max_trials: the plan has 50 trials"),
    ("over-the-cap", lambda t: _sweep_text(t, grid={"training.seed": list(range(5))}), ("max_trials=4",),
     "max_trials: the plan has 5 trials"),
    # Past libyaml's own nesting limit (1000), as flow and as block nesting: our message still.
    ("block-nested-past-libyaml", lambda t: "".join(f"{' ' * i}k:\n" for i in range(1100)) + " " * 1100 + "v\n",
     (), "nested more than 64 levels deep"),
    ("extra-sbatch-not-an-option", lambda t: _sweep_text(t, resources={"extra_sbatch": {"exclusiv": True}}), (),
     "resources.extra_sbatch.exclusiv: not an sbatch option"),
    ("extra-sbatch-set-by-the-sweep", lambda t: _sweep_text(t, resources={"extra_sbatch": {"time": 5}}), (),
     "resources.extra_sbatch.time: --time is set from resources.time_min"),
    ("select-metric-typo", lambda t: _sweep_text(t, select={"metric": "acuracy"}), (),
     "select.metric: 'acuracy' is not logged by a classification trial; it logs loss, accuracy, macro_f1"),
    ("select-metric-of-another-task", lambda t: _sweep_text(t, select={"metric": "spearman"}), (),
     "select.metric: 'spearman' is not logged by a classification trial"),
    # Numbers written as text get the checks numbers get.
    ("set-nan-as-text", lambda t: _sweep_text(t, set={"optimizer.lr": "nan"}), (),
     "optimizer.lr: expected a finite number, got nan"),
    ("grid-inf-as-text", lambda t: _sweep_text(t, grid={"optimizer.lr": ["1e-3", "inf"]}), (),
     "optimizer.lr: expected a finite number, got inf"),
    ("override-nan", lambda t: _sweep_text(t), ("set.optimizer.lr=nan",), "optimizer.lr: expected a finite number"),
    ("override-negative-as-text", lambda t: _sweep_text(t), ("set.optimizer.lr=-1e-3",),
     "optimizer.lr: expected more than 0, got -0.001"),
    # Names with a control character of any kind: they print as something else.
    ("name-newline-override", lambda t: _sweep_text(t), ("name=a\nb",), "name: expected a name without '/' or control"),
    ("name-line-separator", lambda t: _sweep_text(t, name="a\u2028b"), (), "name: expected a name without"),
    ("name-c1-control", lambda t: _sweep_text(t, name="a\x85b"), (), "name: expected a name without"),
    ("name-bidi-override", lambda t: _sweep_text(t, name="a\u202eb"), (), "name: expected a name without"),
    ("name-zero-width", lambda t: _sweep_text(t, name="a\u200bb"), (), "name: expected a name without"),
    ("variant-newline", lambda t: _sweep_text(t, variants=[{"name": "v\nw", "set": {}}]), (),
     "variants[0].name: expected a name without control characters"),
    ("asha-rung-off-validation", lambda t: _sweep_text(t, asha={"grace_steps": 3}, set={"training.max_steps": 20}), (),
     "asha.grace_steps: a rung falls at step 3, but the trials validate every 5 steps"),
    # A champion's registry name (track/champion.py): refused before anything runs, not at the sweep's end.
    ("register-model-slash", lambda t: _sweep_text(t, set={"tracking.register_model": "lab/lm",
                                                          "tracking.log_model": True}), (),
     "tracking.register_model: 'lab/lm' is not a name MLflow's registry takes (not empty, no / or :, not . or ..)"),
    ("register-model-colon-override", lambda t: _sweep_text(t, set={"tracking.log_model": True}),
     ("set.tracking.register_model=models:lm",), "tracking.register_model: 'models:lm' is not a name"),
    ("register-model-dots", lambda t: _sweep_text(t, set={"tracking.register_model": "..x", "tracking.log_model": True}),
     (), "tracking.register_model: '..x' is not a name"),
    ("register-model-dot", lambda t: _sweep_text(t, set={"tracking.register_model": ".", "tracking.log_model": True}),
     (), "tracking.register_model: '.' is not a name"),
    ("register-model-blank", lambda t: _sweep_text(t, set={"tracking.register_model": " ", "tracking.log_model": True}),
     (), "tracking.register_model: ' ' is not a name"),
    ("register-model-not-logged", lambda t: _sweep_text(t, set={"tracking.register_model": "lm",
                                                               "tracking.log_model": False}), (),
     "tracking.register_model: registers the logged model; it needs tracking.log_model: true"),
    ("spikes-without-checkpoints", lambda t: _sweep_text(t, set={"training.spikes": {}}), (),
     "training.spikes: a rollback goes back to a checkpoint; set checkpointing.every_steps"),
    ("spikes-z-zero", lambda t: _sweep_text(t, set={"training.spikes": {"z": 0}}), (),
     "training.spikes.z: expected more than 0, got 0"),
    ("spikes-z-nan", lambda t: _sweep_text(t, set={"training.spikes.z": float("nan")}), (),
     "training.spikes.z: expected a finite number, got nan"),
    ("spikes-window-tiny", lambda t: _sweep_text(t, set={"training.spikes": {"window": 3}}), (),
     "training.spikes.window: expected at least 4, got 3"),
    ("spikes-ratio-below-one", lambda t: _sweep_text(t, set={"training.spikes": {"min_ratio": 0.5}}), (),
     "training.spikes.min_ratio: expected at least 1"),
    ("spikes-lr-factor-zero", lambda t: _sweep_text(t, set={"training.spikes": {"lr_factor": 0}}), (),
     "training.spikes.lr_factor: expected more than 0"),
    ("spikes-lr-factor-raise", lambda t: _sweep_text(t, set={"training.spikes": {"lr_factor": 2}}), (),
     "training.spikes.lr_factor: expected at most 1"),
    ("spikes-no-rollbacks", lambda t: _sweep_text(t, set={"training.spikes": {"max_rollbacks": 0}}), (),
     "training.spikes.max_rollbacks: expected at least 1, got 0"),
    ("spikes-margin-negative", lambda t: _sweep_text(t, set={"training.spikes": {"margin": -1}}), (),
     "training.spikes.margin: expected at least 0, got -1"),
    ("environment-setup-two-lines", lambda t: _sweep_text(t, environment={"setup": ["module load a\nmodule load b"]}),
     (), "environment.setup[0]: expected one line (give more lines as more items)"),
    ("environment-setup-a-string", lambda t: _sweep_text(t, environment={"setup": "module load a"}), (),
     "environment.setup: expected a list"),
    ("environment-setup-a-number", lambda t: _sweep_text(t, environment={"setup": [5]}), (),
     "environment.setup[0]: expected a string"),
    ("environment-setup-empty-line", lambda t: _sweep_text(t, environment={"setup": ["  "]}), (),
     "environment.setup[0]: an empty line"),
    ("environment-setup-continued", lambda t: _sweep_text(t, environment={"setup": ["module load a \\"]}), (),
     "environment.setup[0]: ends in a backslash"),
    ("environment-setup-on-the-command-line", lambda t: _sweep_text(t), ("environment.setup=[[2]]",),
     "environment.setup[0]: expected a string"),
    ("environment-variable-name", lambda t: _sweep_text(t, environment={"variables": {"1X": "a"}}), (),
     "environment.variables.1X: expected a variable name"),
    ("environment-variable-with-a-dash", lambda t: _sweep_text(t, environment={"variables": {"MY-VAR": "a"}}), (),
     "environment.variables.MY-VAR: expected a variable name"),
    ("environment-variable-slurms-own", lambda t: _sweep_text(t, environment={"variables": {"SLURM_MEM": "1"}}), (),
     "environment.variables.SLURM_MEM: SLURM_* variables are set by the scheduler"),
    ("environment-variable-a-list", lambda t: _sweep_text(t, environment={"variables": {"X": [1]}}), (),
     "environment.variables.X: expected a string or a number, got [1]"),
    ("environment-variable-a-bool", lambda t: _sweep_text(t, environment={"variables": {"X": True}}), (),
     "environment.variables.X: expected a string or a number, got True"),
    ("environment-variables-a-list", lambda t: _sweep_text(t, environment={"variables": ["X=1"]}), (),
     "environment.variables: expected a mapping"),
    ("environment-setup-exit", lambda t: _sweep_text(t, environment={"setup": ["module load x; exit 0"]}), (),
     "environment.setup[0]: `exit` would end the job before its trials start"),
    ("environment-setup-here-document", lambda t: _sweep_text(t, environment={"setup": ["cat <<EOF"]}), (),
     "environment.setup[0]: not a whole shell line (a here-document)"),
    ("environment-setup-open-quote", lambda t: _sweep_text(t, environment={"setup": ["echo 'open"]}), (),
     "environment.setup[0]: not a whole shell line (bash: "),
    ("environment-setup-open-brace", lambda t: _sweep_text(t, environment={"setup": ["{ echo x"]}), (),
     "environment.setup[0]: not a whole shell line"),
    ("environment-pyxis-relative-image", lambda t: _sweep_text(t, environment={"container": {
        "runtime": "pyxis", "image": "img.sqsh"}}), (), "environment.container.image: img.sqsh: give an image file by"),
    ("environment-pyxis-locally", lambda t: _sweep_text(t, environment={"container": {
        "runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:24.05-py3"}}), (),
     "environment.container.runtime: pyxis runs containers through SLURM's srun"),
    ("environment-charliecloud-no-image", lambda t: _sweep_text(t, environment={"container": {
        "runtime": "charliecloud", "image": str(t / "nowhere")}}), (), "is not a directory (charliecloud runs"),
    ("environment-charliecloud-image-lacks-a-mount-point", lambda t: _image(t, environment={"container": {
        "runtime": "charliecloud", "image": str(t / "img")}}), (), "has no /tmp to mount the trials' files onto"),
    ("environment-mount-hides-the-sweep", lambda t: _image(t, environment={"container": {
        "runtime": "charliecloud", "image": str(t / "img"), "mounts": ["/root:/tmp"]}}), (),
     "environment.container.mounts: /root:/tmp would hide /tmp/"),
    ("environment-mount-relative", lambda t: _sweep_text(t, environment={"container": {
        "runtime": "apptainer", "image": "docker://x", "mounts": ["data:/data"]}}), (),
     "environment.container.mounts[0]: expected host:container with absolute paths"),
    ("environment-unknown-key", lambda t: _sweep_text(t, environment={"modules": ["cuda"]}), (),
     "environment.modules: "),
    ("environment-hub-offline-a-string", lambda t: _sweep_text(t, environment={"hub_offline": "yes"}), (),
     "environment.hub_offline: expected"),
    ("environment-hub-offline-contradicted", lambda t: _sweep_text(t, environment={
        "hub_offline": True, "variables": {"HF_HUB_OFFLINE": "0"}}), (),
     "environment.variables.HF_HUB_OFFLINE: '0' contradicts environment.hub_offline: true"),
    ("environment-hub-offline-model-not-cached", lambda t: _offline(t), (),
     "environment.hub_offline: model.name_or_path: model org/absent is not in the trials' cache"),
    ("environment-hub-offline-cache-without-weights", lambda t: _offline(t, {"config.json": "{}"}), (),
     "environment.hub_offline: model.name_or_path: model org/absent is in the trials' cache without config.json"),
    ("environment-hub-offline-shard-missing", lambda t: _offline(t, {
        "config.json": "{}", "model.safetensors.index.json": '{"weight_map": {"a": "model-1.safetensors"}}'}), (),
     "environment.hub_offline: model.name_or_path: model org/absent is in the trials' cache without config.json"),
    ("environment-hub-offline-index-truncated", lambda t: _offline(t, {
        "config.json": "{}", "model.safetensors.index.json": '{"weight_map": '}), (),
     "environment.hub_offline: model.name_or_path: model org/absent is in the trials' cache without config.json"),
    ("environment-hub-offline-ref-is-binary", lambda t: _offline(t, {"config.json": "{}", "model.safetensors": ""},
                                                                 ref=b"\xff\xfe"), (),
     "environment.hub_offline: model.name_or_path: model org/absent is not in the trials' cache"),
    ("environment-hub-offline-tokenizer-config-alone", lambda t: _offline(t, {
        "config.json": "{}", "model.safetensors": "", "tokenizer_config.json": "{}"}, tokenizer="org/absent"), (),
     "tokenizer org/absent is in the trials' cache without tokenizer.json or a vocabulary"),
    ("environment-hub-offline-bpe-vocabulary-without-merges", lambda t: _offline(t, {
        "config.json": "{}", "model.safetensors": "", "vocab.json": "{}"}, tokenizer="org/absent"), (),
     "tokenizer org/absent is in the trials' cache without tokenizer.json or a vocabulary"),
    ("environment-hub-offline-on-the-command-line", lambda t: _offline(t, offline=False),
     ("environment.hub_offline=true",),
     "environment.hub_offline: model.name_or_path: model org/absent is not in the trials' cache"),
    ("spikes-unknown-key", lambda t: _sweep_text(t, set={"training.spikes": {"sigma": 6}}), (),
     "set.training.spikes.sigma: not a key of the training config (training.spikes.sigma: valid keys of training.spikes: grad_norm, lr_factor"),
    ("spikes-a-list", lambda t: _sweep_text(t, set={"training.spikes": [6]}), (), "training.spikes: expected a mapping"),
    # final: (issue 36): a test split no trial reads, and what is not built said in one line
    ("final-generated-set-without-a-test-split", lambda t: _sweep_text(t, final={"split": "test"}), (),
     "final.split: the generated set has no test split; set data.synthetic.num_test"),
    ("final-generated-set-another-split", lambda t: _sweep_text(t, final={"split": "dev"}, set=TEST_DOCS), (),
     "final.split: the generated set's test split is 'test', not 'dev'"),
    ("final-retrain-not-a-boolean", lambda t: _sweep_text(t, final={"retrain": "always"}, set=TEST_DOCS), (),
     "final.retrain: expected"),
    ("final-alias-latest", lambda t: _sweep_text(t, final={"alias": "latest"}, set=TEST_DOCS), (),
     "final.alias: 'latest' is not an alias MLflow's registry takes"),
    ("final-alias-latest-in-capitals", lambda t: _sweep_text(t, final={"alias": "LATEST"}, set=TEST_DOCS), (),
     "final.alias: 'LATEST' is not an alias MLflow's registry takes"),
    ("final-hub-split-a-slice-of-train", lambda t: _hub(t, final={"split": "train[:50%]"}), (),
     "final.split: 'train[:50%]' reads a split the trials train or validate on"),
    ("test-files-a-directory", lambda t: _files(t, test=["."]), (), "data.test_files[0]: file not found: ."),
    ("final-alias-a-version", lambda t: _sweep_text(t, final={"alias": "v3"}, set=TEST_DOCS), (),
     "final.alias: 'v3' is not an alias"),
    ("final-alias-with-a-space", lambda t: _sweep_text(t, final={"alias": "my champion"}, set=TEST_DOCS), (),
     "final.alias: 'my champion' is not an alias"),
    ("final-split-blank-around", lambda t: _sweep_text(t, final={"split": " test"}, set=TEST_DOCS), (),
     "final.split: expected a split's name, got ' test'"),
    ("final-a-string", lambda t: _sweep_text(t, final="test"), (), "final: expected a mapping"),
    ("final-unknown-key", lambda t: _sweep_text(t, final={"splt": "test"}), (), "final.splt: unknown key"),
    ("final-on-the-command-line", lambda t: _sweep_text(t), ("final.retrain=maybe",), "final.retrain: expected"),
    ("final-without-best-models", lambda t: _sweep_text(t, final={}, set={**TEST_DOCS, "output.export_best": False}),
     (), "final: evaluates each seed's best model; it needs output.export_best: true"),
    ("num-test-varied", lambda t: _sweep_text(t, grid={"data.synthetic.num_test": [10, 20]}), (),
     "grid.data.synthetic.num_test: the test split is no part of a trial"),
    ("num-test-zero", lambda t: _sweep_text(t, set={"data.synthetic.num_test": 0}), (),
     "data.synthetic.num_test: expected at least 1, got 0"),
    ("test-files-without-train-files", lambda t: _sweep_text(t, set={"data.test_files": [str(t / "x.csv")]}), (),
     "data.test_files: a test split of local files goes with data.train_files"),
    ("test-files-empty", lambda t: _files(t, test=[]), (), "data.test_files: an empty list"),
    ("test-files-missing", lambda t: _files(t, test=["absent.csv"]), (), "data.test_files[0]: file not found"),
    ("test-files-another-kind", lambda t: _files(t, test=["test.jsonl"]), (),
     "data.validation_files: all data files must be of one kind"),
    ("test-files-a-training-file", lambda t: _files(t, test=["train.csv"], final={"split": "test"}), (),
     "data.test_files: train.csv is also a training or validation file"),
    ("final-files-without-test-files", lambda t: _files(t, final={"split": "test"}), (),
     "final.split: set data.test_files"),
    ("final-hub-split-trained-on", lambda t: _hub(t, final={"split": "train"}), (),
     "final.split: 'train' reads a split the trials train or validate on"),
    ("final-hub-split-validated-on", lambda t: _hub(t, final={"split": "validation"}), (),
     "final.split: 'validation' reads a split the trials train or validate on"),
]


@pytest.mark.parametrize("make, args, expected", [pytest.param(m, a, e, id=i) for i, m, a, e in FILE_CASES])
def test_bad_sweep_files_are_one_line_exit_2_and_nothing_created(tmp_path, monkeypatch, capsys, make, args, expected):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)  # an offline sweep that passes its check sets them here
    content = make(tmp_path)
    path = tmp_path / "sweep.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{path}: ") or lines[0].startswith("command line: "), lines[0]
    assert expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_a_file_too_large_is_refused_unread(tmp_path, monkeypatch, capsys):
    path = tmp_path / "sweep.yaml"
    with open(path, "w") as f:
        f.write(_sweep_text(tmp_path))
        f.write("# " + "x" * (17 * 2**20) + "\n")
    assert sweep.main([str(path)]) == 2
    assert "larger than 16 MiB" in capsys.readouterr().err


def test_a_directory_given_as_the_file(tmp_path, capsys):
    assert sweep.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path}: is a directory, not a YAML file"


# ------------------------------------------------------------------ the sweep directory

def _sweep_dir(tmp_path, manifest_bytes: bytes | None, sweep_json: bool = True):
    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    if manifest_bytes is not None:
        (directory / "manifest.json").write_bytes(manifest_bytes)
    if sweep_json:
        (directory / "sweep.json").write_text("{}")
    return directory


MANIFEST_CASES = [
    ("truncated", b'{"sweep": "s", "executor": "local", "trials": {"ab', "not valid JSON"),
    ("empty", b"", "empty; it was truncated"),
    ("a-list", b"[1, 2]", "expected a JSON object, got list"),
    ("trials-not-a-mapping", b'{"sweep": "s", "executor": "local", "select_metric": "accuracy", "select_mode": "max", '
                             b'"trials": []}', "trials: expected a mapping of trial records"),
    ("record-wrong-type", b'{"sweep": "s", "executor": "local", "select_metric": "accuracy", "select_mode": "max", '
                          b'"trials": {"t1": {"id": "t1", "label": "x", "overrides": {}, "config": {}, '
                          b'"output_dir": "o", "executor": "local", "state": 3}}}', "trials.t1.state: expected a string"),
    ("missing-field", b'{"executor": "local", "trials": {}}', "required"),
    ("final-job-not-a-mapping", b'{"sweep": "s", "executor": "slurm", "select_metric": "accuracy", "select_mode": '
                                b'"max", "trials": {}, "final_job": "812"}', "final_job: expected a mapping"),
]


@pytest.mark.parametrize("content, expected", [pytest.param(c, e, id=i) for i, c, e in MANIFEST_CASES])
def test_a_damaged_manifest_is_an_error_and_is_never_replaced(tmp_path, monkeypatch, capsys, content, expected):
    directory = _sweep_dir(tmp_path, content)
    path = tmp_path / "sweep.yaml"
    path.write_text(_sweep_text(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory / "manifest.json") in err and expected in err, err
    assert "--repair" in err
    assert status.main([str(directory)]) == 2
    assert expected in capsys.readouterr().err
    assert ui.main([str(directory)]) == 2  # the UI command starts nothing on it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert (directory / "manifest.json").read_bytes() == content  # kept as it was


def test_the_ui_command_on_what_is_no_sweep_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "s1.yaml").write_text("name: s1\n")
    for given in (tmp_path, tmp_path / "s1.yaml", tmp_path / "missing"):
        assert ui.main([str(given)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"{given}: no manifest.json here; expected a sweep directory such as runs/<sweep>"


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http", ""])
def test_the_ui_command_refuses_a_port_that_is_none(tmp_path, capsys, port):
    with pytest.raises(SystemExit) as exit_:
        ui.main([str(tmp_path), "--port", port])
    assert exit_.value.code == 2 and "expected a port number, 1 to 65535" in capsys.readouterr().err


def test_the_ui_command_on_a_port_in_use_is_one_line_exit_2_and_starts_nothing(tmp_path, capsys):
    import socket

    from qarac_dist.submit.sweep_dir import Manifest

    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    Manifest("s", "local", "accuracy", "max", {}, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}").save(directory)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ui.main([str(directory), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"--port {port}: ") and err.endswith("choose another with --port") and "\n" not in err
    assert not (tmp_path / "m.db").exists()


def test_a_missing_manifest_beside_a_sweep_file_is_not_a_fresh_start(tmp_path, monkeypatch, capsys):
    directory = _sweep_dir(tmp_path, None)
    path = tmp_path / "sweep.yaml"
    path.write_text(_sweep_text(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path)]) == 2
    assert "sweep.json is here but manifest.json is not; rebuild it with" in capsys.readouterr().err
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "sweep.json"]


def test_a_sweep_held_by_another_driver_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """A real second process holds the lock: the second driver names it; once that process is
    gone (killed, not cleaned up) the lock is free again."""
    import signal
    import subprocess
    import sys

    from qarac_dist.submit.sweep_dir import SweepLock

    directory = tmp_path / "runs" / "s"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from qarac_dist.submit.sweep_dir import SweepLock;"
        f"lock = SweepLock(Path({str(directory)!r})); lock.acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        path = tmp_path / "sweep.yaml"
        path.write_text(_sweep_text(tmp_path))
        monkeypatch.chdir(tmp_path)
        assert sweep.main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another driver is working on this sweep" in err
        assert f"pid {holder.pid}" in err and f"host {os.uname().nodename}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = SweepLock(directory)
    lock.acquire()  # the kernel released the dead holder's lock
    lock.release()


def _packed_sweep_dir(tmp_path, slot=None):
    """A sweep directory whose one trial waits in a packed job (pack > 1, or a search slot)."""
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    directory = _sweep_dir(tmp_path, None)
    record = TrialRecord("t1", "x", {}, {}, str(directory / "trials" / "t1"), "local", state="PENDING", attempt=1,
                         pack_jobs=["999999999"], slot=slot)
    Manifest("s", "local", "accuracy", "max", trials={"t1": record}).save(directory)
    return directory


RECORD_CASES = [
    ("claims-truncated", "claims", None, b'{"t1": {"attempt": 1, "jo', "not valid JSON"),
    ("claims-a-list", "claims", None, b"[1, 2]", "expected a JSON object, got list"),
    ("claims-wrong-shape", "claims", None, b'{"t1": {"attempt": 1, "worker": "x"}}', "not a claims file"),
    ("claims-record-not-a-mapping", "claims", None, b'{"t1": [1]}', "not a claims file"),
    ("cancels-truncated", "cancels", None, b'{"t1": 1, "final": ["4', "delete it, and cancel again"),
    ("cancels-a-list", "cancels", None, b"[1, 2]", "delete it, and cancel again"),
]
SEARCH_LINES = [
    ("not-json", b"not json\n"),
    ("ask-without-params", b'{"ask": 0, "trial": "t1"}\n'),
    ("tell-value-text", b'{"tell": 0, "state": "COMPLETE", "value": "high", "time": 1}\n'),
    ("a-list", b"[1, 2]\n"),
    ("binary", b"\x00\xff\xfe\n"),
    ("ask-state-not-a-mapping", b'{"ask": 0, "trial": "t", "params": {}, "state": "x", "told_before": 0, "time": 0}\n'),
    ("ask-state-null", b'{"ask": 0, "trial": "t", "params": {}, "state": null, "told_before": 0, "time": 0}\n'),
    ("ask-params-a-list-value", b'{"ask": 0, "trial": "t", "params": {"a": [1]}, "state": {}, "told_before": 0, '
                                b'"time": 0}\n'),
    ("tell-state-unknown", b'{"tell": 0, "state": "WHATEVER", "value": 1.0, "intermediate": {}, "time": 0}\n'),
    ("tell-intermediate-not-a-step", b'{"tell": 0, "state": "PRUNED", "value": null, "intermediate": {"abc": 0.5}, '
                                     b'"time": 0}\n'),
    ("number-past-float", b'{"tell": 1e999, "state": "COMPLETE", "value": 1, "time": 0}\n'),
    ("nested-past-the-parser", b"[" * 100000 + b"\n"),
]


@pytest.mark.parametrize("which, slot, content, expected", [pytest.param(w, s, c, e, id=i)
                                                            for i, w, s, c, e in RECORD_CASES])
def test_a_damaged_claims_file_or_search_record_is_one_line_and_kept(tmp_path, capsys, which, slot, content,
                                                                      expected):
    from qarac_dist.base.layout import SweepLayout

    directory = _packed_sweep_dir(tmp_path, slot)
    path = getattr(SweepLayout(directory), which)
    path.write_bytes(content)
    assert status.main([str(directory)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err
    assert path.read_bytes() == content


@pytest.mark.parametrize("line", [pytest.param(c, id=i) for i, c in SEARCH_LINES])
def test_a_damaged_whole_line_of_the_search_record_is_named_and_skipped(tmp_path, capsys, line):
    """One bad complete line crashed every ask, tell and runner: now it is named with its
    number, skipped, and the record kept as it is."""
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.track import search_record

    directory = _packed_sweep_dir(tmp_path, 0)
    path = SweepLayout(directory).search
    tell = b'{"tell": 3, "state": "COMPLETE", "value": 0.5, "intermediate": {}, "time": 1.0}\n'
    content = line + tell
    path.write_bytes(content)
    assert status.main([str(directory)]) in (0, 1)
    err = capsys.readouterr().err
    assert f"{path}: line 1 is not a search record, skipped: " in err and "Traceback" not in err, err
    record = search_record.read(SweepLayout(directory))
    assert [t.slot for t in record.tells] == [3] and len(record.damaged) == 1
    search_record.tell(SweepLayout(directory), 4, "FAIL", None, {})  # appends after it, losing nothing
    assert path.read_bytes().startswith(content)
    assert [t.slot for t in search_record.read(SweepLayout(directory)).tells] == [3, 4]


def test_a_job_that_left_no_verdict_shows_its_logs_last_error_line(tmp_path, capsys):
    """A runner that died importing (an upgrade that moved a class) showed LOST with an empty
    error column; the cause sat only in the job's log."""
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.submit.sweep_dir import Manifest

    directory = _packed_sweep_dir(tmp_path)
    log = SweepLayout(directory).submitit / "999999999_0_log.err"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ModuleNotFoundError: No module named 'optuna.samplers._tpe'\nsubmitit WARNING: exiting\n"
                   "Traceback (most recent call last):\n  File \"submission.py\", line 69, in process_job\n"
                   "    raise error\n    ^^^^^^^^^^^\n"  # the second traceback's code line is no message
                   "srun: error: node1: task 0: Exited with exit code 1\n"  # nor srun's echo of it
                   "srun: launch/slurm: _step_signal: Terminating StepId=5.0\n")
    assert status.main([str(directory)]) == 1
    out = capsys.readouterr().out
    assert "LOST" in out and "ModuleNotFoundError" in out, out
    from qarac_dist.submit import submission
    from qarac_dist.submit.states import refresh

    manifest = Manifest.load(directory)
    refresh(manifest, submission.attach("local", SweepLayout(directory)).states, SweepLayout(directory))
    assert manifest.trials["t1"].error == f"ModuleNotFoundError: No module named 'optuna.samplers._tpe' ({log})"


def test_a_ranks_traceback_shows_its_exception_not_its_source_line(tmp_path):
    """torch prefixes each line a rank writes with `[rank0]:`, so the traceback's source line (it
    held `strerror`) was taken for the error; a full disk showed as code."""
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.submit.sweep_dir import last_error

    layout = SweepLayout(tmp_path)
    log = layout.submitit / "7_0_log.err"
    log.parent.mkdir(parents=True)
    log.write_text("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"files.py\", line 75, in writing\n"
                   "[rank0]:     raise DiskFull(f\"{path}: {os.strerror(errno.ENOSPC)} (the part written is removed)\n"
                   "[rank0]: qarac_dist.base.files.DiskFull: /d/ckpt: No space left on device (the part written is "
                   "removed)\nINFO: the job ends\n")
    assert last_error(layout, "7") == (f"qarac_dist.base.files.DiskFull: /d/ckpt: No space left on device (the part "
                                         f"written is removed) ({log})")
    # A job killed outright (SIGKILL, the node lost): its last line is a note, never shown as the cause.
    log.write_text("qarac_dist: note: data: each epoch leaves out 3 of 240 training rows\n")
    assert last_error(layout, "7") == f"no error in its log, which ends: qarac_dist: note: data: each epoch leaves " \
                                      f"out 3 of 240 training rows ({log})"


def test_a_checkpoint_cut_short_is_named_when_it_is_passed_over(tmp_path):
    """A save killed mid-write (no COMPLETE marker) was skipped without a word."""
    import json

    from qarac_dist.train.checkpoint import MARKER, newest_intact

    for step, complete in ((10, True), (20, False), (30, True)):
        tag = tmp_path / f"step{step:08d}"
        (tag / "shard").mkdir(parents=True)
        if complete:
            (tag / MARKER).write_text(json.dumps({"step": step, "files": {}}))
    (tmp_path / "step00000030" / MARKER).write_text("{")  # and one damaged
    assert newest_intact(tmp_path) == ("step00000010", [
        f"step00000030 is damaged ({MARKER} unreadable)",
        f"step00000020 was never completed (no {MARKER} marker: its save was cut short)"])
    assert newest_intact(tmp_path, at_most=19) == ("step00000010", [])


@pytest.mark.parametrize("world, per_rank, refused", [(2, 4, False), (2, 2, True), (1, 8, False), (1, 4, True),
                                                      (4, 2, False)],
                         ids=["same", "smaller-micro-same-ranks", "fewer-ranks-same-step", "fewer-ranks-smaller-step",
                              "more-ranks-same-step"])
def test_a_resume_that_would_change_the_step_is_refused_before_loading(tmp_path, world, per_rank, refused):
    """Saved on 2 ranks at 8 examples a step: a resume goes on with the epoch's order only if a
    step still takes 8 (micro batch x accumulation x ranks), whatever the ranks."""
    import json

    from qarac_dist.base.errors import UserError
    from qarac_dist.config.sections import CheckpointingConfig, TrainingConfig
    from qarac_dist.track.trial_dir import TrialDir
    from qarac_dist.train.checkpoint import MARKER, Checkpointer

    trial = TrialDir(tmp_path)
    (trial.checkpoints / "step00000003").mkdir(parents=True)
    (trial.checkpoints / "step00000003" / MARKER).write_text(json.dumps(
        {"step": 3, "world_size": 2, "step_examples": 8, "files": {}}))
    checkpointer = Checkpointer(CheckpointingConfig(), 0, trial, 0, world, TrainingConfig(micro_batch_size=per_rank))
    if not refused:
        assert checkpointer._choose() == "step00000003"  # ZeRO-0: loads on any number of ranks
        return
    with pytest.raises(UserError, match=f"saved on 2 ranks taking 8 examples a step; this job has {world} ranks "
                                        f"taking {world * per_rank}"):
        checkpointer._choose()


RERUN_EDITS = [
    ("select-metric", {"select": {"metric": "loss"}}, "select: ",
     "was made with max accuracy, this file asks for min loss"),
    ("select-mode", {"select": {"mode": "min"}, "set": {"evaluation.metric": "loss", "evaluation.mode": "min"}},
     "select: ", "was made with max accuracy, this file asks for min loss"),
    ("tracking-uri", {"tracking": {"uri": "sqlite:////elsewhere/mlflow.db"}}, "tracking.uri: ",
     "this file asks for sqlite:////elsewhere/mlflow.db"),
    ("tracking-experiment", {"tracking": {"experiment": "other"}}, "tracking.experiment: ",
     "was made with s, this file asks for other"),
    ("asha-grace", {"asha": {"grace_steps": 10}}, "asha: ", "'grace_steps': 10"),
]


@pytest.mark.parametrize("edit, key, expected", [pytest.param(*c[1:], id=c[0]) for c in RERUN_EDITS])
def test_a_rerun_that_changes_what_the_record_was_made_with_is_refused(tmp_path, monkeypatch, capsys, edit, key,
                                                                        expected):
    """The saved manifest won without a word: a changed select picked the best by the old rule,
    changed rungs compared new arrivals with old ones recorded at other steps."""
    import json

    from qarac_dist.submit.sweep_dir import Manifest

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"name": "s", "base": tiny_config(tmp_path / "cache", tmp_path / "out"), "executor": "local",
            "runs_dir": str(tmp_path / "runs"), "tracking": {"uri": uri}, "asha": {"grace_steps": 5}}
    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    Manifest("s", "local", "accuracy", "max", tracking_uri=uri, experiment="s").save(directory)
    (directory / "sweep.json").write_text(json.dumps({"spec": {"asha": {"grace_steps": 5, "reduction_factor": 3,
                                                                        "start": "shuffled"}}}))
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**spec, **edit, "set": {**edit.get("set", {})}}))
    assert sweep.main([str(path), "--dry-run"]) == 2  # the plan says what the run would refuse
    dry = capsys.readouterr()
    assert not dry.out and f"{path}: {key}{directory} was made with " in dry.err
    assert sweep.main([str(path), "--no-preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{path}: {key}{directory} was made with ") and \
        expected in err and "Start a new sweep for it: another name= (or runs_dir=)" in err, err
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".lock"} == saved  # nothing written


def test_a_damaged_rung_record_is_named_and_rebuilt_from_the_trials_own_records(tmp_path):
    """A damaged line named no file, rung or line, --repair did not cover it, and every trial
    reaching that rung failed there on every re-run."""
    from qarac_dist.base.errors import UserError
    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.track import rungs
    from qarac_dist.track.trial_dir import TrialDir, TrialState

    sweep = SweepLayout(tmp_path / "runs" / "s")
    sweep.asha.mkdir(parents=True)
    first = rungs.Arrival("a", 0.9, 0.3, 4, True, 0, 1.0)
    odd_withdrawals = [b'{"withdrawn": null, "step": 3, "time": 0}\n', b'{"withdrawn": 5, "step": 3, "time": 0}\n',
                       b'{"withdrawn": ["a"], "step": 3, "time": 0}\n', b'{"withdrawn": "a", "time": 0}\n',
                       b'{"withdrawn": "a", "step": 3, "time": 0, "trial": "a", "value": 1}\n',
                       b'{"withdrawn": "a", "step": "3", "time": 0}\n']
    for damage in (b'{"trial":"a","value":1,"step":1e999,"continue":true,"seen":0,"time":0}\n', b"[" * 100000 + b"\n",
                   *odd_withdrawals):
        sweep.rung(0).write_bytes((first.to_json() + "\n").encode() + damage)
        with pytest.raises(UserError, match="rung 0, line 2 is not a rung record"):
            rungs.read(sweep, 0)
    sweep.rung(0).write_bytes((first.to_json() + "\n").encode() + b'{"trial": "b", "val\xff\n')
    with pytest.raises(UserError) as err:
        rungs.read(sweep, 0)
    assert str(err.value).startswith(f"{sweep.rung(0)}: rung 0, line 2 is not a rung record: ") and \
        str(err.value).endswith(f"rebuild the file from the trials' own records with python -m qarac_dist.status "
                                f"--repair {sweep.root}")
    trials = []
    for name, accuracy, state in (("a", 0.9, TrialState.COMPLETED), ("b", 0.5, TrialState.PRUNED),
                                  ("c", None, TrialState.RUNNING)):
        trial = TrialDir(tmp_path / name)
        trial.begin(1)
        trial.update(state=state, rung=0 if state == TrialState.PRUNED else None)
        rows = [{"step": 4, "val_accuracy": accuracy, "val_loss": 0.7}] if accuracy is not None else []
        trial.metrics_file.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
        trials.append((name, trial, 4))
    kept = rungs.rebuild(sweep, 0, "accuracy", trials)
    assert kept.read_bytes().endswith(b"\xff\n")  # the damaged file, kept as it was
    rebuilt = rungs.read(sweep, 0)
    assert rebuilt[0] == first
    assert [(a.trial, a.value, a.keeps_going, a.seen) for a in rebuilt[1:]] == [("b", 0.5, False, 1)]
    assert rungs.rebuild(sweep, 0, "accuracy", trials) is None  # whole now: left alone


class _Payload:
    """What a poisoned record would run if it were unpickled: it leaves a file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _state(**changes) -> dict:
    from qarac_dist.config.sweep import Distribution, Search
    from qarac_dist.plan.search import choose

    search = Search(trials=4, params={"optimizer.lr": Distribution("loguniform", 1.0e-4, 1.0e-2)})
    return {**choose(search, "max", [], None).state, **changes}


def _rng(**changes) -> dict:
    state = _state()
    state["rngs"]["_rng"] = {**state["rngs"]["_rng"], **changes}
    return state


POISONED_RECORDS = [
    ("pickled-sampler", lambda marker: {"sampler": __import__("base64").b64encode(
        __import__("pickle").dumps(_Payload(marker))).decode(), "study_attrs": {}},
     "written by an older qarac_dist that kept the sampler as a pickle, which is no longer read"),
    ("another-optuna", lambda marker: {"state": _state(optuna="4.0.0")},
     "the sampler's state was recorded by Optuna 4.0.0, this is Optuna "),
    ("state-words-damaged", lambda marker: {"state": _state(rngs={"_rng": {"words": "!!", "pos": 1, "gauss": None},
                                                                  "_random_sampler._rng": {}})},
     "the sampler's state of _random_sampler._rng is damaged"),
    ("state-of-another-sampler", lambda marker: {"state": _state(rngs={"_cma_rng": {}})},
     "the sampler's state holds generators ['_cma_rng'], search.sampler tpe has"),
    ("state-position-past-the-words", lambda marker: {"state": _rng(pos=1000000)}, "expected a position from 0 to 624"),
    ("state-position-huge", lambda marker: {"state": _rng(pos=2**70)}, "expected a position from 0 to 624"),
    ("state-position-negative", lambda marker: {"state": _rng(pos=-5)}, "expected a position from 0 to 624, got -5"),
    ("state-words-all-zero", lambda marker: {"state": _rng(words="A" * 3328)}, "not all zero"),
    ("state-gauss-text", lambda marker: {"state": _rng(gauss="nan")}, "expected a cached Gaussian"),
    ("state-generators-a-list", lambda marker: {"state": _state(rngs=[{"a": 1}])}, "the sampler's state holds generators"),
    ("state-study-attrs-a-list", lambda marker: {"state": _state(study_attrs=[1, 2])}, "study attributes are damaged"),
    ("values-outside-the-space", lambda marker: {"state": _state(), "params": {"optimizer.lr": 0.5}},
     "trial 1 in the order asked has values outside search.params"),
    ("values-of-another-key", lambda marker: {"state": _state(), "params": {"optimizer.lrr": 1e-3}},
     "has values outside search.params"),
    ("state-words-short", lambda marker: {"state": _state(rngs={
        "_rng": {"words": "AAAA", "pos": 1, "gauss": None}, "_random_sampler._rng": {"words": "AAAA", "pos": 1}})},
     "is damaged"),
]


@pytest.mark.parametrize("line, expected", [pytest.param(*c[1:], id=c[0]) for c in POISONED_RECORDS])
def test_a_poisoned_or_foreign_search_record_is_refused_in_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys,
                                                                                     line, expected):
    """Every ask unpickled a sampler stored in search.jsonl: whoever could write the sweep
    directory ran code in every job, and an Optuna that moved a class made every job die."""
    import json

    from qarac_dist.submit.sweep_dir import Manifest

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    Manifest("s", "local", "accuracy", "max", tracking_uri=uri, experiment="s").save(directory)
    (directory / "sweep.json").write_text(json.dumps({"spec": {}}))
    ask = {"ask": 0, "trial": "t0", "params": {"optimizer.lr": 1e-3}, "told_before": 0, "time": 0.0, **line(marker)}
    (directory / "search.jsonl").write_text(json.dumps(ask) + "\n")
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    path = tmp_path / "sweep.yaml"
    path.write_text(_sweep_text(tmp_path, tracking={"uri": uri}, search=SEARCH))
    for args in (["--dry-run"], ["--no-preflight"]):
        assert sweep.main([str(path), *args]) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{directory / 'search.jsonl'}: ") and expected in lines[0], \
            out.err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".lock"} == saved


@pytest.mark.parametrize("edit, refused", [
    pytest.param({"params": {"optimizer.lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-3}}}, True,
                 id="narrower-range"),
    pytest.param({"params": {"optimizer.lr": {"distribution": "uniform", "low": 1.0e-4, "high": 1.0e-2}}}, True,
                 id="another-distribution"),
    pytest.param({"sampler": "random"}, True, id="another-sampler"),
    pytest.param({"seed": 1}, True, id="another-seed"),
    pytest.param({"trials": 9}, False, id="more-trials"),
])
def test_a_rerun_that_changes_the_searched_space_is_refused(tmp_path, monkeypatch, capsys, edit, refused):
    """Editing search.params and re-running was accepted: the recorded values were trained again
    outside the new range, the next ask died on them, and the MLflow parent named a retired trial."""
    import json

    from qarac_dist.config.schema import to_dict
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.submit.sweep_dir import Manifest

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "sweep.yaml"
    path.write_text(_sweep_text(tmp_path, tracking={"uri": uri}, search=SEARCH))
    spec, _ = load_sweep(str(path), [])
    directory = tmp_path / "runs" / "s"
    directory.mkdir(parents=True)
    Manifest("s", "local", "accuracy", "max", tracking_uri=uri, experiment="s").save(directory)
    (directory / "sweep.json").write_text(json.dumps({"spec": to_dict(spec)}))
    path.write_text(_sweep_text(tmp_path, tracking={"uri": uri}, search={**SEARCH, **edit}))
    code = sweep.main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert (code, "search: " in err and "was made with" in err) == ((2, True) if refused else (0, False)), err


def test_status_sync_tells_the_search_what_a_killed_runner_never_did(tmp_path, capsys):
    """A runner SIGKILLed between a step's end and its bookkeeping: state.json says COMPLETED,
    the search record nothing. Whoever first looks with a writing command records it: a re-run,
    a runner, or `status --sync` (plain `status` writes nothing)."""
    import json

    from qarac_dist.base.layout import SweepLayout
    from qarac_dist.track import search_record
    from qarac_dist.track.trial_dir import TrialDir, TrialState

    directory = _packed_sweep_dir(tmp_path, slot=0)
    layout = SweepLayout(directory)
    layout.search.write_text(json.dumps({"ask": 0, "trial": "t1", "params": {"optimizer.lr": 1e-3}, "state": {},
                                         "told_before": 0, "time": 0.0}) + "\n")
    trial = TrialDir(directory / "trials" / "t1")
    trial.begin(1)
    trial.update(state=TrialState.COMPLETED)
    trial.metrics_file.write_text('{"step": 4, "val_accuracy": 0.75}\n')
    status.main([str(directory)])
    assert search_record.read(layout).tells == []  # plain status: read only
    assert status.main([str(directory), "--sync"]) in (0, 1)
    assert [(t.slot, t.state, t.value) for t in search_record.read(layout).tells] == [(0, "COMPLETE", 0.75)]


def test_a_cached_model_passes_the_offline_check_and_local_paths_are_not_asked(tmp_path, monkeypatch, capsys):
    """The other side of the hub_offline cases above: with config.json and the weights in the
    snapshot the sweep runs (its --dry-run, as far as it goes here)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(_offline(tmp_path, {"config.json": "{}", "model.safetensors": ""}))
    monkeypatch.chdir(tmp_path)
    from qarac_dist.config.environment import Environment
    from qarac_dist.preflight.hub_cache import needed, refuse_missing

    spec = yaml.safe_load(path.read_text())
    items = needed([{**spec["base"], "data": {}}, {**spec["base"], "data": {}}])
    assert [(n.kind, n.name) for n in items] == [("model", "org/absent")]  # once; the tokenizer is a directory
    refuse_missing(Environment(hub_offline=True, variables={"HF_HOME": str(tmp_path / "hf")}), [
        {**spec["base"], "data": {}}], str(path))


def test_an_offline_search_needs_every_model_it_may_ask_for(tmp_path, monkeypatch, capsys):
    """A model-based search picks its values when its jobs start: every choice of a searched
    model is checked before submission, not only the one its first slot was planned with."""
    spec = yaml.safe_load(_offline(tmp_path))
    spec["search"] = {"trials": 2, "params": {"model.name_or_path": {"distribution": "choice",
                                                                     "values": ["org/absent", "org/other"]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "model org/absent is not" in err and "model org/other is not" in err, err
    assert not (tmp_path / "runs").exists()


def test_the_offline_data_set_check_takes_only_the_hubs_variables(tmp_path, monkeypatch, capsys):
    """The data-set check runs this machine's Python: a PYTHONHOME meant for the jobs' image must
    not reach it (it died with a traceback), and a data set not prepared is one line."""
    spec = yaml.safe_load(_offline(tmp_path, {"config.json": "{}", "model.safetensors": ""}))
    spec["base"]["data"] = {"dataset": "org/set", "validation_fraction": 0.2, "cache_dir": str(tmp_path / "data")}
    spec["environment"]["variables"]["PYTHONHOME"] = "/opt/conda"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.dataset: dataset org/set (splits train) is not prepared in the trials' cache" in line, line


def test_a_tokenizer_needs_its_files_and_what_names_its_class(tmp_path):
    """tokenizers' own from_pretrained leaves tokenizer.json alone, which AutoTokenizer cannot
    load offline; tokenizer_config.json alone names files it does not hold."""
    from qarac_dist.preflight.hub_cache import _tokenizer

    for files, loads in [({"tokenizer.json"}, False), ({"tokenizer_config.json"}, False),
                         ({"tokenizer.json", "tokenizer_config.json"}, True), ({"vocab.txt", "config.json"}, True),
                         ({"vocab.json", "config.json"}, False), ({"vocab.json", "merges.txt", "config.json"}, True)]:
        snapshot = tmp_path / "-".join(sorted(files))
        snapshot.mkdir()
        for name in files:
            (snapshot / name).write_text("{}")
        assert _tokenizer(snapshot) == loads, files


def test_preflight_names_the_file_once_and_masks_a_token_in_the_command_it_prints(tmp_path, monkeypatch, capsys):
    from qarac_dist.preflight.__main__ import main

    path = tmp_path / "sweep.yaml"
    path.write_text(_offline(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main([str(path), "environment.variables.HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{path}: environment.hub_offline: ") and line.count(str(path)) == 2, line  # + the command
    assert "hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456" not in line, line


def test_a_searched_data_key_adds_what_each_choice_loads(tmp_path):
    """A search over data.cache_dir (or the splits) loads the data set into each choice's cache."""
    from qarac_dist.config.sweep import load_sweep
    from qarac_dist.plan import plan
    from qarac_dist.preflight.hub_cache import needed, sweep_configs

    spec = yaml.safe_load(_offline(tmp_path))
    spec["base"]["data"] = {"dataset": "org/set", "cache_dir": str(tmp_path / "a")}
    spec["search"] = {"trials": 2, "params": {"data.cache_dir": {"distribution": "choice",
                                                                 "values": [str(tmp_path / "a"), str(tmp_path / "b")]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep_spec, base = load_sweep(str(path), [])
    sets = [n for n in needed(sweep_configs(sweep_spec, plan(sweep_spec, base, str(path)))) if n.kind == "dataset"]
    assert sorted(n.cache for n in sets) == [str(tmp_path / "a" / "hf"), str(tmp_path / "b" / "hf")]


def test_a_sweep_planned_under_a_relative_runs_dir_is_read_from_any_folder(tmp_path, monkeypatch, capsys):
    """The default runs_dir, `runs`, is relative: its trials' directories were read from the
    folder `status` ran in, which showed every trial of a finished sweep LOST."""
    from qarac_dist.submit.sweep_dir import Manifest, TrialRecord

    directory = _sweep_dir(tmp_path, None)
    monkeypatch.chdir(tmp_path)
    relative = directory.relative_to(tmp_path) / "trials" / "t1"
    Manifest("s", "local", "accuracy", "max", trials={"t1": TrialRecord(
        "t1", "x", {}, {}, str(relative), "local", state="COMPLETED", attempt=1)}).save(directory)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (record,) = Manifest.load(directory).trials.values()
    assert record.output_dir == str(tmp_path / relative)
    assert Manifest.load(Path("..") / directory.relative_to(tmp_path)).trials["t1"].output_dir == str(
        elsewhere / ".." / relative)

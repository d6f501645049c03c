"""The user's code as a sweep records it (track/code_record.py), without a sweep: remotes,
modules found without importing them, files outside any repository, a factory changed since."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qarac_dist.track import code_record

REMOTES = [
    ("https-token-as-user", "https://ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8@github.com/lab/p.git",
     "https://github.com/lab/p.git"),
    ("https-user-and-password", "https://me:s3cret@gitlab.lab.org/p.git", "https://gitlab.lab.org/p.git"),
    ("http-user", "http://me@git.lab/p", "http://git.lab/p"),
    ("ssh-user-kept", "ssh://git@github.com/lab/p.git", "ssh://git@github.com/lab/p.git"),
    ("ssh-password-dropped", "ssh://me:pw@host/p.git", "ssh://host/p.git"),
    ("scp-like-kept", "git@github.com:lab/p.git", "git@github.com:lab/p.git"),
    ("a-path", "/shared/repos/p.git", "/shared/repos/p.git"),
    ("at-in-the-path", "https://host/p@v1.git", "https://host/p@v1.git"),
    ("git-plus-https", "git+https://tok@host/r", "git+https://host/r"),
    ("malformed", "https://tok@[host/r", "[host/r"),
]


@pytest.mark.parametrize("url, expected", [pytest.param(u, e, id=i) for i, u, e in REMOTES])
def test_a_remotes_credentials_never_reach_the_record(url, expected):
    assert code_record.without_credentials(url) == expected


def test_a_factory_module_is_found_where_a_job_imports_it_from_without_importing_it(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "pkg" / "sub" / "models.py").write_text("")
    (tmp_path / "flat.py").write_text("")
    assert code_record.module_file("pkg.sub.models", [tmp_path / "nowhere", tmp_path]) == \
        tmp_path / "pkg" / "sub" / "models.py"
    assert code_record.module_file("pkg", [tmp_path]) == tmp_path / "pkg" / "__init__.py"
    assert code_record.module_file("flat", [tmp_path]) == tmp_path / "flat.py"
    assert code_record.module_file("absent", [tmp_path]) is None
    assert "pkg" not in sys.modules


def test_files_outside_a_repository_are_recorded_by_content_and_an_edit_is_named(tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text("name: s\n")
    (tmp_path / "models.py").write_text("def build(): ...\n")
    record = code_record.read({"sweep_file": tmp_path / "sweep.yaml", "base_config": None}, ["models:build"],
                              [tmp_path])
    digest = code_record.sha256(tmp_path / "sweep.yaml")
    assert record.tags["code.sweep_file"] == f"{tmp_path / 'sweep.yaml'} sha256:{digest}"
    assert not any(k.startswith("mlflow.source.git.") for k in record.tags) and record.diffs == {}
    assert (record.tags["mlflow.source.name"], record.tags["mlflow.source.type"]) == (str(tmp_path / "sweep.yaml"),
                                                                                      "LOCAL")
    assert code_record.changed_since(record.tags) == {}
    (tmp_path / "models.py").write_text("def build(): return 1\n")
    assert code_record.changed_since(record.tags) == {"code.changed": str(tmp_path / "models.py")}
    (tmp_path / "models.py").unlink()
    assert code_record.changed_since(record.tags) == {"code.changed": str(tmp_path / "models.py")}
    assert capsys.readouterr().err.count("changed since the sweep was submitted") == 2


def test_a_repository_without_a_commit_or_on_a_detached_head(tmp_path):
    subprocess.run(["git", "-C", str(tmp_path), "init", "-q"], check=True)
    (tmp_path / "sweep.yaml").write_text("name: s\n")
    record = code_record.read({"sweep_file": tmp_path / "sweep.yaml"}, [], [tmp_path])
    digest = code_record.sha256(tmp_path / "sweep.yaml")
    assert record.tags["code.sweep_file"] == f"{tmp_path / 'sweep.yaml'} sha256:{digest}"  # in no commit
    assert record.tags["mlflow.source.git.dirty"] == "True" and "mlflow.source.git.commit" not in record.tags
    git = ["git", "-C", str(tmp_path), "-c", "user.name=r", "-c", "user.email=r@lab"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    subprocess.run([*git, "checkout", "-q", "--detach"], check=True)
    record = code_record.read({"sweep_file": tmp_path / "sweep.yaml"}, [], [tmp_path])
    assert "mlflow.source.git.branch" not in record.tags and record.tags["mlflow.source.git.dirty"] == "False"
    assert record.diffs == {}


def _repo(path, files: dict):
    path.mkdir(parents=True)
    git = ["git", "-C", str(path), "-c", "user.name=r", "-c", "user.email=r@lab"]
    subprocess.run([*git, "init", "-q"], check=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)


def test_a_second_reviews_repositories_are_recorded_and_never_stop_the_sweep(tmp_path, capsys):
    """Each used to crash the submission or to record what is not so (a review found them): a
    diff with bytes that are no UTF-8, a factory under a folder with a space (taken for changed),
    an untracked factory (recorded as in the commit), two dirty repositories of one folder name
    (one diff lost), untracked names quoted by git."""
    _repo(tmp_path / "a" / "proj", {"sweep.yaml": b"name: s\n", "notes.txt": b"caf\xe9\n"})
    _repo(tmp_path / "b b" / "proj", {"kept.py": b"x = 1\n"})
    (tmp_path / "a" / "proj" / "notes.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "b b" / "proj" / "kept.py").write_bytes(b"x = 2\n")
    (tmp_path / "b b" / "proj" / "models.py").write_text("def build(): ...\n")  # untracked
    (tmp_path / "b b" / "proj" / "\u00e9 file.txt").write_text("")
    record = code_record.read({"sweep_file": tmp_path / "a" / "proj" / "sweep.yaml"}, ["models:build"],
                              [tmp_path / "b b" / "proj"])
    factory = tmp_path / "b b" / "proj" / "models.py"
    assert record.tags["code.factory.models"] == f"{factory} sha256:{code_record.sha256(factory)}"
    assert code_record.changed_since(record.tags) == {} and capsys.readouterr().err == ""
    names, texts = list(record.diffs), list(record.diffs.values())
    assert len(names) == 2 and "code/proj.diff" in names and any(n.startswith("code/proj-") for n in names)
    assert any("caf\ufffd au lait" in t for t in texts) and any("+x = 2" in t for t in texts)
    assert any("untracked: \u00e9 file.txt" in t for t in texts)


def test_a_sweep_whose_code_cannot_be_read_is_submitted_without_the_record(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    monkeypatch.setattr(code_record, "read", lambda *a: 1 / 0)
    record = code_record.of_sweep(str(tmp_path / "sweep.yaml"), {}, [SimpleNamespace(config={})])
    assert record.tags == {} and "the sweep's code is not recorded on its runs (ZeroDivisionError" in \
        capsys.readouterr().err


def test_the_local_modules_a_factory_imports_are_recorded_and_an_edit_of_one_is_named(tmp_path, capsys):
    """Followed through each other, absolute and relative, never imported: the repository's own
    modules only, not the standard library, not an installed package, not what the repository
    ignores (a virtual environment inside it), and a syntax error or a cycle stops nothing."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "venv" / "site").mkdir(parents=True)
    (repo / ".gitignore").write_text("venv/\n")
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "factory.py").write_text("import os\nimport json as j\nfrom . import layers\nfrom .heads import *\n"
                                             "from helpers import tool\nimport vendored\n"
                                             "def build(): raise SystemExit('imported')\n")
    (repo / "pkg" / "layers.py").write_text("from ..helpers import tool\nfrom pkg import factory\n")  # a cycle
    (repo / "pkg" / "heads.py").write_text("def broken(:\n")  # cannot be parsed: recorded, not followed
    (repo / "helpers.py").write_text("import deeper\n")
    (repo / "deeper.py").write_text("")
    (repo / "venv" / "site" / "vendored.py").write_text("")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    record = code_record.read({"sweep_file": None}, ["pkg.factory:build"], [repo, repo / "venv" / "site"])
    modules = {k for k in record.tags if k.startswith("code.module.") and not k.endswith(".sha256")}
    assert modules == {"code.module.pkg/layers.py", "code.module.pkg/heads.py", "code.module.helpers.py",
                       "code.module.deeper.py", "code.module.pkg/__init__.py"}
    assert record.tags["code.module.deeper.py"].startswith(f"{repo / 'deeper.py'} sha256:")  # untracked: by content
    assert code_record.changed_since(record.tags) == {}
    (repo / "deeper.py").write_text("X = 1\n")
    assert code_record.changed_since(record.tags) == {"code.changed": str(repo / "deeper.py")}
    assert "deeper.py changed since the sweep was submitted" in capsys.readouterr().err

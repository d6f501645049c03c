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
    assert record.tags["code.sweep_file"] == f"{tmp_path / 'sweep.yaml'} at no commit (dirty)"
    assert record.tags["mlflow.source.git.dirty"] == "True" and "mlflow.source.git.commit" not in record.tags
    git = ["git", "-C", str(tmp_path), "-c", "user.name=r", "-c", "user.email=r@lab"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    subprocess.run([*git, "checkout", "-q", "--detach"], check=True)
    record = code_record.read({"sweep_file": tmp_path / "sweep.yaml"}, [], [tmp_path])
    assert "mlflow.source.git.branch" not in record.tags and record.tags["mlflow.source.git.dirty"] == "False"
    assert record.diffs == {}

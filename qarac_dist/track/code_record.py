"""The user's code a sweep ran, read once when it submits: for the sweep file, the base config
and the module of each `model.factory`, the git repository it lives in (commit, branch, remote
without credentials, whether the tree is dirty, the diff against the commit and the names of
untracked files), or, outside any repository, a hash of its content.

Runs carry it as tags: MLflow's own `mlflow.source.git.*` for the sweep file's repository
(MLflow sets them only from the executed script's repository, never the user's for a sweep:
mlflow#11238), `code.<file>` for each file. The parent run gets the diffs as artifacts. A trial
whose factory module changed after submission says so in its log and in a `code.changed` tag
(`changed_since`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from ..base.secrets import redact_text

_DIFF_LIMIT = 5 << 20
"""Bytes of a diff kept: a tree with generated files changed may differ by gigabytes."""


@dataclass
class CodeRecord:
    tags: dict = field(default_factory=dict)
    diffs: dict = field(default_factory=dict)
    """Artifact name -> the diff of a dirty repository and the names of its untracked files."""


def of_sweep(source: str, base, trials: list) -> CodeRecord:
    """The record of a sweep about to be submitted: its file, its base config (a file, when it
    names one) and its trials' factory modules, found where a job imports them from (the
    driver's folder, PYTHONPATH, then the driver's own path)."""
    folder = Path(source).parent
    files = {"sweep_file": Path(source), "base_config": folder / base if isinstance(base, str) else None}
    search = [Path.cwd(), *(Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p),
              *(Path(p) for p in sys.path if p)]
    return read(files, [t.config["model"]["factory"] for t in trials if t.config.get("model", {}).get("factory")],
                search)


def read(files: dict[str, Optional[Path]], factories: list[str], search: list[Path]) -> CodeRecord:
    """The record of `files` (role -> path; None: there is no such file) and of the modules of
    `factories` (`module:function`), found on `search` (the folders a job imports from) without
    importing them."""
    for spec in sorted(set(factories)):
        files[f"factory.{spec.partition(':')[0]}"] = module_file(spec.partition(":")[0], search)
    record, repos = CodeRecord(), {}
    for role, path in files.items():
        if path is None or not path.is_file():
            continue
        path = path.resolve()
        if role.startswith("factory."):  # what a trial that starts later compares (changed_since)
            record.tags[f"code.{role}.sha256"] = sha256(path)
        root = _git(path.parent, "rev-parse", "--show-toplevel")
        if root is None:
            record.tags[f"code.{role}"] = f"{path} sha256:{sha256(path)}"
            continue
        if root not in repos:
            repos[root] = _repository(Path(root))
            record.diffs.update(repos[root].pop("diff"))
        repo = repos[root]
        record.tags[f"code.{role}"] = f"{path} at {repo['commit'] or 'no commit'}{' (dirty)' if repo['dirty'] else ''}"
        if role == "sweep_file":
            record.tags.update({f"mlflow.source.git.{k}": str(repo[k]) for k in ("commit", "branch", "repoURL", "dirty")
                                if repo[k] is not None})
    return record


def module_file(name: str, search: list[Path]) -> Optional[Path]:
    """Where `import name` finds a source file on `search` (a package's __init__.py), or None."""
    parts = name.split(".")
    for folder in search:
        for path in (folder.joinpath(*parts).with_suffix(".py"), folder.joinpath(*parts, "__init__.py")):
            if path.is_file():
                return path
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def changed_since(tags: dict) -> dict:
    """Tags naming each factory module whose content is not the one recorded at submission
    (said in one line each); {} when none changed."""
    changed = []
    for key, recorded in tags.items():
        if key.startswith("code.factory.") and key.endswith(".sha256"):
            path = Path(str(tags.get(key[:-len(".sha256")], "")).split(" ")[0])
            try:
                now = sha256(path)
            except OSError:
                now = "gone"
            if now != recorded:
                print(f"qarac_dist: {path} changed since the sweep was submitted: this trial runs code that is not "
                      f"the one recorded on its run", file=sys.stderr)
                changed.append(str(path))
    return {"code.changed": ", ".join(changed)} if changed else {}


def _repository(root: Path) -> dict:
    status = _git(root, "status", "--porcelain", "--untracked-files=all") or ""
    untracked = [line[3:] for line in status.splitlines() if line.startswith("?? ")]
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    remotes = (_git(root, "remote") or "").split()
    remote = _git(root, "remote", "get-url", "origin" if "origin" in remotes else remotes[0]) if remotes else None
    diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff") or ""
    if len(diff) > _DIFF_LIMIT:
        diff = diff[:_DIFF_LIMIT] + f"\n[cut at {_DIFF_LIMIT:,} bytes]\n"
    if untracked:
        diff += "".join(f"untracked: {name}\n" for name in untracked)
    name = f"code/{root.name or 'repository'}.diff"
    return {"commit": _git(root, "rev-parse", "HEAD"), "branch": None if branch == "HEAD" else branch,
            "repoURL": without_credentials(remote) if remote else None, "dirty": bool(status.strip()),
            "diff": {name: redact_text(diff)} if diff else {}}


def without_credentials(url: str) -> str:
    """A remote's URL without its credentials: over http(s) the user too (`https://<token>@host/`
    is a common way to clone a private repository on a cluster); over ssh the user stays
    (`ssh://git@host/...`, scp-like `git@host:path`) unless a password comes with it."""
    parts = urlsplit(url)
    if "@" in parts.netloc and (parts.scheme in ("http", "https") or parts.password is not None):
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return redact_text(url)


def _git(folder: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip("\n") if out.returncode == 0 else None

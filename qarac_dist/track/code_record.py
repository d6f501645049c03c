"""The user's code a sweep ran, read once when it submits: for the sweep file, the base config,
the module of each `model.factory` and the modules of its repository that it imports (directly
or through each other, read from their source, not imported), the git repository it lives in
(commit, branch, remote without credentials, whether the tree is dirty, the diff against the
commit and the names of untracked files), or, outside any repository, a hash of its content.

Runs carry it as tags: MLflow's own `mlflow.source.name` (the sweep file) and `mlflow.source.git.*`
for the sweep file's repository
(MLflow sets them only from the executed script's repository, never the user's for a sweep:
mlflow#11238), `code.<file>` for each file. The parent run gets the diffs as artifacts. A trial
whose factory module changed after submission says so in its log and in a `code.changed` tag
(`changed_since`), and so does one whose factory's local modules changed.
"""

from __future__ import annotations

import ast
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
    try:
        return read(files, [t.config["model"]["factory"] for t in trials
                            if t.config.get("model", {}).get("factory")], search)
    except Exception as err:  # noqa: BLE001 - a record of the code never stops the sweep it describes
        print(f"qarac_dist: the sweep's code is not recorded on its runs ({type(err).__name__}: "
              f"{redact_text(str(err))[:300]})", file=sys.stderr)
        return CodeRecord()


def read(files: dict[str, Optional[Path]], factories: list[str], search: list[Path]) -> CodeRecord:
    """The record of `files` (role -> path; None: there is no such file) and of the modules of
    `factories` (`module:function`), found on `search` (the folders a job imports from) without
    importing them."""
    for spec in sorted(set(factories)):
        path = files[f"factory.{spec.partition(':')[0]}"] = module_file(spec.partition(":")[0], search)
        if path is not None:
            files.update({f"module.{name}": module for name, module in local_imports(path, search).items()})
    record, repos = CodeRecord(), {}
    for role, path in files.items():
        if path is None or not path.is_file():
            continue
        path = path.resolve()
        if role == "sweep_file":  # what the runs table's Source column names
            record.tags.update({"mlflow.source.name": str(path), "mlflow.source.type": "LOCAL"})
        if role.startswith(("factory.", "module.")):  # what a trial that starts later compares (changed_since)
            record.tags[f"code.{role}.sha256"] = sha256(path)
        root = _git(path.parent, "rev-parse", "--show-toplevel")
        if root is not None and root not in repos:
            repos[root] = _repository(Path(root))
            if repos[root]["diff"]:  # named by the folder; two of one name told apart by their path
                name = f"code/{Path(root).name or 'repository'}.diff"
                if name in record.diffs:
                    name = f"code/{Path(root).name}-{hashlib.sha256(root.encode()).hexdigest()[:8]}.diff"
                record.diffs[name] = repos[root]["diff"]
        if root is None or _git(Path(root), "ls-files", "--error-unmatch", "--", str(path)) is None:
            # outside any repository, or in one but not in its commit (untracked, ignored)
            record.tags[f"code.{role}"] = f"{path} sha256:{sha256(path)}"
            if root is None:
                continue
        repo = repos[root]
        record.tags.setdefault(f"code.{role}",
                               f"{path} at {repo['commit'] or 'no commit'}{' (dirty)' if repo['dirty'] else ''}")
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


MAX_MODULES = 200
"""Local modules followed from one factory at most (a repository of generated code)."""


def local_imports(path: Path, search: list[Path]) -> dict[str, Path]:
    """The modules `path` imports, directly or through each other, that are source files of its
    own git repository and not ignored by it (a virtual environment inside the repository is),
    by their path in the repository. Read with `ast`, never imported; relative imports resolved
    from the importing file's package."""
    root = _git(path.parent, "rev-parse", "--show-toplevel")
    if root is None:
        return {}
    root_path, found, todo, seen = Path(root).resolve(), {}, [path.resolve()], {path.resolve()}
    while todo and len(found) < MAX_MODULES:
        current = todo.pop()
        try:
            tree = ast.parse(current.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            for name, where in _imported(node, current, search):
                module = module_file(name, where)
                if module is None or (module := module.resolve()) in seen:
                    continue
                seen.add(module)
                if module.is_relative_to(root_path) and "site-packages" not in module.parts and \
                        _git(root_path, "check-ignore", "-q", "--", str(module)) is None:
                    found[str(module.relative_to(root_path))] = module
                    todo.append(module)
    return found


def _imported(node, current: Path, search: list[Path]) -> list[tuple[str, list[Path]]]:
    """(module name, the folders to find it on) for each module an import statement may load:
    `import a.b`; `from a import b` (a, and a.b where b is a module); `from .a import b`."""
    if isinstance(node, ast.Import):
        return [(alias.name, search) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the importing file's package, `level - 1` folders up
        folder = current.parent
        for _ in range(node.level - 1):
            folder = folder.parent
        where = [folder]
    else:
        where = search
    names = [node.module] if node.module else []
    names += [f"{node.module}.{alias.name}" if node.module else alias.name for alias in node.names if alias.name != "*"]
    return [(name, where) for name in names]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def changed_since(tags: dict) -> dict:
    """Tags naming each factory module, or local module it imports, whose content is not the one
    recorded at submission (said in one line each); {} when none changed."""
    changed = []
    for key, recorded in tags.items():
        if key.startswith(("code.factory.", "code.module.")) and key.endswith(".sha256"):
            shown = str(tags.get(key[:-len(".sha256")], ""))  # `<path> at <commit>...` or `<path> sha256:<hash>`
            path = Path(shown.rsplit(" sha256:", 1)[0] if " sha256:" in shown else shown.rsplit(" at ", 1)[0])
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
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all") or ""  # -z: names unquoted
    untracked = [entry[3:] for entry in status.split("\0") if entry.startswith("?? ")]
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    remotes = (_git(root, "remote") or "").split()
    remote = _git(root, "remote", "get-url", "origin" if "origin" in remotes else remotes[0]) if remotes else None
    diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff") or ""
    if len(diff) > _DIFF_LIMIT:
        diff = diff[:_DIFF_LIMIT] + f"\n[cut at {_DIFF_LIMIT:,} bytes]\n"
    if untracked:
        diff += "".join(f"untracked: {name}\n" for name in untracked)
    return {"commit": _git(root, "rev-parse", "HEAD"), "branch": None if branch == "HEAD" else branch,
            "repoURL": without_credentials(remote) if remote else None, "dirty": bool(status.strip()),
            "diff": redact_text(diff)}


def without_credentials(url: str) -> str:
    """A remote's URL without its credentials: over http(s) the user too (`https://<token>@host/`
    is a common way to clone a private repository on a cluster); over ssh the user stays
    (`ssh://git@host/...`, scp-like `git@host:path`) unless a password comes with it."""
    try:
        parts = urlsplit(url)
        if "@" in parts.netloc and (parts.scheme.rpartition("+")[2] in ("http", "https") or
                                    parts.password is not None):
            return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    except ValueError:  # git takes any string as a remote: keep none of what may be a user in it
        return redact_text(url.rpartition("@")[2])
    return redact_text(url)


def _git(folder: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-c", "core.quotePath=false", "-C", str(folder), *args], capture_output=True,
                             text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip("\n") if out.returncode == 0 else None

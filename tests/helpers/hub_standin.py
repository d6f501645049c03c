"""A stand-in for the Hugging Face hub on 127.0.0.1, for HF_ENDPOINT: it serves the repositories
under a directory (`models/<org>/<name>/...`, `datasets/<org>/<name>/...`) through the few
routes huggingface_hub and datasets use to download them, and counts the requests it answered.
Nothing here reaches the real hub. `python hub_standin.py ROOT` serves ROOT and prints its URL."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0" * 39 + "1"


class Hub(ThreadingHTTPServer):
    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "Hub":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def _repo(root: Path, kind: str, rest: list[str]) -> tuple[Path, list[str]] | None:
    """The repository directory and the rest of the path, for `kind/org/name/...`."""
    if len(rest) >= 2 and (root / kind / rest[0] / rest[1]).is_dir():
        return root / kind / rest[0] / rest[1], rest[2:]
    return None


def _files(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_POST(self) -> None:  # paths-info: the entries of the paths asked for
        self._answer(body=True)

    def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, value, body: bool) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

    def _answer(self, body: bool) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.server.requests.append(f"{self.command} {url.path}")
        root = self.server.root
        if parts[:1] == ["api"] and len(parts) >= 2 and parts[1] in ("models", "datasets"):
            found = _repo(root, parts[1], parts[2:])
            if found is None:
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
            repo, rest = found
            name = f"{parts[2]}/{parts[3]}"
            if rest[:1] in (["revision"], []):
                siblings = [{"rfilename": f} for f in _files(repo)]
                return self._json({"id": name, "sha": COMMIT, "siblings": siblings, "private": False,
                                   "disabled": False, "gated": False, "tags": [], "cardData": {}}, body)
            if rest[:1] in (["tree"], ["paths-info"]):
                under = "/".join(rest[2:])
                if rest[0] == "paths-info":
                    length = int(self.headers.get("Content-Length", 0))
                    asked = self.rfile.read(length).decode()
                    wanted = [unquote(p) for p in asked.replace("paths=", "").split("&") if p] if asked else []
                    entries = [p for p in wanted if (repo / p).exists()]
                else:
                    base = repo / under if under else repo
                    deep = "recursive=true" in (url.query or "").lower() or "recursive=True" in (url.query or "")
                    found_paths = base.rglob("*") if deep else base.glob("*")
                    entries = sorted(str(p.relative_to(repo)) for p in found_paths)
                return self._json([_entry(repo, p) for p in entries], body)
        kind = "datasets" if parts[:1] == ["datasets"] else "models"
        found = _repo(root, kind, parts[1:] if kind == "datasets" else parts)
        if found is not None and found[1][:2] and found[1][0] == "resolve":
            repo, rest = found
            path = repo / "/".join(rest[2:])
            if path.is_file():
                data = path.read_bytes()
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                return self._send(200, data, {"ETag": etag, "X-Repo-Commit": COMMIT}, body)
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body)
        self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)


def _entry(repo: Path, rel: str) -> dict:
    path = repo / rel
    if path.is_dir():
        return {"type": "directory", "path": rel, "oid": COMMIT}
    data = path.read_bytes()
    return {"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


if __name__ == "__main__":
    hub = Hub(Path(sys.argv[1]))
    print(hub.url, flush=True)
    hub.serve_forever()

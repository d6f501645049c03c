"""What never reaches MLflow, our logs or the files we write for people: secrets.

Screened, by key name and by the shape of the value:
- keys with a word of their name (split at `.`, `_`, `-` and camelCase) equal to token, key,
  password, passwd, secret, credential(s), apikey or passphrase, or containing password,
  secret or apikey (`hf_token`, `api_key`, `dbPassword`; not `max_tokens` or `tokenizer`):
  the param is left out, the value in a file becomes `[redacted]`;
- values shaped like common tokens: Hugging Face (`hf_...`), AWS access keys (`AKIA...`,
  `ASIA...`), `sk-...` API keys, GitHub (`ghp_...`, `github_pat_...`), GitLab (`glpat-...`),
  Slack (`xox?-...`), Google (`AIza...`), JSON web tokens, PEM private keys, `Bearer ...`;
- long high-entropy strings: 32 or more characters of letters, digits and `+=_-.~` with upper
  and lower case and digits and over 4.5 bits per character (hex alone is not taken for a
  secret: MLflow run ids and commit hashes are hex);
- values equal to, or containing, an environment variable whose name looks secret;
- credentials in URIs (`scheme://user:password@host`): the password is redacted, the rest kept;
- in text, the value of an assignment to a secret-named name (`export HF_TOKEN=...`,
  `--api-key=...`).
A param whose value holds a secret is left out; text (artifacts, error lines, run names) keeps
its shape with the secret replaced.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any, Mapping

REDACTED = "[redacted]"
_SECRET_WORDS = {"token", "key", "password", "passwd", "secret", "credential", "credentials", "apikey",
                 "passphrase"}
_SECRET_PARTS = ("password", "secret", "apikey")
_TOKENS = re.compile("|".join([
    r"\bhf_[A-Za-z0-9]{20,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bsk-[A-Za-z0-9_\-]{16,}",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bglpat-[A-Za-z0-9_\-]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
    r"\bAIza[0-9A-Za-z_\-]{30,}",
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.|\n)*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
    r"(?i:\bbearer\s+)[A-Za-z0-9._~+/=\-]{12,}",
]))
_ASSIGNMENT = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_-]*[\"']?[ \t]*[=:][ \t]*)(\"[^\"]*\"|'[^']*'|[^\s;&|,}]+)")
"""NAME=value (a shell line's `export HF_TOKEN=...`, a `--api-key=...` flag), `name = "value"`
(Python), `name: value` (YAML), `"name": "value"` (JSON): by the name."""
_LONG = re.compile(r"[A-Za-z0-9+=_\-.~]{32,}")
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/:@]+:)(?P<password>[^\s/@]+)(?=@)")


def is_secret_name(name: str) -> bool:
    words = re.split(r"[._\-\s]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(w in _SECRET_WORDS or any(p in w for p in _SECRET_PARTS) for w in words)


def _high_entropy(token: str) -> bool:
    if not (re.search(r"[a-z]", token) and re.search(r"[A-Z]", token) and re.search(r"[0-9]", token)):
        return False
    counts = Counter(token)
    entropy = -sum(c / len(token) * math.log2(c / len(token)) for c in counts.values())
    return entropy > 4.5


def _env_secrets(environ: Mapping[str, str]) -> list[str]:
    while True:
        try:  # another thread may set or unset a variable meanwhile (MLflow's telemetry does)
            items = list(environ.items())
            break
        except (KeyError, RuntimeError):
            continue
    return [v for k, v in items if is_secret_name(k) and len(v) >= 6]


def redact_text(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """`text` with every secret-shaped part replaced; URI passwords become `***`."""
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + "***", text)
    text = _ASSIGNMENT.sub(_assignment, text)
    text = _TOKENS.sub(REDACTED, text)
    text = _LONG.sub(lambda m: REDACTED if _high_entropy(m.group()) else m.group(), text)
    for value in _env_secrets(environ):
        text = text.replace(value, REDACTED)
    return text


def _assignment(match: re.Match) -> str:
    """A secret-named name's value redacted; `Name: ...` with a CamelCase name is no assignment
    but a label (`KeyError: 'x'` in an error line)."""
    head, name = match.group(1), match.group(1).rstrip("=: \t\"'")
    label = "=" not in head and re.search(r"[a-z][A-Z]", name)
    return head + (REDACTED if is_secret_name(name) and not label else match.group(2))


def holds_secret(text: str, environ: Mapping[str, str] = os.environ) -> bool:
    return redact_text(text, environ) != text


def redact(obj: Any, environ: Mapping[str, str] = os.environ) -> Any:
    """A copy of a JSON-like value with secret-named keys' values and secret-shaped strings
    redacted (for files and artifacts we write)."""
    if isinstance(obj, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret_name(k) and isinstance(v, str) and v
                else redact(v, environ) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, environ) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, environ)
    return obj


def screen(flat: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Dotted key -> value, as MLflow params or tags: secret-named keys and values holding a
    secret are left out; a URI keeps its shape with its password redacted."""
    out = {}
    for key, value in flat.items():
        if value is None or (not isinstance(value, (bool, int, float))
                             and any(is_secret_name(part) for part in key.split("."))):
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        without_uri_password = _URI_PASSWORD.sub(lambda m: m.group("head") + "***", text)
        if holds_secret(without_uri_password, environ):
            continue
        out[key[:250]] = without_uri_password[:6000]
    return out

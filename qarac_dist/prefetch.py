"""`python -m qarac_dist.prefetch FILE [dotted.key=value ...]`: download every model, tokenizer and
data set that FILE's trials load by name (FILE: a sweep file or a training config) into the
caches the trials use, on a node that reaches the hub (a login node), for compute nodes that do
not (`environment.hub_offline: true`). What is cached already is not fetched: run twice, the
second run does nothing. HF_ENDPOINT (a mirror) and HF_TOKEN (gated models) are huggingface_hub's.
"""

from __future__ import annotations

import argparse
import os
import sys

from .base.secrets import redact_text
from .config import UserError, config_to_dict, load_config, read_yaml
from .config.environment import Environment
from .config.sweep import is_sweep, load_sweep
from .plan import plan
from .preflight.hub_cache import config_mistake, fetch, hub_variables, missing, needed, sweep_configs
from .train.hub import load_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a sweep file or a training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_intermixed_args(argv)
    stderr, sys.stderr = sys.stderr, _Redacting(sys.stderr)  # before the hub's libraries hold it
    try:
        env, configs = _configs(args.config, args.overrides)
        os.environ.update(hub_variables(env))  # as the trials would: HF_HOME, HF_TOKEN, HF_ENDPOINT
        return _fetch_missing(env, needed(configs))
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        sys.stderr = stderr


def _fetch_missing(env: Environment, items: list) -> int:
    cache = env.hub_cache(os.environ)
    todo = missing(items, cache, env.exported())
    print(f"{len(items)} loaded by name, {len(items) - len(todo)} cached already, {len(todo)} to fetch", flush=True)
    mistakes = [item for item, why in todo.items() if config_mistake(why)]
    for item in mistakes:  # fetching cannot mend these
        print(f"{item} {todo[item]}", file=sys.stderr, flush=True)
    failed: set = set()
    for i, item in enumerate(todo, 1):
        fetched = item.kind != "dataset" and not missing([item], cache, env.exported())  # with its model
        if item in mistakes or item.name in failed or fetched:  # (a data set is asked of a child Python: not again)
            continue
        print(f"[{i}/{len(todo)}] {item} into {item.cache or cache}", flush=True)
        try:
            fetch(item, cache)
        except Exception as err:  # noqa: BLE001 - hub, network and disk errors, one line each
            print(redact_text(_failure(item, err, item.cache or cache)), file=sys.stderr, flush=True)
            failed.add(item.name)
    still = missing([n for n in todo if n.name not in failed and n not in mistakes], cache, env.exported())
    for item, why in still.items():  # fetched, and still not what the trials load
        print(f"{item} {why} ({item.cache or cache}) after fetching it", file=sys.stderr, flush=True)
    return 2 if mistakes else 1 if failed or still else 0


def _failure(item, err: Exception, into) -> str:
    """One line for a failed fetch: a file system's error as itself (an OSError with an errno:
    the hub's and the network's errors carry none), else what the trial would say."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{item.key}: cannot fetch {item.name!r} into {into}: {err.strerror} ({err.filename or into})"
    return str(load_error(item.key, item.name, err))


class _Redacting:
    """A text stream that writes what it is given with secrets masked (base/secrets.py)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(redact_text(text))

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _configs(source: str, overrides: list[str]) -> tuple[Environment, list[dict]]:
    """The environment and the trial configs of a sweep file, or of one training config."""
    raw = read_yaml(source)
    if is_sweep(raw):
        spec, base = load_sweep(source, overrides)
        return spec.environment, sweep_configs(spec, plan(spec, base, source))
    return Environment(), [config_to_dict(load_config(source, overrides))]


if __name__ == "__main__":
    sys.exit(main())

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
from .config.sweep import load_sweep
from .plan import plan
from .preflight.hub_cache import fetch, missing, needed, sweep_configs
from .train.hub import load_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a sweep file or a training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        env, configs = _configs(args.config, args.overrides)
    except UserError as err:
        print(redact_text(str(err)), file=sys.stderr)
        return err.exit_code
    items = needed(configs)
    cache = env.hub_cache(os.environ)
    todo = missing(items, cache, env.exported())
    print(f"{len(items)} loaded by name, {len(items) - len(todo)} cached already, {len(todo)} to fetch", flush=True)
    failed = 0
    for i, item in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {item} into {item.cache or cache}", flush=True)
        try:
            fetch(item, cache)
        except Exception as err:  # noqa: BLE001 - hub, network and disk errors, one line each
            print(redact_text(str(load_error(item.key, item.name, err))), file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


def _configs(source: str, overrides: list[str]) -> tuple[Environment, list[dict]]:
    """The environment and the trial configs of a sweep file, or of one training config."""
    raw = read_yaml(source)
    if "grid" in raw or "base" in raw:
        spec, base = load_sweep(source, overrides)
        return spec.environment, sweep_configs(spec, plan(spec, base, source))
    return Environment(), [config_to_dict(load_config(source, overrides))]


if __name__ == "__main__":
    sys.exit(main())

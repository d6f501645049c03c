"""`python -m qarac_dist.preflight CONFIG_OR_SWEEP.yaml [dotted.key=value ...]`: dead gradients
and inconsistent configs, found on your own machine in seconds, before a job is submitted.

    --find-batch-size   sweep files: the largest micro batch that fits, by real steps on one GPU
                        of the sweep's resources, planned into the sweep
"""

from __future__ import annotations

import argparse
import json
import sys

from ..base.secrets import redact_text
from ..config import ConfigError, UserError, config_from_dict, load_config, read_yaml
from ..config.sweep import is_sweep, load_sweep
from ..plan import plan
from ..submit.executors import resolve_kind
from ..submit.sweep_dir import layout_for
from . import batch_size
from .audit import print_result, run_many
from .hub_cache import go_offline, refuse_missing, sweep_configs
from .memory import gib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a training config or a sweep file (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    parser.add_argument("--find-batch-size", action="store_true",
                        help="sweep files: find the largest micro batch that fits, with real steps on one GPU "
                             "of the sweep's resources (a SLURM job), and plan the sweep with it")
    args = parser.parse_intermixed_args(argv)
    try:
        raw = read_yaml(args.config)
        if args.find_batch_size:
            return find_batch_size(args.config, args.overrides)
        if is_sweep(raw):
            spec, base = load_sweep(args.config, args.overrides)
            trials = plan(spec, base, args.config)
            if spec.environment.hub_offline:  # load what the trials load, where they do
                refuse_missing(spec.environment, sweep_configs(spec, trials), args.config, args.overrides,
                               spec.final.split if spec.final is not None else None)
                go_offline(spec.environment)
            configs = [config_from_dict(t.config, args.config) for t in trials]
            world, resources = spec.resources.world_size, spec.resources
        else:
            configs, world, resources = [load_config(args.config, args.overrides)], 1, None
        results = run_many(configs, world, resources)
    except (ConfigError, UserError) as err:
        print(redact_text(str(err) if isinstance(err, ConfigError) else f"{args.config}: {err}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    for result in results:
        print_result(result)
    return 0 if all(r.ok for r in results) else 1


def find_batch_size(source: str, overrides: list[str]) -> int:
    raw = read_yaml(source)
    if not is_sweep(raw):
        raise UserError("--find-batch-size: give a sweep file (it writes into the sweep's directory)")
    spec, base = load_sweep(source, overrides)
    trials = plan(spec, base, source)
    layout = layout_for(spec)
    results = batch_size.find(spec, trials, resolve_kind(spec, source), layout)
    for key, result in results.items():
        model = json.loads(key)["model"]
        what = model.get("name_or_path") or model.get("factory") or (model.get("config") or {}).get("model_type")
        peak = f", peak {gib(result['peak_bytes'])}" if result["peak_bytes"] else ""
        print(f"{what}: largest micro batch that fits {result['micro_batch_size']} on {result['device']}{peak} "
              f"(budget {gib(result['budget_bytes'])}; tried {', '.join(result['tried'])})"
              + (f"; capped at the training set's {result['training_examples']} examples"
                 if result.get("capped_by_training_set") else ""))
    print(f"written to {layout.micro_batches}; the sweep plans with it from now on")
    return 0 if all(r["micro_batch_size"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

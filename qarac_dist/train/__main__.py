"""`python -m qarac_dist.train CONFIG.yaml [dotted.key=value ...]`: one trial, one explicit loop.

Runs as one process, or as one process per rank under torchrun, the deepspeed launcher, srun
or submitit.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys

from ..config import ConfigError, UserError, config_to_dict, deepspeed_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qarac_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print it and its DeepSpeed JSON; download and write nothing")
    parser.add_argument("--world-size", type=int, default=1, help="ranks for --dry-run's DeepSpeed JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.world_size < 1:
            raise UserError(f"--world-size: expected at least 1, got {args.world_size}")
        if args.dry_run:
            import yaml

            from ..base.secrets import redact

            print(yaml.safe_dump(redact(config_to_dict(cfg)), sort_keys=False), end="")
            print(f"# DeepSpeed config on {args.world_size} rank(s):")
            print(json.dumps(redact(deepspeed_config(cfg, args.world_size)), indent=2))
            return 0
        from .stop import Preempted
        from .run import run

        # A rank killed by a C++ abort (SIGABRT, SIGSEGV) prints every thread's Python stack first.
        faulthandler.enable(all_threads=True)
        try:
            run(cfg)
        except Preempted as stop:
            _say(f"qarac_dist: {stop}; run the same command again to resume")
            return 3
    except ConfigError as err:
        _say(str(err))
        return 2
    except UserError as err:
        _say(f"{args.config}: {err}")
        return 2
    return 0


def _say(line: str) -> None:
    """A line on stderr in one write: every rank says it, and under PYTHONUNBUFFERED print()'s
    text and its newline are two writes, which another rank's line could come between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

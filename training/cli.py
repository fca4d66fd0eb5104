"""The `senet` command (also `python -m training`): one subcommand per user task.

Each command prints a short human summary; `--json FILE` writes machine-readable results. Errors are
one line naming the file, key or value: exit 2 for usage and configuration errors, 1 for failures.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline.errors import DataError
from training.config import ConfigError

log = logging.getLogger("senet")


class UsageError(Exception):
    """A wrong command-line value (exit 2)."""


class Failure(Exception):
    """The command ran and failed; the message says why (exit 1)."""


def progress_bar(quiet: bool, desc: str) -> Callable[..., Iterator]:
    """Wrap an iterator in a tqdm bar, only on a terminal and without --quiet.

    The wrapped iterator may yield sized chunks (the bar then counts their items) when `total` is given.
    """
    def wrap(it: Iterator, total: int | None = None) -> Iterator:
        if quiet or not sys.stderr.isatty():
            yield from it
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
            for item in it:
                bar.update(len(item) if total is not None and hasattr(item, "__len__") else 1)
                yield item
    return wrap


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------- parser
COMMAND_GROUP = "senet.commands"  # entry points: each names a `register(subparsers)` function


def build_parser() -> argparse.ArgumentParser:
    """The `senet` parser with every command group installed (see pyproject's senet.commands).

    Groups are entry points so that `slurm` can add `submit` without `training` importing `slurm`.
    """
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(prog="senet", description="Squeeze-and-Excitation networks: data, training, "
                                     "Slurm jobs and ILSVRC submissions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"senet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (DataError, Failure) as e:
        print(f"senet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"senet {args.command}: interrupted", file=sys.stderr)
        return 130

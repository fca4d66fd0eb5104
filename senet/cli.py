"""The `senet` command (also `python -m senet`): one subcommand per user task.

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


def add_exclusion_options(p: argparse.ArgumentParser) -> None:
    """--cache-dir and --exclude: where check-data's exclusion list is read, and one more list to honour."""
    from pipeline.datasets import DEFAULT_CACHE_DIR

    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="data.cache_dir: check-data's exclusion list is read "
                   "there")
    p.add_argument("--exclude", help="extra exclusion list (file names or tree-relative paths)")


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The `senet` parser with every command group installed, in the order `senet --help` lists them."""
    from senet import cmd_data, cmd_input, cmd_jobs, cmd_models, cmd_submission, cmd_train

    parser = argparse.ArgumentParser(prog="senet", description="Squeeze-and-Excitation networks: data, training, "
                                     "Slurm jobs and ILSVRC submissions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (cmd_data, cmd_input, cmd_train, cmd_jobs, cmd_submission, cmd_models):
        group.register(sub)
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

"""What every `senet` command shares: its error types (exit 2 and 1), JSON output, progress bars and the
options several commands take."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.datasets import DEFAULT_CACHE_DIR


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
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="data.cache_dir: check-data's exclusion list is read "
                   "there")
    p.add_argument("--exclude", help="extra exclusion list (file names or tree-relative paths)")


def add_set_options(p: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE (repeatable) and --set-file F: the overrides of a command that reads a config."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.epochs=3")
    p.add_argument("--set-file", metavar="F", help="a file of --set items, one section.key=value per line (# starts "
                   "a comment line), applied before any --set: e.g. the settings `senet bench-input --tune` wrote")


def config_overrides(args: argparse.Namespace) -> list[str | tuple[str, str]]:
    """--set-file's items (each naming its FILE:LINE in errors), then --set's: a --set wins over the file."""
    from training.config import read_overrides

    return [*(read_overrides(args.set_file) if args.set_file else []), *args.set]


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")

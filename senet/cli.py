"""The `senet` command (also `python -m senet`): one subcommand per user task.

Each command prints a short human summary; `--json FILE` writes machine-readable results. Errors are
one line naming the file, key or value: exit 2 for usage and configuration errors, 1 for failures.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pipeline.errors import DataError
from senet import cmd_data, cmd_input, cmd_jobs, cmd_models, cmd_submission, cmd_train
from senet.console import Failure, UsageError
from training.config import ConfigError

log = logging.getLogger("senet")


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The `senet` parser with every command group installed, in the order `senet --help` lists them."""
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
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "nvidia":
            raise
        # DALI is an extra, one flavour per CUDA major: a plain `pip install senet` has none.
        print(f"senet {args.command}: error: NVIDIA DALI is not installed ({e}); install the DALI for this machine: "
              f"make install CUDA=12 (or 13), or pip install -e '.[cuda12]' ('.[cuda13]' for CUDA 13; cuda12 on a "
              f"machine without GPU)", file=sys.stderr)
        return 1

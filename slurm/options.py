"""`senet submit`'s own flags (--nodes, --time, ...) as `slurm.key=value` overrides, validated and saved like `--set`."""
from __future__ import annotations

import json

from slurm.sbatch import parse_time


def apply_cli(cfg_overrides: list[str | tuple[str, str]], nodes: int | None, gpus_per_node: int | None,
              partition: str | None, time_limit: str | None, account: str | None, qos: str | None,
              out: str | None) -> list[str | tuple[str, str]]:
    """The command-line options as `slurm.key=value` overrides, so they are validated and saved like `--set`.

    `cfg_overrides` may hold (where, item) pairs (`training.config.read_overrides`); they pass through.
    """
    items = list(cfg_overrides)
    given = {"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition, "account": account, "qos": qos,
             "output_root": out, "time_min": parse_time(time_limit) if time_limit is not None else None}
    for key, value in given.items():
        if value is not None:
            items.append(f"slurm.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return items

"""``train --config FILE``: repeat a run from its ``config.json``.

The file's settings become command-line options placed before the ones given, so the parser
checks them exactly as if typed (types, choices, ranges) and an option given explicitly
overrides the file's value (``--steps`` or ``--epochs`` replace the file's budget). A file
that is not a configuration written by ``train``, or that holds a key ``train`` does not
know, is refused in one line naming the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from functional_meta.cli.arguments import PROG, UsageError, config_keys
from functional_meta.recipes import DATASETS

__all__ = ["read_config", "replay_argv"]


def read_config(path: str | Path) -> dict[str, Any]:
    """The configuration stored in ``path`` (a run's ``config.json``), checked to hold only
    known keys with plain values (raises :class:`UsageError` naming the file otherwise;
    ``FileNotFoundError`` when it does not exist)."""
    text = Path(path).read_text()
    where = f"--config {path}"
    try:
        config = json.loads(text)
    except ValueError as error:
        raise UsageError(f"{where}: not a JSON configuration ({error})") from None
    if not isinstance(config, dict) or not {"algorithm", "dataset"} <= config.keys():
        raise UsageError(
            f"{where}: not a configuration written by {PROG} train "
            "(expected a JSON object with 'algorithm' and 'dataset')"
        )
    dataset = config["dataset"] if config["dataset"] in DATASETS else None
    unknown = sorted(config.keys() - config_keys(dataset))
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; expected those of a run's config.json")
    for key, value in config.items():
        if isinstance(value, list | dict):
            raise UsageError(f"{where}: {key} must be a plain value, got {json.dumps(value)}")
    return config


def replay_argv(path: str | Path, given: argparse.Namespace, argv: list[str]) -> list[str]:
    """The ``train`` arguments that repeat the run of ``path``: its settings as options
    (``--key=value``; ``None`` values left to the defaults), then ``argv``, the options given
    (parsed as ``given``), which override them."""
    if given.resume:
        raise UsageError(
            "give --config or --resume, not both (--resume reads the run's own settings)"
        )
    config = read_config(path)
    budget_given = given.steps is not None or given.epochs is not None
    if config.get("steps") is not None:
        config["epochs"] = None  # derived from steps when the run was configured
    options = []
    for key, value in config.items():
        explicit = getattr(given, key, None) is not None
        if value is None or explicit or (budget_given and key in ("steps", "epochs")):
            continue
        text = repr(value) if isinstance(value, float) else str(value)
        options.append(f"--{key.replace('_', '-')}={text}")
    return ["train", *options, *argv]

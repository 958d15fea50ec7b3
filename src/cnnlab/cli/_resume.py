"""``--resume`` of the multi-run commands (search, bagging): which folder, and which given options contradict it."""
from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable
from pathlib import Path

from cnnlab._errors import CnnlabError

# `cnnlab train` options -> config keys (as config_from_args maps them)
NAMED = {"model": "model.name", "data": "data.name", "epochs": "epochs", "batch_size": "data.batch_size",
         "lr": "optim.lr", "weights": "model.weights", "device": "device"}


def resume_folder(args: argparse.Namespace, given: str, flag: str = "--resume") -> Path:
    """``--resume DIR``, or the folder ``--out-dir``/``--name`` name when ``--resume`` comes bare."""
    named = Path(args.out_dir or "runs") / args.name if args.name else None
    if not given:
        if named is None:
            raise CnnlabError(f"{flag} without a folder needs --name (and --out-dir if not runs): which one to continue?")
        return named
    folder = Path(given)
    if named is not None and named.resolve() != folder.resolve():
        raise CnnlabError(f"{flag} {given} and --out-dir/--name ({named}) name different folders; give one of them")
    return folder


def config_conflicts(saved: dict, args: argparse.Namespace, ignore: Iterable[str], skip_options: Iterable[str] = (),
                     prepare=None) -> list[str]:
    """The config keys where the given options (--model, --set, --config ...) differ from ``saved``.

    The options are applied on top of the saved config, so repeating the original command's options is fine.
    """
    from cnnlab.engine.config import TrainConfig, apply_overrides
    from cnnlab.engine.resumable import config_differences

    named = [f"{key}={getattr(args, opt)}" for opt, key in NAMED.items()
             if opt not in set(skip_options) and getattr(args, opt, None) is not None]
    overrides = named + [o for o in args.overrides if o != "help"]
    if args.config:
        from cnnlab.cli.train import read_config

        start = read_config(args.config, "--config")
    elif overrides:
        start = TrainConfig.from_dict(copy.deepcopy(saved))
    else:
        return []
    given = apply_overrides(start, overrides)
    if prepare is not None:
        given = prepare(given)
    return config_differences(saved, given.to_dict(), ignore)


def refuse(folder: Path, what: str, conflicts: list[str]) -> None:
    if conflicts:
        raise CnnlabError(f"--resume {folder}: these options differ from the ones the {what} was started with: "
                          f"{'; '.join(conflicts)}. Leave them out (they are read from the folder) or start a new {what}")

"""Entry point of the ``cnnlab`` command.

Sub-commands live one group per module in this package; each module defines
``register(subparsers)`` and keeps heavy imports inside its command functions so
``cnnlab --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import cnnlab
from cnnlab._errors import CnnlabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="The landmark convolutional networks: build, inspect, train, evaluate, explain, detect, segment, "
                    "compress, export.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {cnnlab.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("cnnlab.cli")
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module in ("main",) or module.startswith("_"):
            continue
        mod = importlib.import_module(f"cnnlab.cli.{module}")
        if hasattr(mod, "register"):
            mod.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CnnlabError as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``cnnlab summary``: the per-layer table of one model (shapes, parameters, MACs, memory, receptive field)."""
from __future__ import annotations

import argparse

FORMATS = ("table", "csv", "json", "md")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_input(text: str | None, flag: str = "--input") -> tuple[int, int, int] | None:
    """'3x224x224' -> (3, 224, 224), one sample's CxHxW (the batch size is a separate option); None -> None."""
    from cnnlab._errors import CnnlabError

    if text is None:
        return None
    expected = "CxHxW, three positive integers (channels x height x width), e.g. 3x224x224 or 1x28x28"
    try:
        size = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise CnnlabError(f"{flag} must look like {expected}; got {text!r}") from None
    if len(size) != 3:  # '3x64' would reach the model as (1, 3, 64) and fail with a message about (B, C, H, W)
        raise CnnlabError(f"{flag} must look like {expected}; got {text!r} ({len(size)} number"
                          f"{'s' if len(size) != 1 else ''})")
    if min(size) < 1:
        raise CnnlabError(f"{flag} must look like {expected}; got {text!r} (every size must be >= 1)")
    return size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("summary", help="per-layer table: shapes, params, MACs, memory, receptive field",
                              description="Per-layer table of a registered model with totals and the counting conventions.")
    p.add_argument("name", help="registered model name (`cnnlab models`)")
    p.add_argument("--input", help="input size CxHxW (default: the model's default input)")
    p.add_argument("--depth", type=int, default=None, help="module levels to show (default: every leaf layer)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for the training-memory estimate")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype for bytes and the training-memory estimate")
    p.add_argument("--optimizer", default="adam", help="sgd, momentum, adam, adamw or rmsprop (optimizer states)")
    p.add_argument("--output", "-o", help="write to this file instead of printing")
    p.set_defaults(func=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    import torch

    from cnnlab._io import atomic_write_text
    from cnnlab.analysis import summary
    from cnnlab.cli._paths import make_parent, output_path

    output_path(args.output, "--output")
    s = summary(args.name, parse_input(args.input), depth=args.depth, batch_size=args.batch_size,
                dtype=getattr(torch, args.dtype), optimizer=args.optimizer)
    text = {"table": s.table, "csv": s.to_csv, "json": s.to_json, "md": s.to_markdown}[args.format]()
    if args.output:
        atomic_write_text(make_parent(args.output, "--output"), text + ("" if text.endswith("\n") else "\n"))
        print(f"wrote {args.output}")
    else:
        print(text.rstrip("\n"))
    return 0

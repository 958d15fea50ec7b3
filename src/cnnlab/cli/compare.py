"""``cnnlab compare``: several models side by side, with a MACs-vs-parameters plot."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="models side by side: params, MACs, memory, latency",
                              description="Compare models (params, MACs, activation memory; CPU latency with --bench) "
                                          "and plot MACs vs params (bubble = activation memory).")
    p.add_argument("names", nargs="+", metavar="NAME", help="registered model names")
    p.add_argument("--input", help="input size CxHxW for every model (default: each model's default input)")
    p.add_argument("--bench", action="store_true", help="measure forward latency on this machine (builds the models)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model with --bench (median reported)")
    p.add_argument("--plot", default="compare.png", help="where to write the PNG plot (default: compare.png; '' for none)")
    p.add_argument("--csv", help="also write the table as CSV to this file")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.analysis import compare
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.cli.summary import parse_input
    from cnnlab.models.registry import model_info

    for name in args.names:
        model_info(name)  # unknown names fail before any work
    output_path(args.plot, "--plot", figure=True)
    output_path(args.csv, "--csv", suffix=".csv")
    if args.bench and args.repeats < 1:
        raise CnnlabError(f"--repeats must be >= 1 (timed runs per model), got {args.repeats}")
    result = compare(args.names, parse_input(args.input), bench=args.bench, repeats=args.repeats)
    print(result.table())
    if args.plot:
        print(f"wrote {result.plot(make_parent(args.plot, '--plot'))}")
    if args.csv:
        result.to_csv(make_parent(args.csv, "--csv"))
        print(f"wrote {args.csv}")
    return 0

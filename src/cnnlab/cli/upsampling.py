"""``cnnlab upsampling``: transposed conv vs resize-then-conv (parameters, MACs, checkerboard), with a figure."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upsampling", help="transposed conv vs interpolation + conv: params, MACs, checkerboard",
        description="Compare a learned up-sampling (ConvTranspose2d, kernel 2f, stride f) with resize-then-conv "
                    "(bilinear or nearest, then a 3x3 conv) for the same channels: parameters, multiply-adds, and "
                    "the checkerboard strength of a random initialisation on a flat input (0 = flat).")
    p.add_argument("--channels", type=int, default=64, help="input and output channels (default 64)")
    p.add_argument("--factor", type=int, default=2, help="up-sampling factor (default 2)")
    p.add_argument("--size", type=int, default=32, help="input height and width for the MACs (default 32)")
    p.add_argument("--plot", default="upsampling.png", help="figure of the outputs ('' for none)")
    p.set_defaults(func=cmd_upsampling)


def cmd_upsampling(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.analysis.upsampling import compare_upsampling, format_rows, plot_checkerboard
    from cnnlab.cli._paths import make_parent, output_path

    if args.channels < 1 or args.size < 4:
        raise CnnlabError(f"--channels must be >= 1 and --size >= 4, got {args.channels} and {args.size}")
    output_path(args.plot, "--plot", figure=True)
    print(format_rows(compare_upsampling(args.channels, args.channels, args.factor, args.size), args.size))
    if args.plot:
        print(f"wrote {plot_checkerboard(make_parent(args.plot, '--plot'), args.factor)}")
    return 0

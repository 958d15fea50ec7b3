"""``cnnlab gradflow``: gradient norm per layer and dead ReLUs of a model at initialisation."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gradflow", help="gradient norm per layer and dead ReLUs (one batch)",
                              description="One forward/backward pass on a random batch (random labels, cross-entropy): "
                                          "weight-gradient norm per layer, fraction of dead ReLU units, and a PNG plot.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--input", help="input size CxHxW (default: the model's default input)")
    p.add_argument("--batch-size", type=int, default=8, help="images in the batch (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-mode", action="store_true", help="run in train mode (BN batch statistics, dropout)")
    p.add_argument("--plot", help="PNG path (default: gradflow_NAME.png; '' for none)")
    p.set_defaults(func=cmd_gradflow)


def cmd_gradflow(args: argparse.Namespace) -> int:
    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab.analysis import gradient_flow
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.cli.summary import parse_input
    from cnnlab.models.registry import create_model, model_info

    info = model_info(args.name)
    plot = f"gradflow_{args.name}.png" if args.plot is None else args.plot
    output_path(plot, "--plot", figure=True)
    size = parse_input(args.input) or info.default_input
    if args.batch_size < 1:
        raise CnnlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    torch.manual_seed(args.seed)
    model = create_model(args.name).train(args.train_mode)
    x = torch.randn(args.batch_size, *size)
    flow = gradient_flow(model, x, seed=args.seed)
    print(f"{args.name} at {'x'.join(map(str, size))}, batch {args.batch_size}, {'train' if args.train_mode else 'eval'} mode, "
          "random labels, cross-entropy")
    print(flow.table())
    if plot:
        print(f"wrote {flow.plot(make_parent(plot, '--plot'), title=f'{args.name}: gradient flow at initialisation')}")
    return 0

"""``cnnlab models`` and ``cnnlab info``: what the registry holds."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list registered models", description="List registered models.")
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--task", help="classification, detection or segmentation")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("info", help="details and architecture of one model",
                              description="Paper, defaults, parameter count, notes and the layer tree of one model.")
    p.add_argument("name")
    p.add_argument("--no-arch", action="store_true", help="omit the printed architecture")
    p.set_defaults(func=cmd_info)


def cmd_models(args: argparse.Namespace) -> int:
    from cnnlab import list_models, model_info
    from cnnlab._errors import CnnlabError, did_you_mean
    from cnnlab.cli._format import human, table

    if args.task:
        tasks = sorted({"classification", "detection", "segmentation"} | {model_info(n).task for n in list_models()})
        if args.task not in tasks:
            raise CnnlabError(f"unknown task {args.task!r}{did_you_mean(args.task, tasks)}; "
                              f"expected one of {', '.join(tasks)}")
    names = list_models(args.pattern, task=args.task)
    if not names:
        what = (f"matches {args.pattern!r}" if args.pattern else "is registered") + (
            f" for task {args.task!r}" if args.task else "")
        raise CnnlabError(f"no model {what}; `cnnlab models` lists them all (patterns are shell-style, e.g. 'resnet*')")
    rows = []
    for name in names:
        info = model_info(name)
        rows.append([name, info.family.name, human(info.num_params), "x".join(map(str, info.default_input)),
                     ", ".join(info.pretrained) or "-"])
    print(table(["name", "family", "params", "default input", "pretrained"], rows, align="llrll"))
    print(f"\n{len(names)} models")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from cnnlab import create_model, model_info

    info = model_info(args.name)
    print(f"{info.name}  ({info.family.name}, {info.task})")
    print(f"  paper:         {info.paper} ({info.year})" + (f"\n  url:           {info.family.url}" if info.family.url else ""))
    print(f"  default input: {'x'.join(map(str, info.default_input))}")
    print(f"  parameters:    {info.num_params:,}")
    print(f"  pretrained:    {', '.join(f'{k} ({v})' for k, v in info.pretrained.items()) or 'none'}")
    if info.notes:
        print(f"  notes:         {info.notes}")
    model = create_model(args.name)
    feature_info = getattr(model, "feature_info", [])
    if feature_info:
        print("  stages:        " + ", ".join(f"{f.module} ({f.channels} ch, /{f.stride})" for f in feature_info))
    if not args.no_arch:
        print("\narchitecture:")
        print(model)
    return 0

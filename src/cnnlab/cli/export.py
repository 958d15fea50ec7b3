"""``cnnlab export NAME_OR_RUN --format onnx|pt2 --out FILE``: one checked file for deployment."""
from __future__ import annotations

import argparse

FORMATS = ("onnx", "pt2")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a model or a trained run to ONNX or torch.export .pt2, checked against PyTorch",
        description="Export a run folder's reported checkpoint (at the run's input size, with its classes in the "
                    "file's metadata) or a registered model (random weights, or --weights FILE) to one self-contained "
                    ".onnx file (checked in ONNX Runtime) or a torch.export .pt2 program (checked by loading it back). "
                    "The batch is dynamic, and height/width too where the model allows. The input is the "
                    "normalised tensor the model takes (the run's normalisation is recorded, not included).")
    p.add_argument("source", metavar="NAME_OR_RUN", help="registered model name (`cnnlab models`) or run folder")
    p.add_argument("--format", choices=FORMATS, help="default: from the --out suffix (.onnx or .pt2)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--input-size", metavar="C,H,W", help="input size (default: the run's, else the model's default)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--checkpoint", choices=("best", "last"), help="of a run folder (default: the one it reported)")
    p.add_argument("--weights", metavar="FILE", help="with a model name: load these weights (any layout "
                                                     "cnnlab.load_weights recognises)")
    p.add_argument("--num-classes", type=int, metavar="N", help="with a model name: classes of the head")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--fixed-size", action="store_true", help="keep height and width fixed (only the batch dynamic)")
    p.add_argument("--fold-bn", action="store_true", help="fold each BatchNorm into the conv before it first")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.cli._paths import make_parent, output_path

    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise CnnlabError(f"--out {args.out}: cannot tell the format from the suffix; give --format onnx or pt2 "
                          "(or name the file .onnx or .pt2)")
    output_path(args.out, "--out", suffix=f".{fmt}")
    if Path(args.out).exists() and not args.force:
        raise CnnlabError(f"--out {args.out} already exists; add --force to replace it")
    if args.num_classes is not None and args.num_classes < 1:
        raise CnnlabError(f"--num-classes must be >= 1, got {args.num_classes}")
    model, input_size, metadata = _load(args)
    if args.fold_bn:
        from cnnlab.compress import fold_bn

        model = fold_bn(model, input_size=input_size, inplace=True)
        print(model.bn_fold)
    make_parent(args.out, "--out")
    from cnnlab.export import to_onnx, to_pt2

    options = dict(input_size=input_size, dynamic_size=False if args.fixed_size else None, overwrite=args.force,
                   metadata=metadata)
    if fmt == "onnx":
        result = to_onnx(model, args.out, opset=args.opset, **options)
    else:
        result = to_pt2(model, args.out, **options)
    print(result)
    return 0


def _load(args: argparse.Namespace):
    """(model in eval mode, (C, H, W), metadata for the file) from a run folder or a model name."""
    import json
    from pathlib import Path

    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab.cli.summary import parse_input

    size = parse_input(args.input_size, "--input-size")
    if Path(args.source).exists() or "/" in args.source:
        if args.weights or args.num_classes:
            raise CnnlabError("--weights and --num-classes are for a model name; a run folder has its own")
        from cnnlab.engine.runs import load_run

        run = load_run(args.source, args.checkpoint)
        if size is not None and size[0] != run.input_shape[0]:
            raise CnnlabError(f"--input-size {args.input_size}: the run's model takes {run.input_shape[0]} channels")
        metadata = {"cnnlab.model": run.config.model.name, "cnnlab.task": run.task, "cnnlab.checkpoint": run.tag,
                    "cnnlab.epoch": str(run.epoch), "cnnlab.classes": json.dumps(run.classes),
                    "cnnlab.input_shape": json.dumps(list(run.input_shape)),
                    "cnnlab.preprocess": json.dumps(run.preprocess, default=str)}
        print(f"{args.source}: {run.config.model.name}, {run.tag} checkpoint (epoch {run.epoch}), "
              f"{len(run.classes)} classes")
        return run.model.eval(), size or tuple(run.input_shape), metadata
    if args.checkpoint:
        raise CnnlabError("--checkpoint chooses a run folder's checkpoint; the source is a model name")
    from cnnlab.models import create_model, load_weights, model_info

    info = model_info(args.source)  # an unknown name suggests the closest
    torch.manual_seed(0)
    options = {"num_classes": args.num_classes} if args.num_classes else {}
    model = create_model(args.source, **options)
    if args.weights:
        if not Path(args.weights).is_file():
            raise CnnlabError(f"--weights {args.weights}: no such file")
        load_weights(model, args.weights)
    metadata = {"cnnlab.model": args.source, "cnnlab.task": info.task,
                "cnnlab.weights": args.weights or "random (seed 0)"}
    return model.eval(), size, metadata

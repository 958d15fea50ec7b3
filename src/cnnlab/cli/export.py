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
    p.add_argument("--int8", action="store_true",
                   help="post-training static int8 quantisation, calibrated on real inputs: onnx -> ONNX Runtime "
                        "quantize_static (QDQ), pt2 -> torchao PT2E (X86InductorQuantizer); checked by top-1 "
                        "agreement with fp32 (and accuracy on test images for a run) instead of the 1e-4 tolerance")
    p.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                   help="with --int8: batches of 32 calibration images (default 8)")
    p.add_argument("--calibration", metavar="random|FILE",
                   help="with --int8: calibration inputs; default for a run: its training images (normalised, not "
                        "augmented); for a model name required: a .pt/.npy tensor (N, C, H, W) of normalised inputs, "
                        "or `random` (standard-normal noise, labelled as such: ranges fit to noise, not to images)")
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
    source = Path(args.source)
    if source.is_dir() and source.resolve() in Path(args.out).resolve().parents:
        raise CnnlabError(f"--out {args.out} is inside the run folder {args.source}; write the export outside it "
                          "(cnnlab never modifies a run folder it reads)")
    if args.num_classes is not None and args.num_classes < 1:
        raise CnnlabError(f"--num-classes must be >= 1, got {args.num_classes}")
    if not args.int8 and (args.calibration or args.calibration_batches != 8):
        raise CnnlabError("--calibration and --calibration-batches go with --int8")
    if args.int8 and args.calibration_batches < 1:
        raise CnnlabError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
    model, input_size, metadata = _load(args)
    if args.fold_bn:
        from cnnlab.compress import fold_bn

        model = fold_bn(model, input_size=input_size, inplace=True)
        print(model.bn_fold)
    make_parent(args.out, "--out")
    from cnnlab.export import to_onnx, to_pt2

    if args.int8:
        return _export_int8(args, fmt, model, input_size, metadata)
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


CHECK_IMAGES = 512  # test images (of a run) or random inputs the int8 file is checked on


def _calibration(args: argparse.Namespace, input_size, metadata):
    """(calibration batches, check inputs, check labels or None, what the calibration data is)."""
    from pathlib import Path

    import numpy as np
    import torch

    from cnnlab._errors import CnnlabError

    is_run = "cnnlab.checkpoint" in metadata  # _load marks a run folder's metadata
    n, bs = args.calibration_batches, 32
    if args.calibration is None and is_run:
        from cnnlab.compress.quantize import _images, _take, run_data
        from cnnlab.engine.runs import load_run

        data = run_data(load_run(args.source, args.checkpoint))
        cal = list(_take(_images(data.train, bs, data), n))
        xs, ys = [], []
        for x, y in data.test:
            xs.append(x.float().cpu().contiguous())
            ys.append(y.cpu())
            if sum(len(t) for t in xs) >= CHECK_IMAGES:
                break
        return (cal, torch.cat(xs)[:CHECK_IMAGES], torch.cat(ys)[:CHECK_IMAGES],
                f"{sum(len(b) for b in cal)} training images of the run (not augmented)")
    if args.calibration is None:
        raise CnnlabError("--int8 with a model name needs calibration inputs: give --calibration FILE (.pt or .npy "
                          "tensor (N, C, H, W), normalised as the model's input) or --calibration random (noise: "
                          "the file is then only a smoke test, its ranges do not fit real images)")
    g = torch.Generator().manual_seed(0)
    check = torch.randn(64, *input_size, generator=g)
    if args.calibration == "random":
        cal = [torch.randn(bs, *input_size, generator=g) for _ in range(n)]
        return cal, check, None, f"{n * bs} standard-normal RANDOM inputs (not images)"
    path = Path(args.calibration)
    if not path.is_file():
        raise CnnlabError(f"--calibration {path}: no such file; expected a .pt or .npy tensor (N, C, H, W) or `random`")
    try:
        t = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say what was expected
        raise CnnlabError(f"--calibration {path}: cannot read it ({type(e).__name__}); expected a .pt or .npy tensor "
                          "(N, C, H, W)") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise CnnlabError(f"--calibration {path}: holds {what}; expected a tensor (N, C, H, W) = (N, {input_size[0]}, "
                          f"{input_size[1]}, {input_size[2]})")
    from cnnlab.compress.quantize import _check_shape

    _check_shape([t], [None, *input_size], f"--calibration {path}")  # the size the file is exported at
    t = t.float()
    cal = [t[i:i + bs] for i in range(0, min(len(t), n * bs), bs)]
    return cal, t[:CHECK_IMAGES], None, f"{sum(len(b) for b in cal)} inputs from {path}"


def _export_int8(args: argparse.Namespace, fmt: str, model, input_size, metadata) -> int:
    import os
    import tempfile
    from pathlib import Path

    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab.compress.quantize import _as_batches, _check_shape, quantize_onnx, quantize_pt2e, save_pt2e

    if input_size is None:  # a model name without --input-size: its registered input
        from cnnlab.models import model_info

        input_size = tuple(model_info(args.source).default_input)
    cal, check_x, check_y, what = _calibration(args, input_size, metadata)
    print(f"calibration: {what}")
    metadata = {**metadata, "cnnlab.int8": "post-training static", "cnnlab.calibration": what}
    out = Path(args.out)
    with torch.no_grad():
        ref = model(check_x)
    if fmt == "onnx":
        from cnnlab.export import to_onnx
        from cnnlab.export.onnx import run_onnx

        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            exported = to_onnx(model, fp32, input_size=input_size, opset=args.opset, metadata=metadata,
                               dynamic_size=False if args.fixed_size else None)
            print(f"fp32 export checked: max |difference| {exported.max_abs_diff:.2e}")
            tmp_int8 = Path(tmp) / out.name
            result = quantize_onnx(fp32, tmp_int8, cal)
            got = run_onnx(tmp_int8, check_x)[0]
            _report_check(ref, got, check_y, len(check_x))
            result.path = out
            os.replace(tmp_int8, out)  # only a file that passed the check
        print(result)
        return 0
    batches = _as_batches(cal)
    _check_shape(batches, [None, *(input_size or batches[0].shape[1:])])
    q = quantize_pt2e(model, batches, lower=False)
    with torch.no_grad():
        got = q(check_x)
    _report_check(ref, got, check_y, len(check_x), "PT2E QDQ (unlowered)")
    try:
        save_pt2e(q, out, batches[0], overwrite=args.force, metadata=metadata)
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export can refuse a graph; say why
        raise CnnlabError(f"torch.export.save could not save the int8 program: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    print(f"{out}: int8 torch.export program (PT2E QDQ, X86InductorQuantizer), {out.stat().st_size / 1e6:.3f} MB; "
          "load with torch.export.load(...).module() and torch.compile it with torch._inductor.config.freezing=True "
          "to run int8 kernels")
    return 0


def _report_check(ref, got, labels, n, name="ONNX Runtime int8") -> None:
    """Print top-1 agreement with fp32 (and accuracies when labels are known); refuse a file that disagrees."""
    from cnnlab._errors import CnnlabError

    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    line = f"{name} vs fp32 on {n} {'test images' if labels is not None else 'inputs'}: top-1 agreement {agree:.4f}"
    if labels is not None:
        line += (f", accuracy fp32 {float((ref.argmax(1) == labels).float().mean()):.4f} "
                 f"int8 {float((got.argmax(1) == labels).float().mean()):.4f}")
    line += f", max |logit difference| {float((got - ref).abs().max()):.3g}"
    print(line)
    if agree < 0.5:
        raise CnnlabError(f"{name} agrees with fp32 on only {agree:.1%} of top-1 predictions; the int8 file is not "
                          "written (calibration data unlike the inputs?)")

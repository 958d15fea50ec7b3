"""``cnnlab segment RUN IMAGE...``: a coloured mask and an overlay per image, and the share of each class's pixels."""
from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli._args import finite_float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment", help="segment image files with a trained segmentation run",
        description="Run a segmentation run's reported model on image files: for each, OUT/<name>_mask.png (a "
                    "palette PNG: its pixel values are the class labels, shown in the VOC colours) and "
                    "OUT/<name>_overlay.png (the classes painted over the image), and print the share of the "
                    "image's pixels in each class. Images are resized to the run's input size and normalised as "
                    "in training; the predicted logits are resized back to each image's own size.")
    p.add_argument("run", help="segmentation run folder (runs/<name>)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default="segments", metavar="DIR", help="folder for the masks and overlays "
                                                                     "(default: segments)")
    p.add_argument("--checkpoint", choices=("best", "last"), help="default: the one the run reported")
    p.add_argument("--native-size", action="store_true",
                   help="feed each image at its own size instead of the run's input size (fully convolutional "
                        "models; the size must suit the model)")
    p.add_argument("--alpha", type=finite_float, default=0.55, help="opacity of the classes in the overlay "
                                                                    "(default 0.55)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_segment)


def _check_out(out: str) -> Path:
    from cnnlab._errors import CnnlabError

    path = Path(out)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise CnnlabError(f"--out {out}: {folder} is a file; expected a folder for the masks and overlays")
    return path


def output_stems(paths: list[str]) -> list[str]:
    """One stem per image (``a.jpg`` -> ``a``); a stem seen before gets ``-2``, ``-3`` ... (a.jpg and x/a.png)."""
    stems, seen = [], set()
    for p in paths:
        base, n = Path(p).stem or "image", 1
        stem = base
        while stem in seen:
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem)
        stems.append(stem)
    return stems


def segment_image(model, image, size, preprocess, device):
    """uint8 (C, h, w) model input (the image file read as the run's images were) -> int64 (H, W) labels at
    ``size``: normalised as the run was, logits resized back bilinearly to ``size``, argmax."""
    import torch
    import torch.nn.functional as F

    from cnnlab.engine.tasks.segmentation import split_output

    x = image.float()[None] / 255
    if preprocess is not None:
        x = preprocess(x)
    with torch.no_grad():
        logits = split_output(model(x.to(device)))[0].float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu()


def cmd_segment(args: argparse.Namespace) -> int:
    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab.data.folder import read_image
    from cnnlab.engine.data_setup import preprocess_from_state
    from cnnlab.engine.runs import load_run
    from cnnlab.engine.tasks.segmentation import overlay, share_text
    from cnnlab.engine.trainer import resolve_device

    if not 0 <= args.alpha <= 1:
        raise CnnlabError(f"--alpha must be in [0, 1] (the classes' opacity in the overlay), got {args.alpha}")
    out = _check_out(args.out)
    images = [read_image(path, 3, None) for path in args.images]  # every file is read before anything is written
    stems = output_stems(args.images)
    names = [(f"{s}_mask.png", f"{s}_overlay.png") for s in stems]
    given = {Path(p).resolve() for p in args.images}
    clashes = [n for pair in names for n in pair if (out / n).resolve() in given]
    if clashes:
        raise CnnlabError(f"--out {args.out} would overwrite the input {clashes[0]}; choose another --out folder")
    run = load_run(args.run, args.checkpoint)
    if run.task != "segmentation":
        raise CnnlabError(f"{args.run} is a {run.task} run; cnnlab segment needs a segmentation run "
                          f"(`cnnlab models --task segmentation`)"
                          + ("; use cnnlab detect" if run.task == "detection" else "; use cnnlab predict"))
    channels, height, width = run.input_shape
    # the model's input: the run's channels (PIL's conversion, as training read them) at the run's size
    inputs = [read_image(path, channels, None if args.native_size else (height, width)) for path in args.images]
    preprocess = preprocess_from_state(run.preprocess)
    device = resolve_device(args.device)
    model = run.model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.run} ({run.tag} checkpoint, epoch {run.epoch}), classes: {', '.join(run.classes)}")
    for path, image, x, (mask_name, overlay_name) in zip(args.images, images, inputs, names):
        labels = segment_image(model, x, image.shape[1:], preprocess, device)
        _save_mask(labels, out / mask_name)
        _save_rgb(overlay(image, labels, alpha=args.alpha), out / overlay_name)
        fractions = torch.bincount(labels.flatten(), minlength=len(run.classes)).double() / labels.numel()
        shares = ", ".join(f"{run.classes[c] if c < len(run.classes) else c} {share_text(fractions[c])}"
                           for c in fractions.argsort(descending=True).tolist() if fractions[c] > 0)
        print(f"{path} ({image.shape[2]}x{image.shape[1]}): {shares} -> {out / mask_name}, {out / overlay_name}")
    return 0


def _save_mask(labels, path: Path) -> None:
    """A palette ('P') PNG: pixel values are the labels (as VOC's SegmentationClass), colours the VOC palette."""
    import torch
    from PIL import Image

    from cnnlab._io import atomic_write
    from cnnlab.engine.tasks.segmentation import PALETTE

    image = Image.fromarray(labels.clamp(0, 255).to(torch.uint8).numpy())  # "L", made "P" by putpalette
    image.putpalette([v for colour in PALETTE for v in colour])
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _save_rgb(image, path: Path) -> None:
    from PIL import Image

    from cnnlab._io import atomic_write

    array = image.permute(1, 2, 0).contiguous().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))

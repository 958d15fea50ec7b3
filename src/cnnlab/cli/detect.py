"""``cnnlab detect RUN_OR_WEIGHTS IMAGE...``: boxes drawn on each image and a JSON of every image's detections."""
from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli._args import finite_float

JSON_NAME = "detections.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detect", help="detect objects in image files with a trained detection run",
        description="Run a detector on image files at their own sizes: writes each image with its boxes drawn "
                    f"(OUT/<name>.png) and the boxes of all of them ({JSON_NAME}: label, score, x1 y1 x2 y2 in the "
                    "image's pixels). SOURCE is a detection run folder, one of its checkpoints "
                    "(RUN/best.safetensors), or a weights file with --model and --classes.")
    p.add_argument("source", metavar="RUN_OR_WEIGHTS", help="run folder, RUN/<tag>.safetensors, or a weights file")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default="detections", metavar="DIR", help="folder for the drawn images and the JSON "
                                                                         "(default: detections)")
    p.add_argument("--score-thresh", type=finite_float, default=0.5, metavar="S",
                   help="keep detections scored >= S (default 0.5); the model's own box_score_thresh still applies")
    p.add_argument("--checkpoint", choices=("best", "last"), help="of a run folder (default: the one it reported)")
    p.add_argument("--model", help="with a weights file: the registered detection model it belongs to")
    p.add_argument("--classes", help="with a weights file: the class names of labels 1..K, comma-separated")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="detect on overlapping PX x PX windows of each image, merged (for images larger than the "
                        "model's input: aerial scenes); default: the run's data.eval_tile, else whole images; 0: off")
    p.add_argument("--tile-overlap", type=finite_float, default=None, metavar="F",
                   help="share of a window its neighbours overlap, in [0, 1) (default: the run's, else 0.25); make "
                        "F x PX at least the largest object's side")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_detect)


def _check_out(out: str) -> Path:
    from cnnlab._errors import CnnlabError

    path = Path(out)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise CnnlabError(f"--out {out}: {folder} is a file; expected a folder for the drawn images and {JSON_NAME}")
    return path


def load_detector(args: argparse.Namespace):
    """(model in eval mode, classes, description) from a run folder, a run's checkpoint file, or weights + --model."""
    from cnnlab._errors import CnnlabError
    from cnnlab.engine.runs import load_run

    source = Path(args.source)
    if source.is_dir() or (source.is_file() and (source.parent / f"{source.stem}.json").is_file()
                           and (source.parent / "config.json").is_file()):
        if args.model or args.classes:
            raise CnnlabError("--model and --classes are for a bare weights file; a run folder records both")
        tag = args.checkpoint
        if source.is_file():
            if args.checkpoint and args.checkpoint != source.stem:
                raise CnnlabError(f"{args.source} is the {source.stem!r} checkpoint but --checkpoint says "
                                  f"{args.checkpoint!r}; give one of them")
            tag, source = source.stem, source.parent
        run = load_run(source, tag)
        if run.task != "detection":
            raise CnnlabError(f"{args.source} is a {run.task} run; cnnlab detect needs a detection run "
                              f"(`cnnlab models --task detection`); use cnnlab predict for {run.task}")
        return run.model, run.classes, {"run": str(source), "checkpoint": run.tag, "epoch": run.epoch,
                                        "model": run.config.model.name, "eval_tile": run.config.data.eval_tile,
                                        "eval_tile_overlap": run.config.data.eval_tile_overlap}
    if not source.exists():
        raise CnnlabError(f"{args.source} does not exist; expected a detection run folder, one of its checkpoints "
                          "(RUN/best.safetensors) or a weights file with --model and --classes")
    if not args.model or not args.classes:
        raise CnnlabError(f"{args.source} is a weights file outside a run folder: give --model NAME (a detection "
                          "model) and --classes a,b,c (the names of labels 1..K)")
    from cnnlab.engine.tasks.detection import DetectionTask
    from cnnlab.models import create_model, load_weights, model_info

    info = model_info(args.model)
    if info.task != "detection":
        raise CnnlabError(f"--model {args.model} is a {info.task} model; cnnlab detect needs a detection model "
                          "(`cnnlab models --task detection`)")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise CnnlabError(f"--classes {args.classes!r} names no class; expected names of labels 1..K, e.g. cat,dog")
    model = create_model(args.model, **DetectionTask.model_kwargs(len(classes), info.default_input))
    load_weights(model, str(source))
    return model.eval(), classes, {"weights": str(source), "model": args.model}


def cmd_detect(args: argparse.Namespace) -> int:
    import time

    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab._io import atomic_write_text, dumps_json
    from cnnlab._tiles import check_tiling
    from cnnlab.data.folder import read_image
    from cnnlab.detection.tiling import predict_tiled
    from cnnlab.engine.tasks.detection import draw_detections
    from cnnlab.engine.trainer import resolve_device

    if not 0 <= args.score_thresh <= 1:
        raise CnnlabError(f"--score-thresh must be in [0, 1] (a detection score), got {args.score_thresh}")
    out = _check_out(args.out)
    images = [read_image(path, 3, None) for path in args.images]  # every file is read before anything is written
    names = _output_names(args.images)
    clashes = [p for p, n in zip(args.images, names) if (out / n).resolve() == Path(p).resolve()]
    if clashes:
        raise CnnlabError(f"--out {args.out} would overwrite the input {clashes[0]}; choose another --out folder")
    flags = ("--tile", "--tile-overlap")  # given flags are checked before any work
    if args.tile is not None and args.tile < 0:
        raise CnnlabError(f"--tile must be >= 0 pixels (0: whole images), got {args.tile}")
    if args.tile or args.tile_overlap is not None:
        check_tiling(args.tile or 1, 0.25 if args.tile_overlap is None else args.tile_overlap, flags)
    model, classes, where = load_detector(args)
    run_tile, run_overlap = where.pop("eval_tile", 0), where.pop("eval_tile_overlap", 0.25)
    tile = run_tile if args.tile is None else args.tile
    overlap = run_overlap if args.tile_overlap is None else args.tile_overlap
    if tile:
        where.update(tile=tile, tile_overlap=overlap)
    device = resolve_device(args.device)
    model = model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, name, image in zip(args.images, names, images):
        t0 = time.perf_counter()
        with torch.no_grad():
            x = image.to(device).float() / 255
            found_raw = predict_tiled(model, x, tile, overlap) if tile else model([x])[0]
            prediction = {k: v.cpu() for k, v in found_raw.items()}
        seconds = time.perf_counter() - t0
        keep = prediction["scores"] >= args.score_thresh
        kept = {k: v[keep] for k, v in prediction.items()}
        drawn = draw_detections(image, kept, classes, score_thresh=args.score_thresh)
        _save_png(drawn, out / name)
        found = [{"label": classes[c - 1] if 1 <= c <= len(classes) else str(c), "label_id": c, "score": s,
                  "box": [round(v, 2) for v in b]}
                 for b, c, s in zip(kept["boxes"].tolist(), kept["labels"].tolist(), kept["scores"].tolist())]
        records.append({"file": str(path), "drawn": str(out / name), "height": int(image.shape[1]),
                        "width": int(image.shape[2]), "seconds": round(seconds, 4), "detections": found})
        summary = ", ".join(f"{d['label']} {d['score']:.2f}" for d in found[:5]) + (" ..." if len(found) > 5 else "")
        print(f"{path}: {len(found)} object{'s' if len(found) != 1 else ''}" + (f" ({summary})" if found else "")
              + f" -> {out / name}")
    report = {**where, "classes": classes, "score_thresh": args.score_thresh, "box_format": "x1 y1 x2 y2, pixels",
              "images": records}
    atomic_write_text(out / JSON_NAME, dumps_json(report, indent=2))
    print(f"boxes: {out / JSON_NAME}")
    return 0


def _output_names(paths: list[str]) -> list[str]:
    """``<stem>.png`` per image; a stem seen before gets ``-2``, ``-3`` ... (a.jpg and x/a.png both become a*)."""
    names, seen = [], set()
    for p in paths:
        stem, n = Path(p).stem or "image", 1
        name = f"{stem}.png"
        while name in seen:
            n += 1
            name = f"{stem}-{n}.png"
        seen.add(name)
        names.append(name)
    return names


def _save_png(image, path: Path) -> None:
    from PIL import Image

    from cnnlab._io import atomic_write

    array = image.permute(1, 2, 0).contiguous().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))

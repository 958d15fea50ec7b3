"""``cnnlab explain``: what a trained network looks at in one image (Grad-CAM or gradient saliency)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="Grad-CAM or saliency map of a trained run for one image",
                              description="Print the top-k prediction of a run (or a registered model, random weights) "
                                          "for one image and write a PNG: the image, the heatmap of what drove the "
                                          "target class's score, and the overlay.")
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>), or a registered model name")
    p.add_argument("image", metavar="IMAGE", help="image file or sample:china / sample:flower")
    p.add_argument("--method", default="gradcam", choices=("gradcam", "saliency"),
                   help="gradcam (Selvaraju et al. 2017, default) or saliency (Simonyan et al. 2014)")
    p.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    p.add_argument("--layer", help="Grad-CAM layer, a module name (default: the last stage in feature_info)")
    p.add_argument("--top", type=int, default=3, help="classes printed (default 3)")
    p.add_argument("--size", help="resize the image to H or HxW (default: the run's input size)")
    p.add_argument("--checkpoint", choices=("best", "last"))
    p.add_argument("--out", default="explain.png", help="PNG path (default: explain.png)")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.cli._viz import load_target, parse_size
    from cnnlab.data.samples import image_label, load_image_or_sample
    from cnnlab.viz.cam import explain, plot_explanation, resolve_target

    if args.top < 1:
        raise CnnlabError(f"--top must be >= 1, got {args.top}")
    output_path(args.out, "--out", figure=True)
    if args.layer and args.method != "gradcam":
        raise CnnlabError("--layer applies to --method gradcam only (saliency is taken w.r.t. the input pixels)")
    target = load_target(args.run, parse_size(args.size), args.checkpoint)
    num_classes = getattr(target.model, "num_classes", 0) or len(target.classes or [])
    index = resolve_target(args.target, target.classes, num_classes)
    channels, height, width = target.input_shape
    image = load_image_or_sample(args.image, channels, (height, width))
    result = explain(target.model, image, args.method, index, args.layer, target.preprocess)
    names = target.classes or [str(i) for i in range(len(result.probs))]
    top = result.probs.topk(min(args.top, len(result.probs)))
    print(f"{target.label} on {args.image} ({channels}x{height}x{width}):")
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"  {rank}. {names[i]} ({p:.1%})")
    row, col = result.peak()
    where = f" at layer {result.layer} (map {result.raw.shape[0]}x{result.raw.shape[1]})" if result.layer else ""
    print(f"{result.method} for class {names[result.target]} (index {result.target}){where}; "
          f"peak at row {row}, column {col} of {height}x{width}")
    title = f"{target.label}: {image_label(args.image)}"
    print(f"wrote {plot_explanation(make_parent(args.out, '--out'), image, result, names, title)}")
    return 0

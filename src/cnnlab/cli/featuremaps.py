"""``cnnlab featuremaps``: a model's (or a trained run's) feature maps at chosen stages for one image."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("featuremaps", help="feature maps of a model or run at chosen stages for one image",
                              description="Run one image through a registered model (random weights) or a trained run "
                                          "folder and plot the most active channels (largest mean activation) of each "
                                          "stage listed in the model's feature_info.")
    p.add_argument("model", metavar="MODEL_OR_RUN", help="registered model name or run folder (runs/<name>)")
    p.add_argument("image", metavar="IMAGE", help="image file or sample:china / sample:flower")
    p.add_argument("--stages", help="comma-separated stage indices or module names (default: all)")
    p.add_argument("--top", type=int, default=8, help="channels shown per stage (default 8)")
    p.add_argument("--size", help="resize the image to H or HxW (default: the run's input size / the model's default)")
    p.add_argument("--checkpoint", choices=("best", "last"))
    p.add_argument("--out", default="featuremaps.png", help="PNG path (default: featuremaps.png)")
    p.set_defaults(func=cmd_featuremaps)


def cmd_featuremaps(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.cli._viz import load_target, parse_size
    from cnnlab.data.samples import image_label, load_image_or_sample
    from cnnlab.viz.feature_maps import plot_feature_maps, stage_feature_maps

    if args.top < 1:
        raise CnnlabError(f"--top must be >= 1, got {args.top}")
    output_path(args.out, "--out", figure=True)
    target = load_target(args.model, parse_size(args.size), args.checkpoint)
    channels, height, width = target.input_shape
    image = load_image_or_sample(args.image, channels, (height, width))  # converted to the model's channels
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    maps = stage_feature_maps(target.model, image, stages, target.preprocess)
    print(f"{target.label} on {args.image} at {channels}x{height}x{width}")
    for s in maps:
        channels_, means = s.top_channels(args.top)
        c, h, w = s.maps.shape
        active = (s.maps > 0).float().mean().item()
        print(f"  stage {s.index} {s.module:<16} {c}x{h}x{w} (/{s.stride})  {active:.0%} positive;  top channels "
              + ", ".join(f"{ch} ({m:.2g})" for ch, m in zip(channels_, means)))
    title = f"{target.label}: {image_label(args.image)}, top {args.top} channels by mean activation"
    print(f"wrote {plot_feature_maps(make_parent(args.out, '--out'), image, maps, args.top, title)}")
    return 0

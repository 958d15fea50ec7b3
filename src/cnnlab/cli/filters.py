"""``cnnlab filters``: the notes' two 7x7 line filters applied to images, or a model's learned first-layer filters."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("filters", help="line filters on images (the notes' example), or learned first-layer filters",
                              description="Apply the notes' vertical-line and horizontal-line 7x7 filters (stride 1, "
                                          "'same' padding) to images and plot each feature map; with --learned, plot "
                                          "the first conv layer's kernels of a run folder or a registered model instead.")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files or sample:china / sample:flower (default: both sample photos)")
    p.add_argument("--size", type=int, default=7, help="filter size (default 7, as in the notes)")
    p.add_argument("--learned", metavar="MODEL_OR_RUN", help="plot this model's first-layer filters instead")
    p.add_argument("--out", default="filters.png", help="PNG path (default: filters.png)")
    p.set_defaults(func=cmd_filters)


def cmd_filters(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.data.samples import SAMPLE_NAMES, SAMPLE_PREFIX, image_label, load_image_or_sample
    from cnnlab.viz.filters import LINE_FILTER_NAMES, apply_filters, first_conv, line_filters, plot_filter_responses

    output_path(args.out, "--out", figure=True)
    if args.learned:
        from cnnlab.cli._viz import load_target
        from cnnlab.viz.filters import plot_first_layer_filters

        if args.images:
            raise CnnlabError("--learned plots a model's own filters and takes no IMAGE arguments")
        target = load_target(args.learned)
        name, conv = first_conv(target.model)
        print(f"{target.label}: first conv layer {name}, {conv.out_channels} filters of "
              f"{conv.in_channels}x{conv.kernel_size[0]}x{conv.kernel_size[1]}")
        print(f"wrote {plot_first_layer_filters(make_parent(args.out, '--out'), target.model, target.label)}")
        return 0
    if args.size < 1:
        raise CnnlabError(f"--size must be >= 1, got {args.size}")
    specs = args.images or [SAMPLE_PREFIX + n for n in SAMPLE_NAMES]
    images = [load_image_or_sample(s, 3) for s in specs]
    filters = line_filters(args.size, channels=3)
    maps = [apply_filters(image, filters)[0] for image in images]  # images may differ in size: one at a time
    for spec, image, m in zip(specs, images, maps):
        stats = "   ".join(f"{n}: mean {v.mean():.3f}, max {v.max():.3f}" for n, v in zip(LINE_FILTER_NAMES, m))
        print(f"{spec} ({image.shape[1]}x{image.shape[2]}): {stats}")
    print(f"wrote {plot_filter_responses(make_parent(args.out, '--out'), images, maps, [image_label(s) for s in specs], filters=filters)}")
    return 0

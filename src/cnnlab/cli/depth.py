"""``cnnlab depth-study``: train plain and residual nets of several depths with one recipe (He et al. 2016, Fig. 6)."""
from __future__ import annotations

import argparse

from cnnlab.cli._args import finite_float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "depth-study", help="plain vs residual nets of several depths, trained with one recipe",
        description="He et al. 2016's degradation experiment on a small bundled dataset: the deeper plain net reaches a "
                    "higher TRAINING error than the shallower one, the residual nets do not. Trains plain and residual "
                    "6n+2-layer CIFAR-style nets with the same optimiser, schedule, batches, seed and init; prints final "
                    "training loss/error and test error per net and writes a PNG of the training curves. Each net is "
                    "trained by the engine (as `cnnlab train`), in a run folder of its own (--out-dir keeps them).")
    p.add_argument("--depths", type=int, nargs="+", help="weight layers, 6n+2 each (default: the documented setting)")
    p.add_argument("--data", help="mnist_5k, fashion_mnist or digits (default: the documented setting)")
    p.add_argument("--epochs", type=int, help="epochs per net (default: the documented setting)")
    p.add_argument("--quick", action="store_true", help="the small setting the tests use (about half a minute)")
    p.add_argument("--lr", type=finite_float, help="peak SGD learning rate (default 0.1, as He et al.)")
    p.add_argument("--width", type=int, help="channels of the first stage (He et al.: 16)")
    p.add_argument("--batch-size", type=int, help="images per step (default 128)")
    p.add_argument("--train-size", type=int, help="train on this many images of the training split")
    p.add_argument("--image-size", type=int, help="resize images to this side first")
    p.add_argument("--seed", type=int, help="weights and batch-order seed (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--plot", help="PNG path (default: depth_study.png; '' for none)")
    p.add_argument("--json", help="also write the per-epoch numbers to this JSON file")
    p.add_argument("--out-dir", help="keep each net's engine run folder (metrics.csv, checkpoints, report.html) in "
                                      "OUT_DIR/plain-8, OUT_DIR/resnet-8, ... (default: a temporary folder, removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_depth_study)


def cmd_depth_study(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cnnlab._io import atomic_write_text, dumps_json
    from cnnlab.analysis.depth import DOCUMENTED, QUICK, depth_study
    from cnnlab.cli._paths import make_parent, output_path

    output_path(args.json, "--json", suffix=".json")
    output_path("depth_study.png" if args.plot is None else args.plot, "--plot", figure=True)
    setting = QUICK if args.quick else DOCUMENTED
    recipe = setting.recipe
    for name in ("lr", "width", "batch_size", "train_size", "image_size", "seed"):
        if getattr(args, name) is not None:
            recipe = replace(recipe, **{name: getattr(args, name)})
    depths = tuple(args.depths) if args.depths else setting.depths
    data = args.data or setting.data
    epochs = args.epochs if args.epochs is not None else setting.epochs
    study = depth_study(depths, data, epochs, recipe, threads=args.threads, quiet=args.quiet,
                        out_dir=args.out_dir or None)
    r = study.recipe
    print(f"{data} ({r.train_size or 'all'} training images at {'x'.join(map(str, study.input_shape))}), {epochs} epochs, "
          f"SGD lr {r.lr} momentum {r.momentum} wd {r.weight_decay}, cosine, batch {r.batch_size}, "
          f"width {r.width}, seed {r.seed}")
    print(study.table())
    if args.json:
        print(f"wrote {atomic_write_text(make_parent(args.json, '--json'), dumps_json(study.to_dict(), indent=1))}")
    plot = "depth_study.png" if args.plot is None else args.plot
    if plot:
        print(f"wrote {study.plot(make_parent(plot, '--plot'))}")
    if args.out_dir:
        print(f"run folders: {', '.join(r.run_dir for r in study.runs)}")
    return 0

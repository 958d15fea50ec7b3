"""``cnnlab check``: initial loss, overfitting a small sample and a learning-rate range test, before any search."""
from __future__ import annotations

import argparse
import shlex

from cnnlab.cli._args import finite_float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="sanity checks before a search: initial loss, overfit a sample, learning-rate range test",
        description="Three checks for any model and task, in about a minute on a CPU: (1) the loss at "
                    "initialisation against the expected value (ln K for K classes) and that a few steps lower it; "
                    "(2) overfitting 2 batches of 32 images (no augmentation, no weight decay): the loss must go "
                    "near zero; (3) a learning-rate range test (Smith 2015) whose suggested rate is printed as a "
                    "`cnnlab train ... --set optim.lr=...` line and marked on a plot. Each check prints PASS, "
                    "WARN or FAIL with its numbers; the exit code is 1 if one FAILs.")
    p.add_argument("--model", help="registered model name (cnnlab models)")
    p.add_argument("--data", help="dataset name or image folder")
    p.add_argument("--batch-size", type=int, help="batch size of the range test (that of your training run)")
    p.add_argument("--lr", type=finite_float, help="the rate of checks 1 and 2 (default optim.lr)")
    p.add_argument("--weights", help="initial weights: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config fields as in cnnlab train (repeatable); augmentation and weight decay are off here")
    p.add_argument("--config", help="a config.json to start from")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--overfit-steps", type=int, default=200, help="the most steps of check 2 (default 200)")
    p.add_argument("--sample-size", type=int, default=32, help="images per batch of the overfitted sample (default 32)")
    p.add_argument("--lr-min", type=finite_float, default=1e-6, help="start of the range test (default 1e-6)")
    p.add_argument("--lr-max", type=finite_float, default=10.0, help="end of the range test (default 10)")
    p.add_argument("--lr-steps", type=int, default=100, help="steps of the range test (default 100)")
    p.add_argument("--plot", help="the range test's PNG (default OUT_DIR/check-MODEL-DATA.png)")
    p.add_argument("--out-dir", help="folder of the default plot (default: runs)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=cmd_check, resume=None, time_budget=None, name=None, epochs=None, quiet=False)


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnlab.cli.train import config_from_args
    from cnnlab.engine.check import check

    config = config_from_args(args)
    plot = None if args.no_plot else (args.plot or Path(config.out_dir) / f"check-{config.model.name}-"
                                      f"{Path(config.data.name).name}.png")
    print(f"cnnlab check: {config.model.name} on {config.data.name} ({config.optim.optimizer}, lr "
          f"{config.optim.lr:g}, batch {config.data.batch_size}; no augmentation, no weight decay)")
    result = check(config, overfit_steps=args.overfit_steps, sample_size=args.sample_size, lr_min=args.lr_min,
                   lr_max=args.lr_max, lr_steps=args.lr_steps, plot_path=plot)
    if result.suggested_lr is not None:
        # the user's own options, with the rate replaced: train exactly what was checked
        kept = [o for o in args.overrides if not o.replace(" ", "").startswith(("optim.lr=", "lr="))]
        named = [f"--{flag.replace('_', '-')} {shlex.quote(str(getattr(args, flag)))}"
                 for flag in ("model", "data", "batch_size", "weights", "config", "device") if getattr(args, flag)]
        line = " ".join(["cnnlab train", *named, *(f"--set {shlex.quote(o)}" for o in kept),
                         f"--set optim.lr={result.suggested_lr:.3g}"])
        print(f"suggested learning rate {result.suggested_lr:.3g}; train with:\n  {line}")
    if result.plot_path is not None:
        print(f"range test plot: {result.plot_path}")
    failed = [s.name for s in result.steps if s.verdict == "FAIL"]
    print(f"{'FAIL: ' + ', '.join(failed) if failed else 'all checks passed'} ({result.seconds:.0f} s)")
    return 1 if failed else 0

"""``cnnlab train``: one training run from a typed config, overridable field by field."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a dataset",
        description="Train a registered model on a named dataset or an image folder. Every config field can be "
                    "set with --set section.key=value (sections: model, data, optim; top-level keys: epochs, seed, "
                    "device, amp, patience, ...). `--set help` lists them.")
    p.add_argument("--model", help="registered model name (cnnlab models)")
    p.add_argument("--data", help="fashion_mnist, mnist, cifar10, cifar100, digits, mnist_5k, or an image folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weights", help="initial weights: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.lr=0.1 data.flip=true (repeatable)")
    p.add_argument("--config", help="a config.json to start from (e.g. from another run folder)")
    p.add_argument("--name", help="run folder name (default: model-data-date)")
    p.add_argument("--out-dir", help="parent of the run folder (default: runs)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace):
    """Build the TrainConfig: defaults < --config file < named options < --set overrides."""
    import json
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.engine.config import TrainConfig, apply_overrides

    if "help" in args.overrides:
        print("config keys and their defaults (set with --set key=value):\n" + TrainConfig().describe())
        raise SystemExit(0)
    if args.resume:
        path = Path(args.resume) / "config.json"
        if not path.is_file():
            raise CnnlabError(f"--resume {args.resume}: no config.json there (is it a run folder?)")
        config = TrainConfig.from_dict(json.loads(path.read_text()))
        run = Path(args.resume)
        config.out_dir, config.name = str(run.parent), run.name
    elif args.config:
        try:
            config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CnnlabError(f"--config {args.config}: {e}") from None
        config.name = ""
    else:
        config = TrainConfig()
    named = {"model.name": args.model, "data.name": args.data, "epochs": args.epochs, "data.batch_size": args.batch_size,
             "optim.lr": args.lr, "model.weights": args.weights, "name": args.name, "out_dir": args.out_dir,
             "device": args.device}
    overrides = [f"{k}={v}" for k, v in named.items() if v is not None] + list(args.overrides)
    if args.quiet:
        overrides.append("quiet=true")
    return apply_overrides(config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab.engine import train
    from cnnlab.engine.distributed import is_main_process

    config = config_from_args(args)
    result = train(config, resume=bool(args.resume))
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    test = result.test
    top = "".join(f", top-{k} {v:.4f}" for k, v in test.topk.items())
    print(f"test accuracy {test.accuracy:.4f}{top} on {test.count} images "
          f"(model of epoch {result.best_epoch}; {result.wall_s:.0f} s wall, {result.cpu_s:.0f} s CPU)")
    print(f"run folder: {result.run_dir}")
    if (result.run_dir / "report.html").is_file():
        print(f"report: {result.run_dir / 'report.html'}")
    return 0

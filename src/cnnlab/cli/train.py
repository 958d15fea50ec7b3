"""``cnnlab train``: one training run from a typed config, overridable field by field."""
from __future__ import annotations

import argparse

from cnnlab.cli._args import finite_float


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
    p.add_argument("--lr", type=finite_float)
    p.add_argument("--weights", help="initial weights: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.lr=0.1 data.flip=true (repeatable)")
    p.add_argument("--config", help="a config.json to start from (e.g. from another run folder)")
    p.add_argument("--name", help="run folder name (default: model-data-date)")
    p.add_argument("--out-dir", help="parent of the run folder (default: runs)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop within this wall time (e.g. 300, 4m): the first steps are timed and the number of "
                        "steps fixed to fit; evaluation included")
    p.add_argument("--teacher", metavar="RUN",
                   help="knowledge distillation: learn also from the soft targets of this trained classifier run "
                        "(same data and classes; for an SSD detector, a classifier of its classes that sees each "
                        "training box's crop; docs/distillation.md)")
    p.add_argument("--temperature", type=finite_float, help="distillation temperature T (default 4)")
    p.add_argument("--alpha", type=finite_float,
                   help="weight of the soft (teacher) loss in [0, 1]; the labels get 1 - alpha (default 0.9; a "
                        "detector keeps its own losses whole)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_train)


def read_config(path: str, flag: str):
    """A TrainConfig from a config.json, or a CnnlabError naming ``flag`` and what the file should hold."""
    import json
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.engine.config import TrainConfig

    expected = "expected a config.json as written in a run folder (a JSON object of config keys)"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CnnlabError(f"{flag} {path}: no such file; {expected}") from None
    except IsADirectoryError:
        raise CnnlabError(f"{flag} {path} is a folder; {expected}, e.g. {Path(path) / 'config.json'}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CnnlabError(f"{flag} {path} cannot be read as JSON ({e}); {expected}") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{flag} {path} holds a JSON {type(data).__name__}; {expected}")
    return TrainConfig.from_dict(data)


def config_from_args(args: argparse.Namespace):
    """Build the TrainConfig: defaults < --config file < named options < --set overrides."""
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.cli._paths import data_argument
    from cnnlab.engine.config import TrainConfig, apply_overrides, check_run_name, parse_duration

    if "help" in args.overrides:
        print("config keys and their defaults (set with --set key=value):\n" + TrainConfig().describe())
        raise SystemExit(0)
    if args.resume:
        run = Path(args.resume)
        if not run.is_dir():
            what = "is a file" if run.exists() else "does not exist"
            raise CnnlabError(f"--resume {args.resume} {what}; expected a run folder written by `cnnlab train`")
        if not (run / "config.json").is_file():
            raise CnnlabError(f"--resume {args.resume}: no config.json there, so it is not a run folder "
                              "(expected a folder written by `cnnlab train`)")
        config = read_config(str(run / "config.json"), "--resume")
        config.out_dir, config.name = str(run.parent), run.name
    elif args.config:
        config = read_config(args.config, "--config")
        config.name = ""
    else:
        config = TrainConfig()
    if args.name is not None:
        check_run_name(args.name, "--name")  # before config.py names it 'name'
    data_argument(args.data, "--data")
    budget = getattr(args, "time_budget", None)  # search and ensemble build their configs here too, without it
    budget = None if budget is None else parse_duration(budget, "--time-budget")
    named = {"model.name": args.model, "data.name": args.data, "epochs": args.epochs, "data.batch_size": args.batch_size,
             "optim.lr": args.lr, "model.weights": args.weights, "name": args.name, "out_dir": args.out_dir,
             "device": args.device, "time_budget": budget}
    teacher = getattr(args, "teacher", None)  # search and ensemble build their configs here too, without these
    if teacher is not None:  # an absolute path: the run folder (and a resume from elsewhere) names the same teacher
        named["distill.teacher"] = str(Path(teacher).resolve())
    named["distill.temperature"] = getattr(args, "temperature", None)
    named["distill.alpha"] = getattr(args, "alpha", None)
    overrides = [f"{k}={v}" for k, v in named.items() if v is not None] + list(args.overrides)
    if args.quiet:
        overrides.append("quiet=true")
    config = apply_overrides(config, overrides)
    check_out_dir(config.out_dir)
    return config


def check_out_dir(out_dir: str) -> None:
    """A file in the way of the run folder fails here, not after the data is loaded."""
    from pathlib import Path

    from cnnlab._errors import CnnlabError

    for folder in (Path(out_dir), *Path(out_dir).parents):
        if folder.exists() and not folder.is_dir():
            raise CnnlabError(f"out_dir {out_dir}: {folder} is a file; expected a folder to hold run folders")


def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab.engine import train
    from cnnlab.engine.distributed import is_main_process

    config = config_from_args(args)
    if not args.resume and config.name:
        from pathlib import Path

        from cnnlab._errors import CnnlabError

        run_dir = Path(config.out_dir) / config.name
        if run_dir.is_dir() and not (run_dir / "config.json").exists() and any(run_dir.iterdir()):
            # a run writes config.json, metrics.csv, report.html ...: never over a user's own files
            raise CnnlabError(f"{run_dir} already exists and holds files that are not a run; "
                              "choose another --name (or --out-dir), or empty that folder")
    result = train(config, resume=bool(args.resume))
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    test = result.test
    from cnnlab.engine.tasks import get_task

    headline = get_task(result.task).headline(test)
    budget = f"; {result.planned_steps:,} steps fitted the time budget" if result.planned_steps else ""
    print(f"{headline} on {test.count} images "
          f"(model of epoch {result.best_epoch}; {result.wall_s:.0f} s wall, {result.cpu_s:.0f} s CPU{budget})")
    print(f"run folder: {result.run_dir}")
    if (result.run_dir / "report.html").is_file():
        print(f"report: {result.run_dir / 'report.html'}")
    return 0

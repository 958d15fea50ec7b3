"""``cnnlab search``: grid or random hyper-parameter search, short runs first, then refined around the best."""
from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search", help="hyper-parameter search (grid or random, coarse to fine)",
        description="Search config fields (the dotted keys of `cnnlab train --set`) with short runs first, then "
                    "narrow every range around the best trial and train longer. Trials are scored on a validation "
                    "split. search.csv and best.json grow after every trial; search.png comes at the end. "
                    "Example: cnnlab search --model simple_cnn_bn --data digits --param 'optim.lr=loguniform(1e-3,1)' "
                    "--param optim.optimizer=sgd,adamw --trials 8,4 --epochs 1,3. An interrupted search continues "
                    "with `cnnlab search --resume runs/NAME` (its arguments are read from search.json).")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=RANGE",
                   help="a searched field: loguniform(lo,hi), uniform(lo,hi), int(lo,hi), a,b,c or a JSON list "
                        "(repeatable)")
    # no argparse defaults: with --resume, only the options actually given are checked against search.json
    p.add_argument("--strategy", choices=("random", "grid"),
                   help="random: --trials samples per round; grid: every combination (default: random)")
    p.add_argument("--trials", help="trials per round, one number or one per round: 8 or 8,4 (default 8)")
    p.add_argument("--epochs", help="epochs of each round's runs, short first (default: 1,3)")
    p.add_argument("--metric", choices=("val_acc", "val_loss"), help="what the trials are ranked by (default val_acc)")
    p.add_argument("--shrink", type=float, help="width of each refined range vs the previous (default 0.25)")
    p.add_argument("--grid-points", type=int, help="values per numeric range in a grid (default 3)")
    p.add_argument("--search-seed", type=int, help="seed of the random proposals (default 0)")
    p.add_argument("--resume", dest="resume_search", nargs="?", const="", metavar="DIR",
                   help="continue the interrupted search in DIR (or the --out-dir/--name folder): finished trials "
                        "are read back, an interrupted one continues from its checkpoint; the arguments come from "
                        "DIR/search.json")
    p.add_argument("--no-plot", action="store_true", help="skip search.png")
    # the same configuration options as `cnnlab train` (the base every trial starts from)
    p.add_argument("--model", help="registered model name")
    p.add_argument("--data", help="dataset name or image folder")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weights", help="initial weights: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config fields as in cnnlab train (repeatable)")
    p.add_argument("--config", help="a config.json to start from")
    p.add_argument("--name", help="search folder name (default: search-model-data-date)")
    p.add_argument("--out-dir", help="parent of the search folder (default: runs)")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=cmd_search, resume=None)


def _counts(text: str, what: str) -> list[int]:
    from cnnlab._errors import CnnlabError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CnnlabError(f"--{what} takes whole numbers separated by commas (e.g. 1,3), got {text!r}") from None


def format_table(trials, keys, metric: str, limit: int = 20) -> str:
    """The trials as a printed table, best first."""
    from cnnlab.cli._format import table

    ranked = sorted(trials, key=lambda t: (math.isnan(t.score), -t.score if metric == "val_acc" else t.score))[:limit]
    rows = [[f"r{t.round} t{t.index:02d}", *(t.params[k] for k in keys), t.epochs, f"{t.score:.4f}",
             f"{t.val_loss:.4f}", f"{t.train_loss:.4f}", t.status] for t in ranked]
    return table(["trial", *keys, "epochs", metric, "val_loss", "train_loss", "status"], rows,
                 align="l" + "r" * (len(keys) + 4) + "l")


DEFAULTS = {"strategy": "random", "trials": "8", "epochs": "1,3", "metric": "val_acc", "shrink": 0.25, "grid_points": 3,
            "search_seed": 0}


def cmd_search(args: argparse.Namespace) -> int:
    from cnnlab.cli.train import config_from_args
    from cnnlab.engine.search import parse_space, resume_search, search

    if args.resume_search is not None:
        result = _resume(args, resume_search)
    else:
        for key, value in DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        space = parse_space(args.params)
        epochs = _counts(args.epochs, "epochs")
        trials = _counts(args.trials, "trials")
        name = args.name
        args.epochs, args.name = None, None  # per round, and the search folder's (not a trial's) name
        base = config_from_args(args)
        result = search(base, space, strategy=args.strategy, trials=trials[0] if len(trials) == 1 else trials,
                        epochs=epochs, metric=args.metric, shrink=args.shrink, grid_points=args.grid_points,
                        seed=args.search_seed, name=name or "", plot=not args.no_plot)
    keys = list(result.best.params)
    print(format_table(result.trials, keys, result.metric))
    best = result.best
    print(f"best: r{best.round} t{best.index:02d} {result.metric} {best.score:.4f} ({best.run_dir})")
    print("train it fully with: cnnlab train " + " ".join(f"--set '{o}'" for o in result.best_overrides()))
    print(f"table: {result.csv_path}" + (f"  plot: {result.plot_path}" if result.plot_path else ""))
    return 0


def _resume(args: argparse.Namespace, resume_search):
    """Continue a search; every search option given must match its search.json."""
    from cnnlab.cli._resume import config_conflicts, refuse, resume_folder
    from cnnlab.engine.search import IGNORED_BASE_KEYS, _dim_to_dict, load_arguments, parse_space

    folder = resume_folder(args, args.resume_search)
    saved = load_arguments(folder)
    rounds = len(args.epochs.split(",")) if args.epochs else len(saved["epochs"])
    trials = args.trials and _counts(args.trials, "trials")
    given = {"strategy": ("--strategy", args.strategy, args.strategy), "metric": ("--metric", args.metric, args.metric),
             "shrink": ("--shrink", args.shrink, args.shrink),
             "grid_points": ("--grid-points", args.grid_points, args.grid_points),
             "seed": ("--search-seed", args.search_seed, args.search_seed),
             "epochs": ("--epochs", args.epochs, args.epochs and _counts(args.epochs, "epochs")),
             "trials": ("--trials", args.trials, trials * rounds if trials and len(trials) == 1 else trials)}
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731 - as typed on the command line
    conflicts = [f"{flag} {shown} (the search has {show(saved[key])})"
                 for key, (flag, shown, value) in given.items() if value is not None and value != saved[key]]
    if args.params and [_dim_to_dict(d) for d in parse_space(args.params)] != saved["space"]:
        conflicts.append("--param (the search has "
                         + ", ".join(f"{d['key']}" for d in saved["space"]) + " with other ranges or values)")

    def prepare(config):
        if config.data.val_fraction == 0:
            config.data.val_fraction = 0.1  # as search() does
        return config

    conflicts += config_conflicts(saved["base"], args, IGNORED_BASE_KEYS, skip_options=("epochs",), prepare=prepare)
    refuse(folder, "search", conflicts)
    return resume_search(folder, quiet=args.quiet, plot=not args.no_plot)

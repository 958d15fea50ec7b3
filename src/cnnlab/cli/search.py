"""``cnnlab search``: hyper-parameter search on Optuna (TPE, random or grid; Hyperband or successive-halving pruning)."""
from __future__ import annotations

import argparse
import math

from cnnlab.cli._args import finite_float

SAMPLERS = ("tpe", "random", "grid")  # as cnnlab.engine.search.SAMPLERS (not imported: it imports torch)
PRUNERS = ("hyperband", "halving", "none")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search", help="hyper-parameter search (Optuna: TPE, random or grid, with pruning)",
        description="Search config fields (the dotted keys of `cnnlab train --set`) with Optuna. Each trial reports "
                    "its validation metric after every epoch and the pruner stops the ones that trail (short runs "
                    "first, then only the promising ones train on). The study lives in DIR/study.db (or --storage), "
                    "so an interrupted search continues with `cnnlab search --resume DIR`, and several processes "
                    "or machines can work on one study. search.csv and best.json grow after every trial; "
                    "search.png comes at the end. Example: cnnlab search --model simple_cnn_bn --data digits "
                    "--param 'optim.lr=loguniform(1e-3,1)' --param optim.optimizer=sgd,adamw --trials 12 --epochs 9")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=RANGE",
                   help="a searched field: loguniform(lo,hi), uniform(lo,hi), int(lo,hi), a,b,c or a JSON list "
                        "(repeatable)")
    # no argparse defaults: with --resume, only the options actually given are checked against search.json
    p.add_argument("--sampler", choices=SAMPLERS, help="how trials are proposed (default tpe)")
    p.add_argument("--pruner", choices=PRUNERS, help="which trials stop early (default hyperband)")
    p.add_argument("--trials", type=int, help="trials in the study, all workers together (default 8, or the grid)")
    p.add_argument("--epochs", type=int, help="the most epochs a trial trains (default 3)")
    p.add_argument("--min-epochs", type=int, help="epochs before the first pruning decision (default 1)")
    p.add_argument("--reduction-factor", type=int, help="the pruner's rungs grow by this factor; 1/factor of the "
                                                        "trials go on at each (default 3)")
    p.add_argument("--metric", help="the epoch-row column trials are ranked by: val_loss or val_<task metric> "
                                    "(default: the task's first metric, e.g. val_acc, val_psnr)")
    p.add_argument("--grid-points", type=int, help="values per numeric range with --sampler grid (default 3)")
    p.add_argument("--search-seed", type=int, help="seed of the proposals (default 0)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default sqlite:///DIR/study.db), "
                                     "e.g. postgresql://user@host/db")
    p.add_argument("--study-name", help="the study in that storage (default: the search folder's name)")
    p.add_argument("--resume", dest="resume_search", nargs="?", const="", metavar="DIR",
                   help="continue the search in DIR (or the --out-dir/--name folder), or join it as one more "
                        "worker: the arguments come from DIR/search.json")
    p.add_argument("--no-plot", action="store_true", help="skip search.png")
    # the same configuration options as `cnnlab train` (the base every trial starts from)
    p.add_argument("--model", help="registered model name")
    p.add_argument("--data", help="dataset name or image folder")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=finite_float)
    p.add_argument("--weights", help="initial weights: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config fields as in cnnlab train (repeatable)")
    p.add_argument("--config", help="a config.json to start from")
    p.add_argument("--name", help="search folder name (default: search-model-data-date)")
    p.add_argument("--out-dir", help="parent of the search folder (default: runs)")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=cmd_search, resume=None, time_budget=None)


def format_table(trials, keys, metric: str, higher: bool, limit: int = 20) -> str:
    """The trials as a printed table, best first (complete before pruned before the rest)."""
    from cnnlab.cli._format import table

    rank = {"complete": 0, "pruned": 1}
    ranked = sorted(trials, key=lambda t: (rank.get(t.state, 2), math.isnan(t.score),
                                           -t.score if higher else t.score))[:limit]
    rows = [[f"t{t.number:03d}", *(t.params.get(k, "") for k in keys), t.epochs, f"{t.score:.4f}",
             f"{t.val_loss:.4f}", f"{t.train_loss:.4f}", t.state] for t in ranked]
    return table(["trial", *keys, "epochs", metric, "val_loss", "train_loss", "state"], rows,
                 align="l" + "r" * (len(keys) + 4) + "l")


DEFAULTS = {"sampler": "tpe", "pruner": "hyperband", "epochs": 3, "min_epochs": 1, "reduction_factor": 3,
            "grid_points": 3, "search_seed": 0}


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
        epochs, name = args.epochs, args.name
        if name:  # the search folder's name: one folder inside --out-dir (config_from_args sees None)
            from cnnlab.engine.config import check_run_name

            check_run_name(name, "--name")
        args.epochs, args.name = None, None  # the trials', and the search folder's (not a trial's) name
        base = config_from_args(args)
        result = search(base, space, sampler=args.sampler, pruner=args.pruner, trials=args.trials, epochs=epochs,
                        min_epochs=args.min_epochs, reduction_factor=args.reduction_factor, metric=args.metric,
                        grid_points=args.grid_points, seed=args.search_seed, name=name or "", storage=args.storage,
                        study_name=args.study_name, plot=not args.no_plot)
    keys = list(result.trials[0].params) if result.trials else []
    higher = result.direction == "maximize"
    print(format_table(result.trials, keys, result.metric, higher))
    best = result.best
    if best is None:
        print("no trial finished (all pruned, diverged or failed): see search.csv")
    else:
        from cnnlab.engine.search import load_arguments

        base = load_arguments(result.search_dir)["base"]
        print(f"best: t{best.number:03d} {result.metric} {best.score:.4f} after {best.epochs} epoch(s) ({best.run_dir})")
        print(f"train it fully with: cnnlab train --model {base['model']['name']} --data {base['data']['name']} "
              + " ".join(f"--set '{o}'" for o in result.best_overrides()))
    print(f"table: {result.csv_path}" + (f"  plot: {result.plot_path}" if result.plot_path else "")
          + f"  study: {result.study_name} in {result.storage}")
    return 0


def _resume(args: argparse.Namespace, resume_search):
    """Continue a search; every search option given must match its search.json."""
    from cnnlab.cli._resume import config_conflicts, refuse, resume_folder
    from cnnlab.engine.search import IGNORED_BASE_KEYS, load_arguments, parse_space

    folder = resume_folder(args, args.resume_search)
    saved = load_arguments(folder)
    given = {"sampler": ("--sampler", args.sampler), "pruner": ("--pruner", args.pruner),
             "trials": ("--trials", args.trials), "epochs": ("--epochs", args.epochs),
             "min_epochs": ("--min-epochs", args.min_epochs), "reduction_factor": ("--reduction-factor",
                                                                                 args.reduction_factor),
             "metric": ("--metric", args.metric), "grid_points": ("--grid-points", args.grid_points),
             "seed": ("--search-seed", args.search_seed), "storage": ("--storage", args.storage),
             "study_name": ("--study-name", args.study_name)}
    conflicts = [f"{flag} {value} (the search has {saved.get(key)})"
                 for key, (flag, value) in given.items() if value is not None and value != saved.get(key)]
    if args.params and [d.to_dict() for d in parse_space(args.params)] != saved["space"]:
        conflicts.append("--param (the search has "
                         + ", ".join(f"{d['key']}" for d in saved["space"]) + " with other ranges or values)")

    def prepare(config):
        if config.data.val_fraction == 0:
            config.data.val_fraction = 0.1  # as search() does
        return config

    conflicts += config_conflicts(saved["base"], args, IGNORED_BASE_KEYS, skip_options=("epochs",), prepare=prepare)
    refuse(folder, "search", conflicts)
    return resume_search(folder, quiet=args.quiet, plot=not args.no_plot)

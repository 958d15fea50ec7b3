"""``cnnlab search``: grid or random hyper-parameter search, short runs first, then refined around the best."""
from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search", help="hyper-parameter search (grid or random, coarse to fine)",
        description="Search config fields (the dotted keys of `cnnlab train --set`) with short runs first, then "
                    "narrow every range around the best trial and train longer. Trials are scored on a validation "
                    "split. Writes search.csv, search.png and best.json in the search folder. Example: cnnlab search "
                    "--model simple_cnn_bn --data digits --param 'optim.lr=loguniform(1e-3,1)' "
                    "--param optim.optimizer=sgd,adamw --trials 8,4 --epochs 1,3")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=RANGE",
                   help="a searched field: loguniform(lo,hi), uniform(lo,hi), int(lo,hi), a,b,c or a JSON list "
                        "(repeatable)")
    p.add_argument("--strategy", choices=("random", "grid"), default="random",
                   help="random: --trials samples per round; grid: every combination (default: random)")
    p.add_argument("--trials", default="8", help="trials per round, one number or one per round: 8 or 8,4 (default 8)")
    p.add_argument("--epochs", default="1,3", help="epochs of each round's runs, short first (default: 1,3)")
    p.add_argument("--metric", choices=("val_acc", "val_loss"), default="val_acc", help="what the trials are ranked by")
    p.add_argument("--shrink", type=float, default=0.25, help="width of each refined range vs the previous (0.25)")
    p.add_argument("--grid-points", type=int, default=3, help="values per numeric range in a grid (default 3)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random proposals")
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


def cmd_search(args: argparse.Namespace) -> int:
    from cnnlab.cli.train import config_from_args
    from cnnlab.engine.search import parse_space, search

    space = parse_space(args.params)
    epochs = _counts(args.epochs, "epochs")
    trials = _counts(args.trials, "trials")
    name = args.name
    args.epochs, args.name = None, None  # per round, and the search folder's (not a trial's) name
    base = config_from_args(args)
    result = search(base, space, strategy=args.strategy, trials=trials[0] if len(trials) == 1 else trials,
                    epochs=epochs, metric=args.metric, shrink=args.shrink, grid_points=args.grid_points,
                    seed=args.search_seed, name=name or "", plot=not args.no_plot)
    keys = [d.key for d in space]
    print(format_table(result.trials, keys, result.metric))
    best = result.best
    print(f"best: r{best.round} t{best.index:02d} {result.metric} {best.score:.4f} ({best.run_dir})")
    print("train it fully with: cnnlab train " + " ".join(f"--set '{o}'" for o in result.best_overrides()))
    print(f"table: {result.csv_path}" + (f"  plot: {result.plot_path}" if result.plot_path else ""))
    return 0

"""``cnnlab ensemble``: average trained runs' probabilities on the test split, or train a bag of members first."""
from __future__ import annotations

import argparse

from cnnlab._io import atomic_write_text, dumps_json
from cnnlab.cli._args import finite_float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ensemble", help="test an ensemble of runs (probability averaging) or train a bagged one",
        description="Average the class probabilities of trained runs on their common test split and report each "
                    "member's and the ensemble's accuracy: `cnnlab ensemble runs/a runs/b runs/c`. With "
                    "--bootstrap N, first train N members on bootstrap samples of the training set (bagging), "
                    "configured like `cnnlab train`: `cnnlab ensemble --bootstrap 5 --model simple_cnn_bn "
                    "--data fashion_mnist --epochs 5 --name bag`. An interrupted bagging continues with "
                    "`cnnlab ensemble --resume runs/bag` (members already trained are reused).")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders written by cnnlab train")
    p.add_argument("--bootstrap", type=int, metavar="N", help="train N members on bootstrap samples, then test them")
    p.add_argument("--resume", dest="resume_bag", nargs="?", const="", metavar="BAG",
                   help="continue the interrupted bagging in folder BAG (or the --out-dir/--name folder): finished "
                        "members are reused, an interrupted one continues from its checkpoint; N and the config come "
                        "from BAG/bagging.json")
    p.add_argument("--member-weights", dest="member_weights", type=finite_float, nargs="+", metavar="W",
                   help="one weight per member for a weighted average (default: equal)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the metrics to this JSON file")
    # the same configuration options as `cnnlab train` (used with --bootstrap)
    p.add_argument("--model", help="registered model name (with --bootstrap)")
    p.add_argument("--data", help="dataset name or image folder (with --bootstrap)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=finite_float)
    p.add_argument("--weights", help="initial weights of every member: a file, 'torchvision' or 'timm'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field as in cnnlab train (repeatable)")
    p.add_argument("--config", help="a config.json to start from")
    p.add_argument("--name", help="folder of the bag (default: bag-model-data-date)")
    p.add_argument("--out-dir", help="parent of the bag folder (default: runs)")
    p.add_argument("--device", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines while training members")
    p.set_defaults(func=cmd_ensemble, resume=None)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.cli._format import table
    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.engine.ensemble import evaluate_ensemble, train_bagged

    output_path(args.json_out, "--json", suffix=".json")  # before hours of bagging, not after
    if args.resume_bag is not None:
        if args.runs:
            raise CnnlabError("give either run folders or --resume BAG, not both")
        bag = _resume(args)
        result = bag.ensemble
        print(f"bag folder: {bag.bag_dir}")
    elif args.bootstrap is not None:
        if args.runs:
            raise CnnlabError("give either run folders or --bootstrap N, not both")
        from cnnlab.cli.train import config_from_args

        bag = train_bagged(config_from_args(args), args.bootstrap)
        result = bag.ensemble
        print(f"bag folder: {bag.bag_dir}")
    else:
        if not args.runs:
            raise CnnlabError("give the run folders to average (cnnlab ensemble runs/a runs/b), or --bootstrap N "
                              "--model NAME to train a bagged ensemble")
        result = evaluate_ensemble(args.runs, device=args.device or "auto", weights=args.member_weights)
    rows = [[Path(n).name if Path(n).parent.name in ("", ".") else f"{Path(n).parent.name}/{Path(n).name}",
             f"{a:.4f}", f"{l:.4f}"] for n, a, l in zip(result.names, result.member_accuracy, result.member_nll)]
    rows.append([f"mean of {len(rows)} members", f"{result.mean_member_accuracy:.4f}", ""])
    rows.append(["ensemble (probability average)", f"{result.accuracy:.4f}", f"{result.nll:.4f}"])
    print(table(["member", "test acc", "test nll"], rows, align="lrr"))
    gain = result.accuracy - result.mean_member_accuracy
    print(f"ensemble vs mean member: {gain:+.4f} accuracy on {result.count} test images")
    if args.json_out:
        atomic_write_text(make_parent(args.json_out, "--json"), dumps_json(result.to_dict(), indent=2))
    return 0


def _resume(args: argparse.Namespace):
    """Continue a bagging; --bootstrap and the config options, when given, must match its bagging.json."""
    from cnnlab.cli._resume import config_conflicts, refuse, resume_folder
    from cnnlab.engine.ensemble import IGNORED_BAG_KEYS, load_bagging, resume_bagged

    folder = resume_folder(args, args.resume_bag)
    saved = load_bagging(folder)
    conflicts = [f"--bootstrap {args.bootstrap} (the bag has {saved['n']})"] \
        if args.bootstrap is not None and args.bootstrap != saved["n"] else []
    conflicts += config_conflicts(saved["config"], args, IGNORED_BAG_KEYS)
    refuse(folder, "bagging", conflicts)
    return resume_bagged(folder, quiet=args.quiet)

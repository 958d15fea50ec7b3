"""``cnnlab prune RUN --amount 0.5 [--structured] [--steps 3] [--finetune-epochs 1] --out NEWRUN``.

Prunes a classification run's model (a copy: the source run is never changed), fine-tunes it between
steps through the engine, and writes a new folder: the pruned weights as a checkpoint
(``best.safetensors`` + ``best.json``, with the per-layer channel counts of a structured model),
``prune.json`` and ``prune.csv`` (parameters, MACs, sparsity, CPU latency, test accuracy and sizes
before/after), for several amounts ``sparsity_accuracy.png``, and ``report.html`` (its "Pruning"
section; ``cnnlab report NEWRUN`` writes it again).
"""
from __future__ import annotations

import argparse

from cnnlab.cli._args import finite_float

RESULT_NAME = "prune.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a trained classification run (zeroed weights or removed channels) and fine-tune it",
        description="Prune a copy of a classification run's model by weight magnitude: unstructured (single weights "
                    "zeroed; dense size and speed unchanged) or --structured (whole channels removed with "
                    "Torch-Pruning: fewer parameters and MACs). With --steps N the amount is reached in N steps, each "
                    "followed by --finetune-epochs of training with the run's own recipe (learning rate scaled by "
                    "--finetune-lr-scale). Writes the pruned weights, prune.json, prune.csv and, for several "
                    "amounts (--amount 0.25,0.5,0.75, one subfolder each), sparsity_accuracy.png and report.html to "
                    "--out; the source run is never modified.")
    p.add_argument("run", help="a classification run folder (cnnlab train ...)")
    p.add_argument("--amount", required=True, help="fraction removed, in [0, 1); several comma-separated "
                                                   "(0.25,0.5,0.75) for a sparsity-accuracy curve")
    p.add_argument("--out", required=True, metavar="NEWRUN", help="the new folder (must not exist yet, or be empty)")
    p.add_argument("--structured", action="store_true", help="remove channels (Torch-Pruning) instead of zeroing "
                                                             "weights")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="layer: every layer (channel group) loses the amount; global: one magnitude ranking over all")
    p.add_argument("--steps", type=int, default=1, help="prune in N equal steps, fine-tuning after each (default 1)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                   help="epochs of fine-tuning after each step (default 0: no fine-tuning)")
    p.add_argument("--finetune-lr-scale", type=finite_float, default=0.1, metavar="S",
                   help="fine-tune at the run's learning rate times S (default 0.1)")
    p.add_argument("--ignore", default="", metavar="LAYERS",
                   help="comma-separated module names to leave unpruned (structured: default the classifier)")
    p.add_argument("--round-to", type=int, default=None, help="structured: keep channel counts multiples of this")
    p.add_argument("--latency-repeats", type=int, default=20, metavar="N",
                   help="time N batch-1 forward passes on the CPU before and after (median; default 20, 0: skip)")
    p.add_argument("--checkpoint", choices=("best", "last"), help="which weights of RUN (default: those it reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="do not print the fine-tuning epochs")
    p.set_defaults(func=cmd_prune)


def _check_args(args: argparse.Namespace):
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab.compress.prune import parse_amounts

    amounts = parse_amounts(args.amount)
    if len(set(amounts)) != len(amounts):
        raise CnnlabError(f"--amount {args.amount} repeats a value; give each amount once")
    if args.steps < 1:
        raise CnnlabError(f"--steps must be >= 1, got {args.steps}")
    if args.finetune_epochs < 0:
        raise CnnlabError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_lr_scale <= 0:
        raise CnnlabError(f"--finetune-lr-scale must be > 0, got {args.finetune_lr_scale}")
    if args.latency_repeats < 0:
        raise CnnlabError(f"--latency-repeats must be >= 0 (0: no timing), got {args.latency_repeats}")
    if args.round_to is not None and (args.round_to < 1 or not args.structured):
        raise CnnlabError(f"--round-to {args.round_to}: expected an integer >= 1, with --structured")
    out, source = Path(args.out), Path(args.run)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CnnlabError(f"--out {args.out} already exists and is not an empty folder; choose a new folder (the "
                          "pruned run is written there, the source run is never changed)")
    if source.exists() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
        raise CnnlabError(f"--out {args.out} is inside the source run {args.run}; choose a folder outside it")
    ignored = tuple(n.strip() for n in args.ignore.split(",") if n.strip())
    return amounts, out, ignored


def cmd_prune(args: argparse.Namespace) -> int:
    import copy
    import csv
    import io
    import json

    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab._io import atomic_write_text
    from cnnlab.compress.prune import PruneConfig, prune
    from cnnlab.engine.checkpoint import load_checkpoint, save_checkpoint
    from cnnlab.engine.html_report import write_html_report
    from cnnlab.engine.runs import load_run
    from cnnlab.engine.tasks import get_task
    from cnnlab.engine.trainer import resolve_device

    amounts, out, ignored = _check_args(args)
    run = load_run(args.run, args.checkpoint)
    if run.task != "classification":
        raise CnnlabError(f"{args.run} is a {run.task} run; cnnlab prune reports test accuracy and needs a "
                          "classification run (use cnnlab.compress.prune.prune in Python for other models)")
    device = resolve_device(args.device)
    task = get_task(run.task, loss=run.config.loss)
    data = task.build_data(run.config, device)
    example = torch.zeros(1, *run.input_shape, device=device)
    source = load_checkpoint(args.run, run.tag.split("+")[0])  # its metadata and preprocessing tensors

    def accuracy(model) -> float:
        result = task.evaluate(model.to(device).eval(), data.test, data)
        return float(result.accuracy if hasattr(result, "accuracy") else result.metrics["acc"])

    def latency(model) -> float | None:  # on the CPU, whatever --device fine-tunes on (the figure issue 12 asks for)
        if not args.latency_repeats:
            return None
        from cnnlab.analysis.compare import measure_latency

        cpu = model if example.device.type == "cpu" else copy.deepcopy(model).cpu()
        return round(measure_latency(cpu, run.input_shape, repeats=args.latency_repeats, warmup=2), 4)

    base = run.model.to(device)
    acc_before, latency_before = accuracy(base), latency(base)
    timing = {"repeats": args.latency_repeats, "batch": 1, "threads": torch.get_num_threads(),
              "statistic": "median"} if args.latency_repeats else None
    rows, results = [], []
    for amount in amounts:
        folder = out if len(amounts) == 1 else out / f"amount-{amount:g}"
        model = copy.deepcopy(base)
        config = PruneConfig(amount=amount, structured=args.structured, scope=args.scope, steps=args.steps,
                             ignored=ignored or None, round_to=args.round_to)
        finetune = _engine_finetune(run.config, data, folder / "finetune", args) if args.finetune_epochs else None
        result = prune(model, config, example_input=example, finetune=finetune)
        acc_after, latency_after = accuracy(model), latency(model)
        first, last = result.history[0], result.history[-1]
        row = {"amount": amount, "kind": "structured" if args.structured else "unstructured", "scope": args.scope,
               "steps": args.steps, "finetune_epochs": args.finetune_epochs, "params_before": first["params"],
               "params_after": last["params"], "macs_before": first["macs"], "macs_after": last["macs"],
               "sparsity_before": round(first["sparsity"], 6), "sparsity": round(result.sparsity.sparsity, 6),
               "dense_bytes": result.sparsity.total_bytes("dense"), "csr_bytes": result.sparsity.total_bytes("csr"),
               "bitmask_bytes": result.sparsity.total_bytes("bitmask"),
               "latency_ms_before": latency_before, "latency_ms_after": latency_after,
               "test_acc_before": acc_before, "test_acc_after": acc_after, "folder": str(folder)}
        rows.append(row)
        meta = dict(source.meta, pruning={**row, "source_run": str(args.run), "source_checkpoint": run.tag,
                                          "history": result.history},
                    pruned_structure=result.structure)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder, "best", model.cpu(), meta, None, None, source.preprocess)
        row["file_bytes"] = (folder / "best.safetensors").stat().st_size  # the weights on disk, honest size
        atomic_write_text(folder / "config.json", run.config.to_json())
        atomic_write_text(folder / RESULT_NAME, json.dumps({**row, "source_run": str(args.run), "latency": timing,
                                                             "result": result.to_dict()}, indent=2) + "\n")
        results.append(result)
        print(_line(row))
    out.mkdir(parents=True, exist_ok=True)
    if len(amounts) > 1:
        atomic_write_text(out / RESULT_NAME, json.dumps({"source_run": str(args.run), "latency": timing, "rows": rows},
                                                        indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "prune.csv", buffer.getvalue())
    print(_table(rows))
    if len(amounts) > 1:
        print(f"curve: {_plot_curve(out / 'sparsity_accuracy.png', rows, acc_before)}")
        for row in rows:  # each amount's folder is a run folder with its own page
            write_html_report(row["folder"])
    print(f"report: {write_html_report(out)}")
    if args.structured:
        print("the weights have the pruned shapes: cnnlab.compress.prune.rebuild_pruned(model, "
              "meta['pruned_structure'], weights) loads them into a fresh build")
    print(f"pruned run: {out}")
    return 0


def _engine_finetune(run_config, data, folder, args):
    """``finetune(model, step)``: ``cnnlab.engine.train`` on the run's data and recipe, one run folder per step."""
    import copy

    from cnnlab.engine import train

    def finetune(model, step: int) -> None:
        config = copy.deepcopy(run_config)
        config.epochs, config.out_dir, config.name = args.finetune_epochs, str(folder), f"step-{step}"
        config.optim.lr *= args.finetune_lr_scale
        config.time_budget, config.quiet, config.plots, config.device = 0.0, args.quiet, False, args.device
        config.model.weights, config.model.compile = None, False
        result = train(config, model=model, data=data)
        if result.model is not model:  # the EMA copy was reported: keep its weights
            model.load_state_dict(result.model.state_dict())

    return finetune


def _line(row: dict) -> str:
    return (f"amount {row['amount']:g} ({row['kind']}): parameters {row['params_before']:,} -> "
            f"{row['params_after']:,}, MACs {row['macs_before']:,} -> {row['macs_after']:,}, "
            f"sparsity {row['sparsity']:.1%}, test accuracy "
            f"{row['test_acc_before']:.2%} -> {row['test_acc_after']:.2%}")


def _table(rows: list[dict]) -> str:
    lines = [f"{'amount':>6} {'kind':<12} {'params':>11} {'MACs':>13} {'sparsity':>8} {'dense MB':>8} {'csr MB':>7} "
             f"{'ms before':>9} {'ms after':>8} {'acc before':>10} {'acc after':>9}"]
    for r in rows:
        ms = [f"{v:.3f}" if v is not None else "-" for v in (r["latency_ms_before"], r["latency_ms_after"])]
        lines.append(f"{r['amount']:>6g} {r['kind']:<12} {r['params_after']:>11,} {r['macs_after']:>13,} "
                     f"{r['sparsity']:>8.1%} {r['dense_bytes'] / 1e6:>8.3f} {r['csr_bytes'] / 1e6:>7.3f} "
                     f"{ms[0]:>9} {ms[1]:>8} {r['test_acc_before']:>10.2%} {r['test_acc_after']:>9.2%}")
    return "\n".join(lines)


def _plot_curve(path, rows: list[dict], acc_before: float):
    from cnnlab._plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    structured = rows[0]["kind"] == "structured"
    xs = [1 - r["params_after"] / r["params_before"] if structured else r["sparsity"] for r in rows]
    ax.plot([0, *xs], [acc_before, *(r["test_acc_after"] for r in rows)], marker="o")
    ax.set_xlabel("parameters removed" if structured else "sparsity of conv/linear weights")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{rows[0]['kind']} pruning, {rows[0]['steps']} step(s), "
                 f"{rows[0]['finetune_epochs']} fine-tune epochs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)

"""Sparsity-accuracy curves of the demo's network on Fashion-MNIST: unstructured vs structured pruning.

    python benchmarks/bench_prune.py --epochs 2 --finetune-epochs 1 --finetune-limit 10000 --threads 2
    python benchmarks/bench_prune.py --latency-only --repeats 40 --threads 2   # latency of the shapes only
    python benchmarks/bench_prune.py --base /tmp/bench_prune-XXXX/base ...   # reuse the trained network

Trains the network ``cnnlab demo`` trains on this CPU (fmnist_net where the CPU has bf16 units, else
fmnist_fast) for ``--epochs`` with the demo's recipe, then for each amount prunes a copy (one shot),
fine-tunes it ``--finetune-epochs`` on a ``--finetune-limit`` stratified subset of the training set at a
tenth of the recipe's learning rate, and tests it on the full 10,000-image test set. Prints one Markdown
row per model: test accuracy, parameters, MACs (cnnlab.summary), zeros among the conv/linear weights, dense
and CSR size, and fp32 eager CPU latency (median ms) at batch 1 and 32; then the CPU and its flags.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from cnnlab._platform import cpu_has_bf16
from cnnlab.compress.prune import PruneConfig, prune
from cnnlab.compress.prune_unstructured import sparsity_report
from cnnlab.engine import train
from cnnlab.engine.recipes import demo_config
from cnnlab.engine.tasks import get_task
from cnnlab.analysis import summary
from _bench import cpu_flags, cpu_name, median_ms  # noqa: E402  (benchmarks/_bench.py)


def cpu_line() -> str:
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{cpu_name()}, {torch.get_num_threads()} threads, flags: {cpu_flags(wanted)}"


def latency_only(args) -> None:
    """Latency alone, interleaved rounds over all models (min and median ms): random weights, as only shapes and
    zeros matter, so it runs in about a minute and a busy machine disturbs every model alike."""
    import cnnlab

    name = "fmnist_net" if cpu_has_bf16() else "fmnist_fast"
    x1 = torch.randn(1, 1, 28, 28)
    models = {"dense": cnnlab.create_model(name, num_classes=10, in_channels=1).eval()}
    for structured, amounts in ((False, args.unstructured), (True, args.structured)):
        for amount in (float(a) for a in amounts.split(",") if a):
            model = copy.deepcopy(models["dense"])
            prune(model, PruneConfig(amount=amount, structured=structured), example_input=x1)
            models[f"{'structured' if structured else 'unstructured'} {amount:g}"] = model
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in models}
    with torch.inference_mode():
        for _ in range(3):
            for m in models.values():
                m(x1), m(torch.randn(32, 1, 28, 28))
        for _ in range(args.repeats):
            for k, m in models.items():
                for b in (1, 32):
                    x = torch.randn(b, 1, 28, 28)
                    t0 = time.perf_counter()
                    m(x)
                    times[k][b].append(1000 * (time.perf_counter() - t0))
    print(f"\n{name}, fp32 eager, {args.repeats} interleaved rounds\n")
    print("| model | params | MACs | b=1 min ms | b=1 median | b=32 min ms | b=32 median |")
    print("|---|---|---|---|---|---|---|")
    for k, m in models.items():
        s = summary(m, (1, 28, 28), training_memory=False).totals
        t = times[k]
        print(f"| {k} | {s.params:,} | {s.macs:,} | {min(t[1]):.3f} | {statistics.median(t[1]):.3f} | "
              f"{min(t[32]):.2f} | {statistics.median(t[32]):.2f} |")
    print(f"\nCPU: {cpu_line()}; torch {torch.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--base", help="a run folder trained before (skips the training; its recipe is used)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-limit", type=int, default=10_000)
    p.add_argument("--unstructured", default="0.5,0.75,0.9")
    p.add_argument("--structured", default="0.25,0.5,0.75")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--latency-only", action="store_true", help="only the CPU latency of the pruned shapes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_only:
        return latency_only(args)
    work = tempfile.mkdtemp(prefix="bench_prune-")
    fp32 = not cpu_has_bf16()
    config = demo_config(fp32=fp32)
    config.epochs, config.out_dir, config.name, config.quiet = args.epochs, work, "base", True
    config.amp, config.threads, config.plots, config.device = "none" if fp32 else "bf16", args.threads, False, "cpu"
    if args.base:
        from cnnlab.engine.runs import load_run

        run = load_run(args.base)
        base, config = run.model, run.config
        config.out_dir, config.quiet, config.threads, config.plots = work, True, args.threads, False
        print(f"loaded {config.model.name} from {args.base} ({run.epoch} epochs)")
    else:
        t0 = time.perf_counter()
        base = train(config).model.cpu().eval()
        print(f"trained {config.model.name} {args.epochs} epochs in {time.perf_counter() - t0:.0f} s")

    task = get_task(config)
    ft_config = copy.deepcopy(config)
    ft_config.epochs, ft_config.data.train_limit = args.finetune_epochs, args.finetune_limit
    ft_config.optim.lr *= 0.1
    data = task.build_data(ft_config, torch.device("cpu"))
    example = torch.zeros(1, *data.input_shape)

    def measure(label: str, model) -> None:
        model = model.cpu().eval().to(memory_format=torch.contiguous_format)
        acc = task.evaluate(model, data.test, data).accuracy
        s = summary(model, tuple(data.input_shape), training_memory=False).totals
        sp = sparsity_report(model)
        ms = [median_ms(model, torch.randn(b, *data.input_shape), repeats=args.repeats) for b in (1, 32)]
        print(f"| {label} | {acc:.2%} | {s.params:,} | {s.macs:,} | {sp.sparsity:.1%} | "
              f"{sp.total_bytes('dense') / 1e3:.0f} | {sp.total_bytes('csr') / 1e3:.0f} | {ms[0]:.3f} | {ms[1]:.2f} |",
              flush=True)

    print(f"\n{config.model.name}, Fashion-MNIST test (10,000), fine-tune {args.finetune_epochs} epoch(s) on "
          f"{args.finetune_limit:,} training images at lr x0.1\n")
    print("| model | test acc | params | MACs | zeros (conv/linear) | dense KB | CSR KB | ms b=1 | ms b=32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    measure("dense (trained)", base)
    for structured, amounts in ((False, args.unstructured), (True, args.structured)):
        for amount in (float(a) for a in amounts.split(",") if a):
            model = copy.deepcopy(base)

            def finetune(m, step, tag=f"{'s' if structured else 'u'}{amount:g}"):
                c = copy.deepcopy(ft_config)
                c.name = f"ft-{tag}-{step}"
                result = train(c, model=m, data=data)
                if result.model is not m:
                    m.load_state_dict(result.model.state_dict())

            kind = "structured" if structured else "unstructured"
            prune(model, PruneConfig(amount=amount, structured=structured), example_input=example, finetune=None)
            measure(f"{kind} {amount:g}, no fine-tune", copy.deepcopy(model))
            model = copy.deepcopy(base)
            prune(model, PruneConfig(amount=amount, structured=structured), example_input=example,
                  finetune=finetune if args.finetune_epochs else None)
            measure(f"{kind} {amount:g} + fine-tune", model)
    print(f"\nCPU: {cpu_line()}; torch {torch.__version__}; work folder {work}")


if __name__ == "__main__":
    main()

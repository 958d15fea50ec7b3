"""Knowledge distillation on Fashion-MNIST: a small student trained alone vs with a cnnlab teacher, 3 seeds each.

Teacher: ``fmnist_fast`` (the demo's batch-normalised CNN for CPUs without bf16), trained first on all 60,000
training images (Hinton et al.'s setting: the teacher has the full set, the students a part of it) with the
demo's SGD one-cycle recipe in bf16 autocast.
Student: ``lenet5`` (LeCun et al. 1998, 61.7K parameters), trained ``--epochs`` epochs per seed, once alone
(cross-entropy) and once per ``--alpha`` with the teacher (``distill.teacher``: alpha * T^2 * KL + (1 - alpha) * CE),
on the first ``--train-limit`` training images.
Both students use the same recipe (Adam, one-cycle), seeds, data and epochs; only the loss differs. Images are resized
to 32x32 (LeNet-5's input) for teacher and students alike. Printed: the teacher's test accuracy, each
student run's, and the mean +- std (sample std, n=3) of each arm, with the wall time.

    python benchmarks/bench_distill.py [--train-limit 10000] [--epochs 10] [--teacher-epochs 2] [--alpha 0.5 0.9]
        [--teacher-run RUN] [--threads 1] [--val-fraction 0.1]

With ``--val-fraction``, every student holds that share of its images out as a validation split (its reported
weights are then the best epoch by validation loss), and the distilled arm compared with the student alone is the
one with the best mean validation accuracy: alpha is chosen without looking at the test split.

The run folders stay under ``--out`` (default a temporary folder) for inspection.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import cpu_name  # noqa: E402  (benchmarks/_bench.py)


def recipe(out: str, name: str, model: str, epochs: int, seed: int, args: argparse.Namespace, *,
           optimizer: str = "sgd", lr: float = 0.1, train_limit: int | None = None, amp: str | None = None,
           val_fraction: float = 0.0):
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    # the demo's recipe (flip, 2-pixel pad-and-crop, SGD Nesterov, one-cycle), without label smoothing: a
    # smoothed teacher gives less informative soft targets (Mueller et al. 2019, "When does label smoothing help?")
    return TrainConfig(model=ModelConfig(name=model),
                       data=DataConfig(name="fashion_mnist", batch_size=128, image_size=32, flip=True, crop_padding=2,
                                       train_limit=args.train_limit if train_limit is None else train_limit,
                                       num_workers=0, val_fraction=val_fraction),
                       optim=OptimConfig(optimizer=optimizer, lr=lr, schedule="onecycle", weight_decay=5e-4),
                       epochs=epochs, seed=seed, device="cpu", amp=amp or args.amp, threads=args.threads,
                       out_dir=out, name=name, quiet=True, plots=False)


def main() -> None:
    from cnnlab.engine import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limit", type=int, default=10000, help="training images (0 = all 60,000)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each student run")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-train-limit", type=int, default=0,
                   help="the teacher's training images (0 = all 60,000: Hinton et al.'s setting, a teacher trained on "
                        "the full set and a student on a part of it)")
    p.add_argument("--teacher-amp", default="bf16", help="the teacher's training precision (bf16: the demo's fast path)")
    p.add_argument("--student-optimizer", default="adam", help="LeNet-5's tanh units learn slowly with SGD here")
    p.add_argument("--student-lr", type=float, default=0.005)
    p.add_argument("--student-init", default="xavier", help="lenet5's init: xavier (Glorot) learns faster than the "
                                                             "paper's reference init in few epochs")
    p.add_argument("--teacher", default="fmnist_fast")
    p.add_argument("--teacher-run", help="reuse this teacher run folder (trained by an earlier run of this script)")
    p.add_argument("--student", default="lenet5")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="one distilled arm per value")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="none", help="none (fp32) or bf16 (autocast)")
    p.add_argument("--out", default=None, help="folder for the run folders (default: a temporary one)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="students' validation split; the distilled arm is then chosen on it (not on the test split)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_distill_")
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, threads {args.threads}, "
          f"amp {args.amp}; train_limit {args.train_limit}, student {args.student} x {args.epochs} epochs, "
          f"T={args.temperature}, alpha {args.alpha}; runs in {out}", flush=True)
    t0 = time.perf_counter()
    if args.teacher_run:
        import json

        teacher_dir = Path(args.teacher_run)
        print(f"teacher {teacher_dir}: test accuracy "
              f"{json.loads((teacher_dir / 'results.json').read_text())['test_accuracy']:.4f} (reused)", flush=True)
    else:
        teacher = train(recipe(out, "teacher", args.teacher, args.teacher_epochs, 0, args,
                               train_limit=args.teacher_train_limit, amp=args.teacher_amp))
        teacher_dir = teacher.run_dir
        print(f"teacher {args.teacher}: test accuracy {teacher.test.accuracy:.4f} ({teacher.wall_s:.0f} s)", flush=True)
    arms = {"alone": None, **{f"distilled a={a}": a for a in args.alpha}}
    accuracy: dict[str, list[float]] = {arm: [] for arm in arms}
    val_accuracy: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        for arm, alpha in arms.items():
            config = recipe(out, f"{arm.replace(' ', '-').replace('=', '')}-{seed}", args.student, args.epochs, seed,
                            args, optimizer=args.student_optimizer, lr=args.student_lr, val_fraction=args.val_fraction)
            config.model.options = {"init": args.student_init} if args.student_init else {}
            if alpha is not None:
                config.distill.teacher = str(teacher_dir)
                config.distill.temperature, config.distill.alpha = args.temperature, alpha
            result = train(config)
            accuracy[arm].append(result.test.accuracy)
            val = result.history[result.best_epoch - 1].get("val_acc") if args.val_fraction else None
            if val is not None:
                val_accuracy[arm].append(val)
            print(f"  seed {seed} {arm:>16}: test accuracy {result.test.accuracy:.4f}"
                  + (f", val accuracy {val:.4f} (epoch {result.best_epoch})" if val is not None else "")
                  + f" ({result.wall_s:.0f} s)", flush=True)
    for arm, values in accuracy.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{args.student} {arm:>16}: {statistics.mean(values):.4f} +- {std:.4f} over {len(values)} seeds "
              f"({', '.join(f'{v:.4f}' for v in values)})")
    for arm in list(arms)[1:]:
        gain = statistics.mean(accuracy[arm]) - statistics.mean(accuracy["alone"])
        print(f"{arm}, T={args.temperature}: {gain * 100:+.2f} points over the student alone")
    if args.val_fraction:
        for arm, values in val_accuracy.items():
            print(f"{args.student} {arm:>16}: validation {statistics.mean(values):.4f} (mean over {len(values)} seeds)")
        chosen = max(list(arms)[1:], key=lambda a: statistics.mean(val_accuracy[a]))
        gain = statistics.mean(accuracy[chosen]) - statistics.mean(accuracy["alone"])
        print(f"chosen on validation: {chosen}; on the test split {gain * 100:+.2f} points over the student alone")
    print(f"total {time.perf_counter() - t0:.0f} s")
    Path(out, "bench_distill.txt").write_text(f"{accuracy}\n")


if __name__ == "__main__":
    main()

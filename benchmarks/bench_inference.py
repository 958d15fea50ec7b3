"""CPU inference speed: eager torchvision vs cnnlab's eager, fastest fp32 and int8 paths (issue 12, item 9).

For each model and batch: eager torchvision (the reference: random init, eval, no_grad), cnnlab eager (the
same weights through ``cnnlab.load_weights``), cnnlab folded (``fold_bn``) + channels_last under
``inference_mode``, the same under ``torch.compile`` (optional), ONNX Runtime fp32 (``cnnlab.export.to_onnx``,
graph optimisations all) and ONNX Runtime int8 (``cnnlab.compress.quantize_onnx``, per-channel QDQ).
The demo net (fmnist_fast; fmnist_net before 2026-12-03) has no torchvision twin: its reference is cnnlab eager.

Repeats of the methods are interleaved (round-robin) so that load from other jobs hits them alike; the
figure is each method's median. Threads: torch's default count, the same for ORT's intra_op_num_threads.

    .venv/bin/python benchmarks/bench_inference.py --out /tmp/bench_inference.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cpu_flags, cpu_name  # noqa: E402

MODELS = {"resnet50": (3, 224, 224), "mobilenet_v2": (3, 224, 224), "efficientnet_b0": (3, 224, 224),
          "fmnist_fast": (1, 28, 28), "fmnist_net": (1, 28, 28)}


def interleaved_ms(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each zero-argument callable in ``fns``, timed round-robin (one call of each per round)."""
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's idle threads spin by default and would steal the cores from the interleaved torch calls
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build(name: str, shape: tuple, tmp: Path, threads: int, compile_mode: str | None, calib_n: int):
    """The model's callables (each takes a numpy/torch batch via closure set later) and their setup notes."""
    import cnnlab
    from cnnlab.compress import fold_bn, quantize_onnx
    from cnnlab.export import to_onnx

    torch.manual_seed(0)
    ref = None
    if not name.startswith("fmnist"):
        import torchvision

        ref = getattr(torchvision.models, name)(weights=None).eval()
        mine = cnnlab.create_model(name).eval()
        cnnlab.load_weights(mine, ref.state_dict())
    else:
        mine = cnnlab.create_model(name).eval()
        # random-init BN statistics are trivial (mean 0, var 1); give them values so folding is really tested
        with torch.no_grad():
            for m in mine.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # the dense head's BatchNorm1d too
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    folded = fold_bn(mine, input_size=shape).to(memory_format=torch.channels_last)
    onnx_path = tmp / f"{name}.onnx"
    to_onnx(mine, onnx_path, input_size=shape, dynamic_batch=True, overwrite=True)
    calib = torch.randn(calib_n, *shape)
    int8_path = tmp / f"{name}.int8.onnx"
    quantize_onnx(onnx_path, int8_path, calib, per_channel=True, overwrite=True)
    models = {"torchvision eager": ref, "cnnlab eager": mine, "cnnlab folded+CL": folded}
    compiled = None
    if compile_mode:
        compiled = torch.compile(folded, mode=None if compile_mode == "default" else compile_mode)
    return models, compiled, ort_session(onnx_path, threads), ort_session(int8_path, threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2,efficientnet_b0,fmnist_fast", help=f"of {','.join(MODELS)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--compile", default="default",
                   help="torch.compile mode for the folded model ('default', 'max-autotune-no-cudagraphs', "
                        "or 'none' to skip)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and ORT threads (default torch's own count). On a loaded machine with fewer free "
                        "cores than threads, OpenMP's barriers stall: 1 thread was 600x faster there (RESULTS)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    compile_mode = None if args.compile == "none" else args.compile
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": threads, "torch": torch.__version__,
               "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    import onnxruntime

    machine["onnxruntime"] = onnxruntime.__version__
    print(f"{machine['cpu']} [{machine['flags']}], {threads} threads; {machine['uptime_start']}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            shape = MODELS[name]
            models, compiled, ort32, ort8 = build(name, shape, Path(d), threads, compile_mode, calib_n=16)
            iname = ort32.get_inputs()[0].name
            for b in (int(s) for s in args.batches.split(",")):
                torch.manual_seed(1)
                x = torch.randn(b, *shape)
                xcl = x.contiguous(memory_format=torch.channels_last)
                xn = x.numpy()
                fns = {k: (lambda m=m: m(x)) for k, m in models.items() if m is not None}
                fns["cnnlab folded+CL"] = lambda: models["cnnlab folded+CL"](xcl)
                if compiled is not None:
                    fns[f"folded+CL+compile({compile_mode})"] = lambda: compiled(xcl)
                fns["ORT fp32"] = lambda: ort32.run(None, {iname: xn})
                fns["ORT int8"] = lambda: ort8.run(None, {iname: xn})
                with torch.inference_mode():  # outputs, and compile's first call, outside the timing
                    outs = {k: torch.as_tensor(fn()[0]) if k.startswith("ORT") else fn() for k, fn in fns.items()}
                ms = interleaved_ms(fns, args.repeats)
                refkey = "torchvision eager" if models["torchvision eager"] is not None else "cnnlab eager"
                ref_out = outs[refkey]
                for k in fns:
                    # relative to the reference's largest |output| (random-init nets give tiny logits)
                    diff = ((outs[k] - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-30)).item()
                    agree = (outs[k].argmax(1) == ref_out.argmax(1)).float().mean().item()
                    row = {"model": name, "batch": b, "method": k, "median_ms": round(ms[k], 3),
                           "speedup": round(ms[refkey] / ms[k], 2), "reference": refkey,
                           "max_rel_diff": diff, "top1_agree": agree}
                    rows.append(row)
                    print(f"{name:16s} b{b:<2d} {k:42s} {ms[k]:9.2f} ms  x{row['speedup']:5.2f}  "
                          f"max|d|/max|ref| {diff:.2e}  top1 {agree:.2f}", flush=True)
    machine["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(machine["uptime_end"])
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"machine": machine, "inputs": "random normal (N(0,1)), seed 1",
                                   "rows": rows}, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

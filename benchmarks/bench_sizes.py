"""Sizes on disk, computed (issue 12, item 8): MobileNetV2 and EfficientNet-B0..B4 as cnnlab writes them.

Each file is written to a temporary folder and its real byte size measured: fp32 safetensors, fp16
safetensors, ONNX fp32 (``cnnlab.export.to_onnx``), ONNX int8 (``cnnlab.compress.quantize_onnx``) and
50 % channel-pruned (``prune_structured``) + ONNX int8. Beside them the study notes' Keras h5 / tflite
figures and what the parameter count predicts (fp32 = 4 bytes a parameter; Adam keeps 2 more slots).

    .venv/bin/python benchmarks/bench_sizes.py --out /tmp/bench_sizes.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

MB = 1e6  # the notes' MB: Keras/tflite sizes as file browsers print them (decimal); see docs/deployment.md
# the study notes (seed 002, "from cloud to mobile"): Size in h5 (MB), Size in tflite (MB)
NOTES = {"mobilenet_v2": (26, 8.54), "efficientnet_b0": (47, 15.3), "efficientnet_b1": (76, 24.85),
         "efficientnet_b2": (90, 29.37), "efficientnet_b3": (124, 40.78), "efficientnet_b4": (203, 66.87)}


def predicted_mb(params: int) -> dict[str, float]:
    """Bytes a plain file of ``params`` numbers needs: fp32 weights, fp16, and fp32 weights + Adam's m and v."""
    return {"fp32": 4 * params / MB, "fp16": 2 * params / MB, "fp32+adam": 12 * params / MB}


def sizes(name: str, tmp: Path, size: int = 224, prune: float = 0.5) -> dict:
    import cnnlab
    from cnnlab.compress import prune_structured, quantize_onnx
    from cnnlab.export import to_onnx
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = cnnlab.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = {"model": name, "params": params, "float_buffers": buffers}
    f32, f16 = tmp / f"{name}.safetensors", tmp / f"{name}.fp16.safetensors"
    save_file(sd, str(f32))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(f16))
    onnx32, onnx8 = tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx"
    shape = (3, size, size)
    to_onnx(model, onnx32, input_size=shape, dynamic_batch=True, overwrite=True)
    calib = torch.randn(4, *shape)
    quantize_onnx(onnx32, onnx8, calib, per_channel=True, overwrite=True)
    pruned = cnnlab.create_model(name).eval()
    rep = prune_structured(pruned, prune, example_input=torch.randn(1, *shape))
    pp = sum(p.numel() for p in pruned.parameters())
    p32, p8 = tmp / f"{name}.pruned.onnx", tmp / f"{name}.pruned.int8.onnx"
    to_onnx(pruned, p32, input_size=shape, dynamic_batch=True, overwrite=True)
    quantize_onnx(p32, p8, calib, per_channel=True, overwrite=True)
    for key, path in (("fp32_safetensors", f32), ("fp16_safetensors", f16), ("onnx_fp32", onnx32),
                      ("onnx_int8", onnx8), ("pruned_onnx_int8", p8)):
        out[key + "_mb"] = round(path.stat().st_size / MB, 3)
    out["pruned_params"] = pp
    out["prune_report"] = str(rep).splitlines()[0] if str(rep) else ""
    out["predicted_mb"] = {k: round(v, 2) for k, v in predicted_mb(params).items()}
    h5, tfl = NOTES[name]
    out["notes_h5_mb"], out["notes_tflite_mb"] = h5, tfl
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(NOTES))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    print(f"{'model':16s} {'params':>10s} {'4B*p':>7s} {'12B*p':>7s} {'h5':>5s} {'tflite':>6s} {'st32':>7s} "
          f"{'st16':>7s} {'onnx32':>7s} {'onnx8':>7s} {'pr+8':>7s}  (MB = 1e6 bytes)")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            r = sizes(name, Path(d))
            rows.append(r)
            pm = r["predicted_mb"]
            print(f"{name:16s} {r['params']:10d} {pm['fp32']:7.2f} {pm['fp32+adam']:7.2f} {r['notes_h5_mb']:5} "
                  f"{r['notes_tflite_mb']:6} {r['fp32_safetensors_mb']:7.2f} {r['fp16_safetensors_mb']:7.2f} "
                  f"{r['onnx_fp32_mb']:7.2f} {r['onnx_int8_mb']:7.2f} {r['pruned_onnx_int8_mb']:7.2f}", flush=True)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

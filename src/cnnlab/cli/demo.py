"""``cnnlab demo``: the main job on bundled data.

Until the training engine lands this builds a model and classifies scikit-learn's two
sample photos with it. The model is untrained, so the predicted classes are arbitrary:
the point is the pipeline (load, preprocess, forward, softmax, top-k).
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the main job on bundled data",
                              description="Build a model and classify the bundled sample photos (untrained).")
    p.add_argument("--model", default="resnet18", help="registered model name (default: resnet18)")
    p.add_argument("--top", type=int, default=3, help="how many classes to show per image")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from sklearn.datasets import load_sample_images

    from cnnlab import create_model, model_info

    name = args.model
    model = create_model(name).eval()
    _, height, width = model_info(name).default_input
    images = load_sample_images()
    print(f"cnnlab demo: {name} (untrained: random weights, so its classes are arbitrary)")
    for filename, image in zip(images.filenames, images.images):
        x = torch.tensor(image).permute(2, 0, 1).float().div(255)  # (H, W, 3) uint8 -> (3, H, W)
        if model.in_channels == 1:
            x = x.mean(0, keepdim=True)
        x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True)
        x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        top = probs.topk(args.top)
        shown = ", ".join(f"class {i} ({p:.3%})" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"  {filename.rsplit('/', 1)[-1]}: {shown}")
    return 0

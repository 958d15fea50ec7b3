"""``cnnlab latent RUN``: an autoencoder run's code against PCA at the same size (MSE, k-NN, linear probe, 2-D map)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "latent", help="an autoencoder's code vs PCA of the same size (MSE, k-NN, probe, map)",
        description="Encode a reconstruction run's training and test images and compare the codes with PCA "
                    "keeping as many components: test reconstruction MSE (pixels in [0, 1]), k-NN and linear-probe "
                    "accuracy of the codes (labels seen only by the classifiers), and a 2-D map of the test codes "
                    "coloured by class. Writes latent.json and latent_map.png to --out (default RUN/latent/).")
    p.add_argument("run", help="a reconstruction run folder (cnnlab train --model conv_autoencoder ...)")
    p.add_argument("--out", help="output folder (default: RUN/latent); the run's own files are never changed")
    p.add_argument("--train-limit", type=int, default=10_000, help="training images for PCA and the classifiers")
    p.add_argument("--test-limit", type=int, default=None, help="test images scored (default: all)")
    p.add_argument("--knn", type=int, default=5, help="neighbours of the k-NN classifier (default 5)")
    p.add_argument("--map", choices=("tsne", "pca", "none"), default="tsne", help="the 2-D map (default t-SNE)")
    p.add_argument("--checkpoint", choices=("best", "last"))
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_latent)


def cmd_latent(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    from cnnlab._errors import CnnlabError
    from cnnlab._io import atomic_write_text
    from cnnlab.data.config import DataConfig
    from cnnlab.analysis.latent import compare_with_pca, plot_code_map
    from cnnlab.engine.runs import load_run
    from cnnlab.engine.tasks import get_task
    from cnnlab.engine.tasks.reconstruction import image_targets
    from cnnlab.engine.trainer import resolve_device

    for flag, value in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if value is not None and value < 2:
            raise CnnlabError(f"{flag} must be >= 2 images, got {value}")
    run = load_run(args.run, args.checkpoint)
    if run.task != "reconstruction":
        raise CnnlabError(f"{args.run} is a {run.task} run; `cnnlab latent` compares an autoencoder's code "
                          "(a reconstruction run) with PCA")
    device = resolve_device(args.device)
    task = get_task(run.task, loss=run.config.loss)
    # the run's own split and normalisation (the model's input), without its augmentation: the codes of the images
    d = run.config.data
    run.config.data = replace(DataConfig(), name=d.name, root=d.root, download=d.download, val_fraction=d.val_fraction,
                              image_size=d.image_size, normalize=d.normalize, batch_size=d.eval_batch_size,
                              eval_batch_size=d.eval_batch_size, num_workers=d.num_workers)
    data = task.build_data(run.config, device)
    model = run.model.to(device)
    result = compare_with_pca(model, data.train, data.test, lambda x: image_targets(x, data.preprocess),
                              train_limit=args.train_limit, test_limit=args.test_limit, knn_k=args.knn,
                              seed=run.config.seed)
    out = Path(args.out) if args.out else Path(args.run) / "latent"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.run} ({run.tag} checkpoint): {result.train_images} training and {result.test_images} test images "
          f"of {run.config.data.name}")
    print(result.table())
    atomic_write_text(out / "latent.json", json.dumps({"run": str(args.run), "checkpoint": run.tag, **result.to_dict()},
                                                      indent=2) + "\n")
    print(f"wrote {out / 'latent.json'}")
    if args.map != "none":
        print(f"wrote {plot_code_map(out / 'latent_map.png', result.test_codes, result.test_labels, run.classes, method=args.map)}")
    return 0

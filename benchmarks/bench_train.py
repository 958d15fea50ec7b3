"""Training throughput: cnnlab's loop versus a plain PyTorch loop on Fashion-MNIST, same model and batch.

Plain loop (the usual tutorial code): torch DataLoader over the same uint8 images, per-sample
torchvision transforms (PIL image -> RandomHorizontalFlip -> RandomCrop(28, padding=2) -> ToTensor
-> Normalize), fp32, contiguous memory, 2 workers. cnnlab loop: the images as one tensor,
flip + pad-crop done on whole batches, channels_last, bf16 autocast where the CPU has bf16 units
(as ``cnnlab demo`` runs). A third line runs cnnlab's loader with fp32/contiguous compute, to
separate the data pipeline's share from the compute settings'.

    python benchmarks/bench_train.py [--batches 40] [--batch-size 256] [--threads 2]

Both loops time the same number of optimisation steps after a warm-up; wall-clock images/s
and process CPU time are printed (on a shared machine, CPU time is the steadier figure).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def plain_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, workers: int, mean: float, std: float):
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(28, padding=2), T.ToTensor(), T.Normalize((mean,), (std,))])

    class DS(torch.utils.data.Dataset):  # what torchvision.datasets.FashionMNIST.__getitem__ does
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i, 0].numpy(), mode="L")), int(labels[i])

    return torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def run(model, batches, steps: int, amp: bool, channels_last: bool) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    it = iter(batches)
    seen, start, cpu = 0, None, None
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded (oneDNN kernel selection, worker start)
            start, cpu, seen = time.perf_counter(), time.process_time(), 0
        x, y = next(it)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start), time.process_time() - cpu


def main() -> None:
    from cnnlab import create_model
    from cnnlab._platform import cpu_has_bf16
    from cnnlab.data.augment import Compose, RandomCrop, RandomFlip
    from cnnlab.data.datasets import fashion_mnist
    from cnnlab.data.loader import TensorLoader
    from cnnlab.data.preprocess import Normalize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = fashion_mnist()
    norm = Normalize.fit(data.train_images)
    aug = Compose([RandomFlip(), RandomCrop(2)])
    bf16 = cpu_has_bf16()
    results = {}
    for label, loader, amp, cl in (
        ("plain PyTorch (DataLoader + per-sample torchvision transforms, fp32)",
         lambda: plain_loader(data.train_images, data.train_labels, args.batch_size, args.workers, norm.mean[0], norm.std[0]),
         False, False),
        ("cnnlab loader, fp32 contiguous", lambda: TensorLoader(data.train_images, data.train_labels, args.batch_size,
         shuffle=True, drop_last=True, transform=aug, preprocess=norm), False, False),
        (f"cnnlab (batched aug, channels_last{', bf16' if bf16 else ''})", lambda: TensorLoader(
            data.train_images, data.train_labels, args.batch_size, shuffle=True, drop_last=True, transform=aug,
            preprocess=norm, channels_last=True), bf16, True),
    ):
        torch.manual_seed(0)
        model = create_model("fmnist_net")
        if cl:
            model = model.to(memory_format=torch.channels_last)
        speed, cpu = run(model, loader(), args.batches, amp, cl)
        results[label] = speed
        print(f"{label:<75} {speed:8.0f} images/s  ({cpu:.1f} s CPU in this process)", flush=True)
    names = list(results)
    print(f"\nratio cnnlab / plain: {results[names[2]] / results[names[0]]:.2f}x "
          f"(data pipeline alone: {results[names[1]] / results[names[0]]:.2f}x); "
          f"fmnist_net, batch {args.batch_size}, {args.threads} threads, {args.batches} steps each")


if __name__ == "__main__":
    main()

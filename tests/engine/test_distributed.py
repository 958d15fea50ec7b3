"""Distributed training helpers: sharding like DistributedSampler, and 2 gloo processes on the CPU under DDP."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.augment import RandomFlip
from cnnlab.data.loader import TensorLoader
from cnnlab.engine import distributed as D


def _data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(n: int = 48, batch_size: int = 8, transform=None, drop_last: bool = False) -> TensorLoader:
    x, y = _data(n)
    return TensorLoader(x, y, batch_size, shuffle=True, drop_last=drop_last, transform=transform, seed=3)


@pytest.mark.parametrize("n", [48, 45])
def test_shards_are_disjoint_and_cover_the_epoch(n):
    loader = _loader(n)
    shards = [D.ShardedTensorLoader(loader, r, 2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    a, b = (s.indices() for s in shards)
    assert len(a) == len(b) == -(-n // 2) and len(shards[0]) == len(shards[1])  # same step count: DDP never waits
    assert set(a.tolist()) | set(b.tolist()) == set(range(n))
    assert len(set(a.tolist()) & set(b.tolist())) == (2 * len(a) - n)  # only the padding repeats
    # the two local batches of step i are exactly the single-process batch i (global batch semantics)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    first = torch.cat([a[:4], b[:4]]).sort().values
    assert torch.equal(first, order[:8].sort().values)
    batches = list(shards[1])
    assert batches[0][0].shape == (4, 1, 8, 8) and batches[0][0].dtype == torch.float32
    shards[0].set_epoch(2)
    assert not torch.equal(shards[0].indices(), a)  # a new epoch reshuffles


def test_image_folder_batches_are_sharded_by_a_distributed_sampler(tmp_path):
    import numpy as np
    from PIL import Image

    from cnnlab.engine.config import DataConfig
    from cnnlab.engine.data_setup import build_data

    for i in range(15):  # 12 training images (every 5th is test)
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(tmp_path / f"c{i % 3}" / f"{i}.png")
    data = build_data(DataConfig(name=str(tmp_path), batch_size=4, num_workers=0), torch.device("cpu"))
    shards = [D.shard_batches(data.train, r, 2) for r in range(2)]
    assert all(isinstance(s, D.ShardedFolderBatches) and len(s) == 3 for s in shards)  # 6 images each, batches of 2
    a, b = (list(iter(s.sampler)) for s in shards)
    assert sorted(a + b) == list(range(12))
    x, y = next(iter(shards[0]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (2,)
    shards[0].set_epoch(1)
    assert list(iter(shards[0].sampler)) != a


def test_ranks_augment_with_their_own_randomness():
    # the same images on both ranks (no shuffle, world 1 per loader) must be flipped differently
    x, y = _data(16)
    loader = TensorLoader(x, y, 16, shuffle=False, transform=RandomFlip(), seed=0)
    r0 = next(iter(D.ShardedTensorLoader(loader, 0, 1)))[0]
    r0_again = next(iter(D.ShardedTensorLoader(loader, 0, 1)))[0]
    r1 = next(iter(D.ShardedTensorLoader(loader, 1, 2)))[0]
    assert torch.equal(r0, r0_again)
    assert not torch.equal(r0[1::2], r1)  # rank 1 holds images 1, 3, 5, ... of rank-0-of-1's batch


def test_bad_sharding_is_an_error():
    with pytest.raises(CnnlabError, match="batch_size=9 is the global batch"):
        D.ShardedTensorLoader(_loader(batch_size=9), 0, 2)
    with pytest.raises(CnnlabError, match="rank 2 is outside"):
        D.ShardedTensorLoader(_loader(), 2, 2)


def test_single_process_env_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = D.setup_distributed(torch.device("cpu"))
    model, loader = nn.Linear(2, 2), _loader()
    assert not env.enabled and env.is_main and env.wrap(model) is model and D.is_main_process()
    assert env.shard(loader) is loader
    assert env.broadcast("x") == "x" and env.reduce_row({"train_loss": 1.0}) == {"train_loss": 1.0}


def test_missing_torchrun_variables_are_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(CnnlabError, match="torchrun"):
        D.setup_distributed(torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if norm else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _fit(model: nn.Module, batches, env: D.DistEnv | None = None) -> list[int]:
    net = env.wrap(model) if env else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    steps = 0
    for x, y in batches:
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return [steps]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.setup_distributed(torch.device("cpu"))
    try:
        results = {}
        for norm in (False, True):
            model = _model(norm)
            if rank == 1:  # DDP must replace a different initialisation by rank 0's
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            batches = D.ShardedTensorLoader(_loader(), env.rank, env.world_size)
            steps = _fit(model, batches, env)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            env.sync_buffers(model)
            results[norm] = {"state": model.state_dict(), "before_sync": before, "steps": steps,
                             "indices": batches.indices()}
        results["row"] = env.reduce_row({"train_loss": float(rank), "train_acc": 0.5, "images_per_s": 10.0,
                                          "val_loss": float(rank)})
        results["name"] = env.broadcast(f"run-of-rank-{rank}")
        results["main"] = (env.is_main, D.is_main_process())
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        D.cleanup()


def test_two_gloo_processes_train_identical_weights(tmp_path):
    """2 ranks x 1 epoch under DDP: identical weights, disjoint shards, and the same result as one process."""
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for norm in (False, True):
        s0, s1 = r0[norm]["state"], r1[norm]["state"]
        assert r0[norm]["steps"] == r1[norm]["steps"] == [6]  # 48 images / global batch 8: 6 steps of 4 images per rank
        for key in s0:
            assert torch.equal(s0[key], s1[key]), key
        assert not set(r0[norm]["indices"].tolist()) & set(r1[norm]["indices"].tolist())
    # BatchNorm statistics come from each rank's own shard: they differ until sync_buffers copies rank 0's
    assert not torch.equal(r0[True]["before_sync"]["1.running_mean"], r1[True]["before_sync"]["1.running_mean"])
    # without BatchNorm, averaging the gradients of two half batches = the gradient of the whole batch
    single = _model(False)
    _fit(single, _loader())
    for key, value in single.state_dict().items():
        torch.testing.assert_close(r0[False]["state"][key], value, atol=1e-5, rtol=1e-4)
    assert r0["row"] == r1["row"] == {"train_loss": 0.5, "train_acc": 0.5, "images_per_s": 20.0, "val_loss": 0.0}
    assert r0["name"] == r1["name"] == "run-of-rank-0"
    assert r0["main"] == (True, True) and r1["main"] == (False, False)


@pytest.mark.slow
def test_cnnlab_train_under_torchrun(tmp_path):
    """The real command on 2 CPU processes: one run folder written by rank 0, the same test result on both ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cnnlab.cli.main",
           "train", "--model", "simple_cnn_bn", "--data", "digits", "--epochs", "1", "--device", "cpu",
           "--out-dir", str(tmp_path), "--name", "ddp", "--set", "data.batch_size=64", "--set", "data.train_limit=512",
           "--set", 'model.options={"hidden": [32]}', "--set", "data.val_fraction=0.1", "--set", "plots=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("parameters,") == 1  # only rank 0 logs
    assert "7 steps per epoch" in out  # 461 training images / global batch 64, as on one process
    results = [line for line in out.splitlines() if line.startswith("test accuracy")]
    assert len(results) == 1  # rank 0 reports, once
    run = tmp_path / "ddp"
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the header and one epoch, written once
    saved = json.loads((run / "results.json").read_text())
    printed = re.match(r"test accuracy (\d\.\d{4}), .* on (\d+) images", results[0])
    assert printed, results[0]
    assert float(printed[1]) == round(saved["test_accuracy"], 4)  # the number printed is the one saved
    assert int(printed[2]) == 360 == sum(map(sum, saved["confusion"]))  # the whole test split, not one rank's half

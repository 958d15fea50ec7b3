"""torch.distributed for the trainer: one process per device under ``torchrun``, DDP, sharded batches, rank-0 writes.

``torchrun --nproc_per_node=N -m cnnlab.cli.main train ...`` starts N copies of the same
command; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`setup_distributed` reads them and returns a :class:`DistEnv` whose
methods the trainer calls at the few places where a distributed run differs:

- ``env.device``: ``cuda:<local rank>`` on GPUs (one process per GPU), the CPU otherwise;
- ``env.broadcast(obj)``: rank 0's value everywhere (the run folder name holds a date);
- ``env.shard(data)``: each rank trains on its own ``1/N`` of every epoch, like
  ``DistributedSampler``; ``data.batch_size`` stays the *global* batch (each rank takes
  ``batch_size / N``), so a config means the same optimisation on 1 or N processes;
- ``env.wrap(model)``: ``DistributedDataParallel`` (gradients averaged over ranks);
- ``env.sync_buffers(model)``: rank 0's BatchNorm statistics everywhere before evaluating;
- ``env.reduce_row(row)``: the epoch's training metrics averaged over ranks, its validation
  metrics rank 0's, so every rank takes the same early-stopping decision;
- ``env.barrier()``, ``env.is_main``: only rank 0 writes files; the others wait where they read them.

Outside torchrun (``WORLD_SIZE`` unset or 1) every method is the identity: single-process
runs are unchanged, bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.loader import TensorLoader, prepare_batch

# epoch metrics (every task's train_<metric>) are averaged over ranks (each rank has the same number of
# samples); throughput adds up
_SUM_KEYS = ("images_per_s",)


@dataclass
class DistEnv:
    """Where this process stands in a distributed run (``world_size == 1``: not distributed).

    Args:
        rank: global rank; local_rank: rank on this machine (its GPU index); world_size: processes in all.
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, data: Any) -> Any:
        """The DataBundle with its training batches split over the ranks (validation and test stay whole)."""
        if not self.enabled:
            return data
        return dataclasses.replace(data, train=shard_batches(data.train, self.rank, self.world_size))

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)``: same initial weights on every rank (rank 0's), gradients averaged."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, *models: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank, for each distinct model.

        DDP broadcasts buffers *before* each training forward, which then updates them from the
        local shard: after the last step they differ a little between ranks (and so do an EMA's).
        """
        if not self.enabled:
            return
        for model in {id(m): m for m in models}.values():
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def reduce_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """One epoch row for every rank: training loss/accuracy averaged and throughput summed over the
        ranks (each trains on its own shard), every other value (validation metrics) taken from rank 0,
        so all ranks take the same early-stopping and best-checkpoint decisions."""
        if not self.enabled:
            return row
        means = [k for k in row if k.startswith("train_") and isinstance(row[k], (int, float))]
        keys = [k for k in (*means, *_SUM_KEYS) if row.get(k) is not None]
        values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values)
        out = self.broadcast(dict(row))
        for key, value in zip(keys, values.tolist()):
            out[key] = value / self.world_size if key in means else value
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup_distributed(device: torch.device, backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes in the environment; a single process gets a no-op DistEnv.

    Args:
        device: the device the config asks for (``resolve_device``); on CUDA each rank takes
            ``cuda:<LOCAL_RANK>``.
        backend: ``nccl`` for CUDA and ``gloo`` for the CPU unless given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=device)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CnnlabError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch distributed runs with "
                          "torchrun --nproc_per_node=N (it sets them)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CnnlabError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                              "use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shard_batches(batches: Any, rank: int, world_size: int) -> Any:
    """Training batches of one rank: a :class:`ShardedTensorLoader` or a folder loader on a DistributedSampler."""
    if isinstance(batches, TensorLoader):
        return ShardedTensorLoader(batches, rank, world_size)
    if hasattr(batches, "shard"):  # batches that know how to split themselves (detection data)
        return batches.shard(rank, world_size)
    if hasattr(batches, "loader") and hasattr(batches.loader, "dataset"):
        return ShardedFolderBatches(batches, rank, world_size)
    raise CnnlabError(f"cannot split {type(batches).__name__} batches over {world_size} processes")


def _local_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise CnnlabError(f"data.batch_size={batch_size} is the global batch and must divide evenly over "
                          f"{world_size} processes: use a multiple of {world_size}")
    return batch_size // world_size


class ShardedTensorLoader:
    """Rank ``rank``'s share of a :class:`TensorLoader`'s epoch, as ``DistributedSampler`` would pick it.

    Every rank draws the same permutation (a CPU generator seeded by (seed, epoch)), pads it to a
    multiple of ``world_size`` by repeating its head and takes every ``world_size``-th index from
    ``rank``: the shards are disjoint (up to the padding) and together cover the epoch. Each rank
    then cuts its shard into batches of ``batch_size / world_size`` and augments them with its own
    generator, so ranks do not apply the same random crops to different images in lockstep.

    Args:
        loader: the single-process training loader (its tensors, batch size, transforms, seed).
        rank, world_size: this process and how many there are.
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise CnnlabError(f"rank {rank} is outside 0..{world_size - 1}")
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.batch_size = _local_batch(loader.batch_size, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def _shard_size(self) -> int:
        return -(-len(self.loader.images) // self.world_size)

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.loader.drop_last else -(-n // self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in training order (CPU)."""
        n = len(self.loader.images)
        seed = self.loader.seed * 1_000_003 + self.epoch
        if self.loader.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        padded = self._shard_size() * self.world_size
        order = torch.cat([order, order[:padded - n]]) if padded > n else order  # as DistributedSampler pads
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        src = self.loader
        device = src.images.device
        idx = self.indices().to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed((src.seed * 1_000_003 + self.epoch) * 131 + self.rank)  # rank-own augmentation
        for i in range(len(self)):
            batch = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield prepare_batch(src.images[batch], src.labels[batch], src.transform, src.preprocess,
                                src.channels_last, gen)


class ShardedFolderBatches:
    """Image-folder training batches of one rank: the folder's DataLoader rebuilt on a ``DistributedSampler``.

    Args:
        batches: the single-process folder batches (``cnnlab.engine.data_setup``): their DataLoader,
            device, transform, preprocessing and seed are reused.
        rank, world_size: this process and how many there are.
    """

    def __init__(self, batches: Any, rank: int, world_size: int) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        base = batches.loader
        self.src, self.rank, self.epoch = batches, rank, 0
        self.sampler = DistributedSampler(base.dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=batches.seed)
        self.loader = DataLoader(base.dataset, batch_size=_local_batch(base.batch_size, world_size),
                                 sampler=self.sampler, num_workers=base.num_workers, drop_last=base.drop_last,
                                 persistent_workers=base.num_workers > 0, pin_memory=base.pin_memory)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.src
        gen = torch.Generator(device=s.device).manual_seed((s.seed * 1_000_003 + self.epoch) * 131 + self.rank)
        for x, y in self.loader:
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            yield prepare_batch(x, y, s.transform, s.preprocess, s.channels_last, gen)


def is_main_process() -> bool:
    """False on every rank but 0 of a started process group (so the CLI prints its summary once)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def cleanup() -> None:
    """Leave the process group (end of a distributed run)."""
    if dist.is_initialized():
        dist.destroy_process_group()

"""Several processes, one model: ranking and fine-tuning sharded with DistributedDataParallel.

    torchrun --nproc_per_node 4 -m filterprune prune --model model.safetensors --data DIR

or, in your own script run under torchrun:

    ctx = distributed.setup()
    ctx.sync(model)                       # every process starts from rank 0's weights
    train = ctx.sharded_loader(train_set, 32, shuffle=True, seed=0)
    ranking = ctx.sharded_loader(rank_set, 32)
    model, log = prune_iteratively(model, example, train, test_loader, schedule, rank_loader=ranking,
                                   context=ctx, device=ctx.device, checkpoint_dir="ckpt")
    ctx.teardown()

Ranking statistics are summed over processes (`Context.reduce`), so every process scores every channel
alike and removes the same ones; its shards repeat no example, so the sums equal one process's
sums over the whole data set. Training shards are padded to equal size (DDP needs every process
to take the same number of steps). The backend is gloo on CPU and nccl on GPU. Per process:
batch sizes, rank_batches. taylor-weight takes |.| per batch, so its scores depend on how the
data is batched (and sharded); the other data criteria are sums over single examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .data import default_pin_memory, make_loader

T = TypeVar("T")


@dataclass
class Context:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group (a single process)
    owns_group: bool = False  # whether setup() created the process group (teardown then destroys it)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all processes, as a new tensor of t's device and dtype (t is left alone)."""
        if self.world_size == 1:
            return t.clone()
        x = t.detach().to(self.device, copy=True)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def mean(self, value: float) -> float:
        """The mean of `value` over all processes (the training loss of equal shards, for instance)."""
        one = torch.ones(1, dtype=torch.float64)
        return (self.reduce(one * value) / self.reduce(one)).item()

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run in rank 0 only, its result given to every process. For measurements: latency (and
        accuracy, BatchNorm statistics being per process) would differ between processes, and the
        decisions taken on them must not."""
        if self.world_size == 1:
            return fn()
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module, **ddp_options) -> nn.Module:
        """The module to train: DDP over `model` (call again after every surgery), or `model` itself."""
        if self.world_size == 1:
            return model
        ids = [self.local_rank] if torch.device(self.device).type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_options)

    def sync(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every process's `model`."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                x = t.to(self.device)
                dist.broadcast(x, src=0)
                t.copy_(x)

    def sharded_loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                       num_workers: int = 0) -> DataLoader:
        """This process's share of `dataset`.

        shuffle=True (training): a DistributedSampler, padded so that every process takes the same
        number of steps; each pass draws a new order from the loader's generator (seeded by `seed`,
        equal in every process), so epochs differ, processes agree, and reseeding the generator
        (prune_iteratively does, per iteration) replays the same orders. shuffle=False (ranking):
        examples rank, rank + world_size, ... with no padding, so every example counts once.
        """
        if self.world_size == 1:
            return make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)
        generator = torch.Generator().manual_seed(seed)
        sampler = (_Shuffled(dataset, self.world_size, self.rank, generator) if shuffle
                   else _Strided(len(dataset), self.world_size, self.rank))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=False,
                          generator=generator, persistent_workers=num_workers > 0, pin_memory=default_pin_memory())

    def teardown(self) -> None:
        """Leave the process group (if this process joined one)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


class _Strided(Sampler[int]):
    """Indices rank, rank + world, ...: disjoint shards that together hold every index exactly once."""

    def __init__(self, size: int, world: int, rank: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Shuffled(DistributedSampler):
    """A DistributedSampler whose every pass shuffles anew, seeded from `generator` (see sharded_loader)."""

    def __init__(self, dataset: Dataset, world: int, rank: int, generator: torch.Generator) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=False)
        self.generator = generator

    def __iter__(self):
        # DistributedSampler shuffles with seed + epoch; a fresh seed per pass makes epochs differ
        # without set_epoch (which still works) and follows the generator's seeding.
        self.seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        return super().__iter__()


def setup(device: str | None = None, timeout_minutes: float = 60) -> Context:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK; join the process group if there are several.

    device: "cpu", "cuda" or None/"auto" (cuda if available). Under torchrun a GPU process uses
    cuda:LOCAL_RANK with nccl; a CPU one uses gloo. A single process joins no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return Context(device=str(device))
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        # Generous timeout: the other processes wait while rank 0 evaluates and measures.
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    return Context(rank, world, local, str(device), backend, owns)

"""Process-group set-up for ``torchrun``, the device choice, and deterministic, resumable sampling.

Nothing here launches processes: multi-GPU and multi-node runs use ``torchrun`` (it sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and a plain ``python``/``sfdaseg`` call is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' was asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank), device


def get_dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of the global stream (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class StreamSampler(Sampler):
    """An endless, resumable stream of ``(index, seed)`` pairs for one rank.

    The global stream is the concatenation of one random permutation of the dataset per epoch (permutation ``e``
    drawn from ``seed + e``). Rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``, starting at global
    position ``start``. Each pair carries a per-sample seed derived from ``(seed, position)`` that
    :class:`SeededDataset` uses for the random augmentation, so a sample's crop and flip depend only on where it
    sits in the stream: not on the number of workers, not on the world size, and not on whether the run was
    interrupted and resumed (resume passes ``start = steps_done * global_batch``).
    """

    def __init__(self, length: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True) -> None:
        if length <= 0:
            raise ValueError("StreamSampler: the dataset is empty")
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.start, self.shuffle = start, shuffle

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start + self.rank
        epoch, perm = -1, None
        while True:
            e, i = divmod(pos, self.length)
            if e != epoch:
                epoch, perm = e, self._perm(e).tolist()
            yield perm[i], sample_seed(self.seed, pos)
            pos += self.world_size


class SeededDataset(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` seeds torch's RNG before the (random) transform runs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed = key
        # The worker's global RNG is re-seeded per sample: torchvision transforms v2 draw from it.
        torch.manual_seed(seed)
        return self.dataset[index]


class ShardSampler(Sampler):
    """Indices ``rank, rank + W, ...``: every sample is seen by exactly one rank (no padding, no duplicates),
    which keeps a distributed evaluation's confusion matrix exact."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

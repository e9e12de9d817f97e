"""Which rows this process extracts: one process, ``--shard i/n``, or a torchrun rank.

Shard ``i`` of ``n`` computes the parts ``k % n == i``: no padding, no overlap, and the shard
that finishes last consolidates. Under ``torchrun`` the shard is the rank; ranks meet at a
barrier, rank 0 consolidates, and every rank returns the cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

from featprobe.errors import FeatprobeError

# Long: rank 0 consolidates while the others wait, and a big cache takes a while to write.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1
    torchrun: bool = False  # ranks of one torch.distributed job (barriers, rank 0 merges)
    local_rank: int = 0
    local_count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    def parts(self, n_parts: int) -> list[int]:
        return [k for k in range(n_parts) if k % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | tuple[int, int] | None) -> Shard | None:
    """``"i/n"`` or ``(i, n)`` → Shard; ``None`` → None. Indices start at 0."""
    if spec is None:
        return None
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise FeatprobeError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}")
        i, n = int(m[1]), int(m[2])
    else:
        i, n = (int(x) for x in spec)
    if n < 1 or not 0 <= i < n:
        raise FeatprobeError(f"--shard {i}/{n}: need 0 <= i < n (shards are numbered from 0)")
    return Shard(i, n)


def from_environment() -> Shard | None:
    """The torchrun rank, when this process is one rank of several; else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return Shard(rank, world, torchrun=True, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 local_count=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve(shard: str | tuple[int, int] | None) -> Shard:
    """The caller's ``--shard``, or torchrun's rank, or the whole dataset."""
    explicit = parse_shard(shard)
    ranked = from_environment()
    if explicit is not None and ranked is not None:
        raise FeatprobeError("--shard is for independent jobs (SLURM arrays); under torchrun "
                             "the ranks are the shards, so leave it out")
    return explicit or ranked or Shard()


def device_for(shard: Shard, device: str) -> str:
    """Under torchrun with several GPUs per node, rank ``r`` uses ``cuda:LOCAL_RANK``."""
    if shard.torchrun and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
        return "cpu" if device == "auto" else device
    return device


class ProcessGroup:
    """Joins (or reuses) the torch.distributed group for barriers; a no-op for other shards."""

    def __init__(self, shard: Shard, device_type: str):
        self.shard = shard
        self.owned = False
        if not shard.torchrun:
            return
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
            except Exception as e:  # a rendezvous problem is the user's setup, not a bug
                raise FeatprobeError(f"torch.distributed could not start ({backend}): {e}"
                                     ) from None
            self.owned = True
        if device_type == "cuda":
            import torch

            torch.cuda.set_device(shard.local_rank % torch.cuda.device_count())
        if dist.get_world_size() != shard.count or dist.get_rank() != shard.index:
            raise FeatprobeError("WORLD_SIZE/RANK do not match the initialised process group")

    def barrier(self) -> None:
        if self.shard.torchrun:
            self.dist.barrier()

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()

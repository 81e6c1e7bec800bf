"""Data parallelism across processes, as `torchrun` or `accelerate launch` start them (DDP semantics, by hand).

Every process builds the same model from the same seed and reads the same batch plan; each takes its share of
every micro-batch (`shard`), and after the backward passes the gradients are summed over all processes before
the optimizer step. Since the loss is normalised by the answer tokens of the whole step, not of the share, the
summed gradient is the one a single process would get for the same step: N processes train the same adapter as
one, N times faster per step. Only rank 0 writes checkpoints, the adapter and the report.

The all-reduce is done here rather than by wrapping the model in DistributedDataParallel: the loss calls the
decoder and the LM head separately (see loop.answer_loss), past the wrapper's forward that DDP needs, and a
process whose share of a small last batch is empty must still join the all-reduce.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        return list(indices[self.rank :: self.size])

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over all processes, in one flat all-reduce."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:  # this process had no examples in the step
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def sum(self, value: float, device: torch.device) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()

    def close(self) -> None:
        if self.size > 1:
            dist.barrier()
            dist.destroy_process_group()


def join() -> tuple[World, torch.device]:
    """This process's place among those started together (WORLD_SIZE, RANK, LOCAL_RANK) and its device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if size == 1:
        return World(), device
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    log.info("data-parallel process %d of %d on %s", world.rank, world.size, device)
    return world, device

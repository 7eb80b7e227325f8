"""Data-parallel training across processes launched by `torchrun` (gloo on CPU, NCCL on CUDA).

Every process holds the whole model and the same adapter (broadcast from rank 0 at the start). Each optimizer
step's global batch is the same rows as in a single-process run; each rank runs its share of them and the
trainable gradients are summed with one all-reduce per optimizer step (after gradient accumulation), so the
update equals the single-process one. LoRA gradients are small (a few MB), so one flat all-reduce per step
costs less than DistributedDataParallel's per-bucket hooks and needs no `no_sync` around accumulation.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether `init` created the process group (and `close` should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Context:
    """Join the process group torchrun describes in the environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world <= 1:
        return Context(device=device if cuda else torch.device("cpu"))
    started = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, started)


def close(ctx: Context) -> None:
    if ctx.started and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_params(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values (adapter initialisations drawn on each rank may differ)."""
    if ctx.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def sum_grads(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks, in one flat all-reduce."""
    if ctx.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def sum_scalar(ctx: Context, value: float, device: torch.device) -> float:
    if ctx.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_flag(ctx: Context, flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any rank (so all ranks stop at the same step)."""
    return sum_scalar(ctx, float(flag), device) > 0 if ctx.world > 1 else flag


def gather(ctx: Context, obj: Any) -> list[Any]:
    """`obj` of every rank, by rank."""
    if ctx.world <= 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()

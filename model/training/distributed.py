"""torch.distributed helpers: one training script runs alone or under torchrun on N GPUs (or N CPU processes).

    torchrun --standalone --nproc_per_node=4 -m model.train adclick --config FILE

Every rank builds the same model from the same seed, trains on its own shard of the data, and DDP averages the
gradients, so all ranks hold identical weights after every step; only rank 0 writes checkpoints and logs
results. Alone (no torchrun), `init()` returns a world of one and every helper is a no-op.

torchrun passes RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment; this module
is the one place in model/ that reads them (`init_process_group("env://")` reads the rest).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""  # "" when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, env: Mapping[str, str] | None = None, backend: str = "") -> DistContext:
    """Join the process group torchrun set up. `device` is the resolved training device (model/device.py):
    on CUDA each rank takes GPU LOCAL_RANK and NCCL; on CPU, gloo. `backend="gloo"` on CUDA lets several
    ranks share one GPU (NCCL refuses that): slower, meant for checks on a one-GPU machine."""
    env = os.environ if env is None else env
    if not launched_by_torchrun(env):
        return DistContext(device=device)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        backend = backend or "nccl"
        count = torch.cuda.device_count()
        if backend == "nccl" and local >= count:
            raise RuntimeError(
                f"LOCAL_RANK {local} but only {count} CUDA devices (one rank per GPU with NCCL)"
            )
        device = torch.device("cuda", local % count)
        torch.cuda.set_device(device)
    else:
        backend = backend or "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local, device, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def cleanup(ctx: DistContext) -> None:
    """Leave the group together: a rank that tears gloo down while a peer still works (rank 0 saving the last
    checkpoint) can abort with "terminate called without an active exception"."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over `model` (already on ctx.device) when distributed; the model itself otherwise.
    Parameters are broadcast from rank 0 at construction, so all ranks start identical."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (for state_dict / checkpoints)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of `items`: every world_size-th item from `rank`, padded by wrap-around so every rank
    gets the same count (DDP steps must match across ranks)."""
    items = list(items)
    if not ctx.distributed or not items:
        return items
    per_rank = -(-len(items) // ctx.world_size)
    padded = (items * (1 + ctx.world_size * per_rank // len(items)))[: ctx.world_size * per_rank]
    return padded[ctx.rank :: ctx.world_size]


def broadcast_module(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction), for loops that call
    a model's own methods (encode/decode) instead of a DDP forward and sync with `average_gradients`."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for tensor in unwrap(model).state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(model: nn.Module, ctx: DistContext) -> None:
    """All-reduce-mean every gradient (flattened into one buffer per dtype); call between backward() and the
    optimizer step. Parameters without a gradient on this rank count as zero, so every rank makes the same
    collective calls even when a step leaves a branch unused."""
    if not ctx.distributed:
        return
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(ctx.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on any (agreeing on a time-budget stop avoids a deadlock)."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_max(value: float, ctx: DistContext) -> float:
    """Max of a scalar over ranks (e.g. elapsed time, so a time-based schedule is the same on every rank)."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a scalar (a loss, a metric) over ranks."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank (e.g. the version name rank 0 chose, or its early-stop decision)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it: rank 0 builds a cache or prompt file, the others
    then find and load it instead of building it again (or racing to write it)."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def fingerprint(model: nn.Module) -> str:
    """sha256 over parameters and buffers (names, shapes, exact bytes): equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return h.hexdigest()

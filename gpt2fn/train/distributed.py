"""Data parallel over processes with `torch.distributed`: gloo on CPU, nccl on GPU.

`torchrun --nproc_per_node=K -m gpt2fn.train ...` starts K copies; each calls :func:`setup` (which reads torchrun's
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT` environment) and then runs the same loop:

- every rank starts from the same parameters (same seed or the same file) and draws the same global batch of
  window starts from the shared data generator, keeping its own slice, so K ranks with batch B see exactly the
  windows one process with batch K*B would see;
- gradients (and the loss) are averaged over ranks by :func:`all_reduce_mean`, one flat all-reduce per step;
- only rank 0 writes checkpoints, metrics and plots; a stop request on any rank stops all (:func:`any_rank`).
"""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["DistInfo", "setup", "teardown", "all_reduce_mean", "any_rank", "barrier", "grad_reduce"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (world_size 1: a single process, no torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device | str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or return a single-process `DistInfo`.

    The backend is nccl when `device` is CUDA, gloo otherwise; a group initialised by the caller is reused."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for data parallel, but this torch build has no "
                           "torch.distributed; run a single process")
    backend = "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend)


def teardown(info: DistInfo) -> None:
    """Leave the process group (if this process joined one)."""
    if info.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tree: Any, info: DistInfo) -> Any:
    """The element-wise mean over ranks of every tensor leaf of `tree`, as a new tree.

    The leaves travel as one flat fp32 buffer (one collective per call, not one per tensor)."""
    if not info.active:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    flat = torch.cat([t.detach().float().reshape(-1) for t in leaves])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    out, offset = [], 0
    for t in leaves:
        out.append(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return pytree.tree_unflatten(out, spec)


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one (used to stop all ranks together)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def broadcast_tree(tree: Any, info: DistInfo) -> Any:
    """Rank 0's values of every leaf on all ranks (new tensors)."""
    if not info.active:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    out = []
    for t in leaves:
        t = t.detach().clone()
        dist.broadcast(t, src=0)
        out.append(t)
    return pytree.tree_unflatten(out, spec)


def grad_reduce(info: DistInfo) -> Any:
    """The train step's `reduce` hook: average `(grads, loss)` over the ranks (one all-reduce)."""
    def reduce(grads: Any, loss: Tensor) -> tuple[Any, Tensor]:
        return all_reduce_mean((grads, loss), info)
    return reduce

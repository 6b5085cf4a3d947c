"""Mixed precision as values: the compute dtype, the per-step cast of fp32 master weights, and fp16 loss scaling.

    dtype = compute_dtype("bf16")                       # torch.bfloat16 (fp32: None, i.e. no cast)
    scale = loss_scale_init()                           # LossScale(scale=65536.0, good_steps=0)
    grads, finite = unscale(grads, scale.scale)         # fp32 gradients / scale, and whether all are finite
    scale = loss_scale_update(scale, finite)            # back off on overflow, grow after a run of good steps

The master parameters and AdamW's moments stay fp32; each step differentiates `loss(cast(params, dtype))` with
respect to the fp32 tree, so the matrix products run in the compute dtype and the gradients arrive in fp32 through
the cast's backward (the functional form of `torch.autocast` + fp32 master weights). fp16's narrow range needs the
loss multiplied by a scale before the backward pass and the gradients divided by it after; when any gradient
overflows, the step is skipped (params and moments unchanged) and the scale halves, and after `growth_interval`
good steps in a row it doubles: the rules of `torch.amp.GradScaler`, written as pure functions of a small record
that the training state saves (so a resumed fp16 run continues with the same scale).
"""

from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..devices import parse_dtype

__all__ = ["compute_dtype", "cast_tree", "LossScale", "loss_scale_init", "unscale", "loss_scale_update"]


def compute_dtype(name: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype of `--dtype NAME` (any name of `gpt2fn.devices.DTYPES`: fp32, bf16, fp16, float32, ...), or
    None for fp32 (no cast); a ValueError listing the names for anything else."""
    dtype = parse_dtype(name)
    if dtype is None:
        raise ValueError("dtype must be a name such as fp32, bf16 or fp16, got None")
    return None if dtype == torch.float32 else dtype


def cast_tree(tree: Any, dtype: torch.dtype | None) -> Any:
    """Every floating leaf cast to `dtype` (None: the tree itself). Differentiable: gradients flow back in the
    leaves' own dtype."""
    if dtype is None:
        return tree
    return pytree.tree_map_only(Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


class LossScale(NamedTuple):
    """Dynamic loss scaling's state: the current scale and the count of finite steps since the last change."""

    scale: float
    good_steps: int
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000


def loss_scale_init(scale: float = 2.0 ** 16, *, growth_interval: int = 2000) -> LossScale:
    """GradScaler's defaults: start at 2^16, halve on overflow, double after 2000 finite steps."""
    if not scale > 0 or growth_interval < 1:
        raise ValueError(f"loss scale must be positive and growth_interval >= 1, got {scale}, {growth_interval}")
    return LossScale(float(scale), 0, growth_interval=growth_interval)


def unscale(grads: Any, scale: float) -> tuple[Any, Tensor]:
    """`(grads / scale, all finite)`: the fp32 gradients of the unscaled loss and a 0-d bool tensor that is False
    when any element overflowed to inf or nan (the step must then be skipped)."""
    leaves = [g for g in pytree.tree_leaves(grads) if isinstance(g, Tensor)]
    out = pytree.tree_map_only(Tensor, lambda g: g.float() / scale, grads)
    finite = torch.stack([torch.isfinite(g).all() for g in leaves]).all() if leaves else torch.tensor(True)
    return out, finite


def loss_scale_update(state: LossScale, finite: bool | Tensor) -> LossScale:
    """The next scale: overflow -> scale * backoff and the count restarts; else the count grows and, at
    `growth_interval`, the scale grows by `growth_factor` and the count restarts (as `GradScaler.update`)."""
    if not bool(finite):
        return state._replace(scale=state.scale * state.backoff_factor, good_steps=0)
    good = state.good_steps + 1
    if good >= state.growth_interval:
        return state._replace(scale=state.scale * state.growth_factor, good_steps=0)
    return state._replace(good_steps=good)

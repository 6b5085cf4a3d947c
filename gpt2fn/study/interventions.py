"""Sweeps over an intervention's argument as one batched call: `torch.func.vmap` over steering scales or vectors,
ablation masks, or any tensor an edit is built from, equal to running the edits one by one.

    outs = vmap_edits(params, ids, lambda s: {"blocks.3.resid_pre": steer(direction, scale=s)}, scales)
    outs = steering_sweep(params, ids, "blocks.3.resid_pre", direction, scales=torch.linspace(-8, 8, 17))
    outs = ablation_sweep(params, ids, "blocks.2.attn.z", masks)      # masks [n, heads, 1, 1] bool: which heads

Edits are function arguments, so the edited forward is a function of the edit's tensor and `vmap` maps it over a
leading axis: the layers before the edited site run once (nothing there depends on the mapped tensor), the layers
after run batched. Attention runs on its explicit path (`forward_with(..., explicit_attention=True)`), which `vmap`
batches natively (the fused kernel would fall back to a loop). `chunk_size` bounds how many run at once
(`vmap`'s own chunking). The result is what `torch.stack([f(a) for a in args])` gives, up to float rounding.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.func import vmap

from ..params import GPTParams
from .run import Edit, forward_with, resolve_edits, steer
from .sites import site_dims

__all__ = ["vmap_edits", "steering_sweep", "ablation_sweep"]


def vmap_edits(params: GPTParams, ids: Int[Tensor, "batch seq"], edits: Callable[[Tensor], Mapping[str, Edit]],
               args: Tensor, *, metric: Callable[[Tensor], Tensor] | None = None, chunk_size: int | None = None,
               **forward_kwargs: Any) -> Tensor:
    """`forward_with(params, ids, edit=edits(a))` (then `metric` of the logits, if given) for every `a` along the
    first axis of `args`, as one `torch.func.vmap` call: `[len(args), *result]`. `edits(a)` builds the edit dict
    from one slice (`lambda s: {site: steer(v, scale=s)}`); it must use `a` only in tensor arithmetic (no
    `.item()`, no Python branching on its values), as any `vmap`ped function."""
    if not isinstance(args, Tensor) or args.ndim == 0 or args.shape[0] == 0:
        raise ValueError(f"args must be a tensor with a leading axis to sweep over (e.g. scales [n]); got "
                         f"{list(args.shape) if isinstance(args, Tensor) else type(args).__name__}")
    resolve_edits(params.config, edits(args[0]))  # names checked once, eagerly, with a clear error

    def run(a: Tensor) -> Tensor:
        out, _ = forward_with(params, ids, edit=edits(a), explicit_attention=True, **forward_kwargs)
        return out if metric is None else metric(out)

    return vmap(run, chunk_size=chunk_size)(args)


def steering_sweep(params: GPTParams, ids: Int[Tensor, "batch seq"], site: str,
                   vectors: Float[Tensor, "*n d"], *, scales: Float[Tensor, " n"] | None = None,
                   positions: int | list[int] | None = None, metric: Callable[[Tensor], Tensor] | None = None,
                   chunk_size: int | None = None, **forward_kwargs: Any) -> Tensor:
    """Steer `site` by each of `vectors` `[n, d]` (one run each), or by one vector `[d]` at each of `scales`
    `[n]`: `[n, *result]`, equal to the loop of `forward_with(..., edit={site: steer(v, scale=s,
    positions=positions)})`."""
    if scales is None:
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, d] to sweep over n steering vectors (or give one vector [d] "
                             f"and scales [n]); got {list(vectors.shape)}")
        return vmap_edits(params, ids, lambda v: {site: steer(v, positions=positions)}, vectors, metric=metric,
                          chunk_size=chunk_size, **forward_kwargs)
    if vectors.ndim != 1 or not isinstance(scales, Tensor) or scales.ndim != 1:
        raise ValueError("with scales=, vectors is one direction [d] and scales a tensor [n]; got vectors "
                         f"{list(vectors.shape)}, scales {list(getattr(scales, 'shape', []))}")
    return vmap_edits(params, ids, lambda s: {site: steer(vectors, scale=s, positions=positions)}, scales,
                      metric=metric, chunk_size=chunk_size, **forward_kwargs)


def ablation_sweep(params: GPTParams, ids: Int[Tensor, "batch seq"], site: str, masks: Bool[Tensor, " n *mask"], *,
                   value: Tensor | float = 0.0, metric: Callable[[Tensor], Tensor] | None = None,
                   chunk_size: int | None = None, **forward_kwargs: Any) -> Tensor:
    """Replace `site` by `value` (0: zero-ablation; a mean: mean-ablation) where each mask is True: `masks[i]`
    broadcasts against the site's value without its batch axis (`[heads, 1, 1]` picks heads of `attn.z`,
    `[seq, 1]` positions of a residual site, `[d_mlp]` neurons of `mlp.post`). `[n, *result]`, equal to the loop
    of `forward_with(..., edit={site: lambda x: torch.where(masks[i], value, x)})`."""
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.ndim < 1:
        raise ValueError(f"masks must be a bool tensor [n, ...] (one mask per run); got "
                         f"{getattr(masks, 'dtype', type(masks).__name__)}")
    axes = len(site_dims(site).split()) - 1
    if masks.ndim - 1 > axes:
        raise ValueError(f"each mask has {masks.ndim - 1} axes; site {site!r} has {axes} after batch "
                         f"({site_dims(site)})")

    def edits(m: Tensor) -> dict[str, Edit]:
        def ablate(x: Tensor) -> Tensor:
            return torch.where(m, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)
        return {site: ablate}

    return vmap_edits(params, ids, edits, masks, metric=metric, chunk_size=chunk_size, **forward_kwargs)

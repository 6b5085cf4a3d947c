"""Transforms over the study primitives: activation-patching sweeps as one `vmap`, gradients with respect to any
site (`grad` / `jacrev` through an additive edit), per-example gradients with `vmap(grad)`."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, jacrev, vmap

from ..params import GPTParams
from ..shapes import checked
from .run import forward_with
from .sites import LAYER_SITES, Activations, resolve_sites

__all__ = ["logit_diff", "patching_sweep", "site_grads", "per_example_grads", "per_example_grad_norms"]

Metric = Callable[[Tensor], Tensor]
"""logits `[batch seq vocab]` -> a scalar (or, for `site_grads(jacobian=True)`, any tensor)."""


@checked
def logit_diff(logits: Float[Tensor, "batch seq vocab"], good: int | Tensor, bad: int | Tensor, *,
               position: int = -1) -> Float[Tensor, " batch"]:
    """logit[good] - logit[bad] at `position`, per example (`good`/`bad`: one id, or one per example `[batch]`)."""
    row = logits[:, position]
    pick = (lambda t: row[:, t] if isinstance(t, int) else row.gather(-1, t.to(row.device)[:, None])[:, 0])
    return pick(good) - pick(bad)


def patching_sweep(params: GPTParams, clean_ids: Int[Tensor, "batch seq"], corrupt_ids: Int[Tensor, "batch seq"],
                   metric: Metric, *, site: str = "resid_pre", layers: Sequence[int] | None = None,
                   positions: Sequence[int] | None = None, vectorize: bool = True, chunk_size: int | None = None
                   ) -> Float[Tensor, "layer pos *metric"]:
    """Activation patching: run `corrupt_ids`, replace the per-layer `site` (e.g. `resid_pre`, `attn.z`, `mlp.out`)
    at one (layer, position) by its value on `clean_ids`, and record `metric(logits)`; for every layer x position.

    `vectorize=True` runs the whole grid as one `torch.func.vmap` call (memory: layers x positions forward passes
    at once; `chunk_size` bounds how many run together); `vectorize=False` is the equivalent Python loop.
    """
    cfg = params.config
    if site not in LAYER_SITES:
        raise ValueError(f"site must be a per-layer site, one of {', '.join(LAYER_SITES)}; got {site!r}")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean_ids {list(clean_ids.shape)} and corrupt_ids {list(corrupt_ids.shape)} must have "
                         "the same shape: patching pairs positions one to one")
    seq = clean_ids.shape[1]
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    positions = list(range(seq)) if positions is None else list(positions)
    names = [f"blocks.{i}.{site}" for i in layers]
    resolve_sites(cfg, names, what="patching_sweep")
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=names)
    device = clean_ids.device
    # one-hot rows choosing a position of the sequence: select[p] @ onehot -> mask over seq
    onehot = F.one_hot(torch.tensor(positions, device=device) % seq, seq).to(torch.float32)

    def run(select: Float[Tensor, "layer pos"], explicit: bool) -> Tensor:
        def edit_for(j: int, name: str) -> Callable[[Tensor], Tensor]:
            def edit(x: Tensor) -> Tensor:
                mask = (select[j] @ onehot)[:, None] > 0.5  # [seq, 1]: the positions axis is second to last
                return torch.where(mask, clean[name], x)
            return edit
        logits, _ = forward_with(params, corrupt_ids, edit={n: edit_for(j, n) for j, n in enumerate(names)},
                                 explicit_attention=explicit)
        return metric(logits)

    grid = torch.eye(len(layers) * len(positions), device=device).view(-1, len(layers), len(positions))
    with torch.no_grad():
        if vectorize:
            out = vmap(lambda s: run(s, True), chunk_size=chunk_size)(grid)
        else:
            out = torch.stack([run(s, False) for s in grid])
    return out.reshape(len(layers), len(positions), *out.shape[1:])


def site_grads(params: GPTParams, ids: Int[Tensor, "batch seq"], sites: str | Iterable[str], metric: Metric, *,
               jacobian: bool = False, **forward_kwargs: Any) -> Activations:
    """d metric(logits) / d activation at each named site (names or glob patterns), as `Activations`.

    Computed with `torch.func.grad` (or `jacrev` when `jacobian=True` and the metric is not a scalar) with respect
    to a zero tensor added at each site: the gradient of the downstream computation, holding upstream fixed.
    """
    names = resolve_sites(params.config, sites, what="site_grads")
    with torch.no_grad():
        _, acts = forward_with(params, ids, capture=names, **forward_kwargs)
    zeros = {n: torch.zeros_like(acts[n]) for n in names}

    def f(deltas: dict[str, Tensor]) -> Tensor:
        edits = {n: (lambda x, d=deltas[n]: x + d) for n in names}
        out, _ = forward_with(params, ids, edit=edits, **forward_kwargs)
        return metric(out)

    return Activations((jacrev if jacobian else grad)(f)(zeros))


def _example_loss(params: GPTParams, ids: Int[Tensor, " seq"], targets: Int[Tensor, " seq"], ignore_index: int
                  ) -> Tensor:
    logits, _ = forward_with(params, ids[None], explicit_attention=True)  # vmap batches the explicit path natively
    return F.cross_entropy(logits[0].float(), targets, ignore_index=ignore_index)


def per_example_grads(params: GPTParams, ids: Int[Tensor, "batch seq"], targets: Int[Tensor, "batch seq"], *,
                      ignore_index: int = -100) -> GPTParams:
    """The gradient of each example's mean next-token loss, as one `GPTParams` tree whose leaves have a leading
    `batch` axis: `vmap(grad(loss), in_dims=(None, 0, 0))`."""
    return vmap(grad(_example_loss), in_dims=(None, 0, 0, None))(params, ids, targets, ignore_index)


def per_example_grad_norms(params: GPTParams, ids: Int[Tensor, "batch seq"], targets: Int[Tensor, "batch seq"], *,
                           ignore_index: int = -100) -> Float[Tensor, " batch"]:
    """The global L2 norm of each example's gradient (over every parameter leaf), e.g. for clipping in DP-SGD."""
    grads = per_example_grads(params, ids, targets, ignore_index=ignore_index)
    leaves = torch.utils._pytree.tree_leaves(grads)
    return torch.stack([leaf.flatten(1).pow(2).sum(1) for leaf in leaves]).sum(0).sqrt()

"""Transforms over the study primitives: activation-patching sweeps as one batch (`batched_runs`), gradients
with respect to any site (`grad` / `jacrev` through an additive edit), per-example gradients with `vmap(grad)`."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, jacrev, vmap

from ..layers import block, layer_norm, linear
from ..params import GPTParams, head_matrix
from ..shapes import checked
from .run import forward_with
from .sites import LAYER_SITES, SITE_DIMS, Activations, resolve_sites, site_names

__all__ = ["logit_diff", "patching_sweep", "RowEdit", "batched_runs", "site_grads", "per_example_grads",
           "per_example_grad_norms"]

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
                   positions: Sequence[int] | None = None, vectorize: bool = True, chunk_size: int | None = None,
                   memory_limit: int | None = None) -> Float[Tensor, "layer pos *metric"]:
    """Activation patching: run `corrupt_ids`, replace the per-layer `site` (e.g. `resid_pre`, `attn.z`, `mlp.out`)
    at one (layer, position) by its value on `clean_ids`, and record `metric(logits)`; for every layer x position.

    `vectorize=True` runs the whole grid as one batch of `layers x positions` runs on fused attention, each row's
    patch given as a mask (`batched_runs`): `chunk_size` bounds the rows run together, `memory_limit` (bytes) the
    estimated memory of a chunk. `vectorize=False` is the equivalent Python loop, one forward per grid cell.
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
    bad = [p for p in positions if not -seq <= p < seq]
    if bad:
        raise ValueError(f"positions {bad} out of range: the prompts have seq = {seq} (valid -{seq}..{seq - 1})")
    names = [f"blocks.{i}.{site}" for i in layers]
    resolve_sites(cfg, names, what="patching_sweep")
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=names)
    device = clean_ids.device
    axes = SITE_DIMS[f"blocks.{{i}}.{site}"].split()[1:]  # the axes after batch; where is the positions axis
    at = axes.index("seq")

    def mask_at(p: int) -> Tensor:
        m = torch.zeros(seq, dtype=torch.bool, device=device)
        m[p % seq] = True
        return m.view(*([1] * at), seq, *([1] * (len(axes) - at - 1)))

    masks = [mask_at(p) for p in positions]
    if vectorize:
        rows = [[RowEdit(n, m, clean[n])] for n in names for m in masks]
        out = batched_runs(params, corrupt_ids, rows, metric, chunk_size=chunk_size, memory_limit=memory_limit)
    else:
        with torch.no_grad():
            out = torch.stack([metric(forward_with(params, corrupt_ids, edit={
                n: (lambda x, n=n, m=m: torch.where(m, clean[n], x))})[0]) for n in names for m in masks])
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


# ---------------------------------------------------------------------------------------------------------------
# The batched engine: many edited runs of one prompt as one batch on fused attention.


class RowEdit(NamedTuple):
    """One edit of one row of `batched_runs`: at `site`, where `mask` is True, the value becomes `value`.

    `mask`: bool, broadcastable to the site's value without its batch axis (e.g. `[seq, 1]` for one position of a
    `[batch seq d_model]` site, `[heads, 1, 1]` for one head of `attn.z`). `value`: broadcastable to the site's full
    value `[batch, ...]` (typically another run's activation at that site)."""

    site: str
    mask: Tensor
    value: Tensor | float


def _row_bytes(params: GPTParams, batch: int, seq: int, explicit: bool) -> int:
    """An upper estimate of the memory one row adds to a batched run: its logits, one block's intermediates, and
    (on the explicit attention path) one layer's scores and pattern."""
    cfg = params.config
    itemsize = params.tok_emb.element_size()
    per_token = cfg.vocab_size + 3 * cfg.d_mlp + 10 * cfg.emb_dim
    attn = 3 * cfg.n_heads * seq if explicit else 0
    return batch * seq * (per_token + attn) * itemsize


def _layer_of(site: str) -> int:
    return int(site.split(".")[1])


class _RowsTap:
    """The tap of one batched run: the batch is `[active rows x batch]`; rows join as their first edit's layer
    is reached, so layers before it run once for all of them (in the unedited base run)."""

    def __init__(self, rows: Sequence[Sequence[RowEdit]], batch: int) -> None:
        self.batch = batch
        self.by_site: dict[str, list[tuple[int, RowEdit]]] = {}
        for r, row in enumerate(rows):
            for e in row:
                self.by_site.setdefault(e.site, []).append((r, e))
        self.explicit = any(s.endswith((".attn.scores", ".attn.pattern")) for s in self.by_site)
        self.active = 0  # rows 0..active-1 are in the batch (rows are sorted by the layer they join at)

    def wants(self, site: str) -> bool:
        return site in self.by_site

    def __call__(self, site: str, x: Tensor) -> Tensor:
        entries = self.by_site.get(site)
        if not entries:
            return x
        rows = x.reshape(self.active, self.batch, *x.shape[1:]).clone()  # a copy: the block's tensor stays as it was
        for r, e in entries:  # one masked write into that row's slice per edit
            src = torch.as_tensor(e.value, dtype=x.dtype, device=x.device)
            rows[r] = torch.where(e.mask.to(x.device), src, rows[r])
        return rows.view_as(x)


def batched_runs(params: GPTParams, ids: Int[Tensor, "batch seq"], rows: Sequence[Sequence[RowEdit]],
                 metric: Metric, *, chunk_size: int | None = None, memory_limit: int | None = None) -> Tensor:
    """`metric(logits)` of `len(rows)` edited runs of `ids`, row `r` with the edits `rows[r]` (see `RowEdit`), run
    as one batch `[rows x batch]` (or chunks of `chunk_size` rows, or as many as fit in `memory_limit` bytes) on
    fused attention. Every edited site must be a per-layer site (`blocks.{i}.*`); a row joins the batch at the
    layer of its first edit, the layers before run once for all rows. Returns the stacked metrics `[rows, ...]`,
    equal up to float rounding to running `forward_with(params, ids, edit=...)` once per row.
    """
    cfg = params.config
    batch, seq = ids.shape
    valid = set(site_names(cfg))
    for r, row in enumerate(rows):
        for e in row:
            if e.site not in valid or not e.site.startswith("blocks."):
                raise ValueError(f"rows[{r}] edits site {e.site!r}; batched_runs edits per-layer sites "
                                 f"blocks.{{i}}.<{', '.join(LAYER_SITES)}> with i in 0..{cfg.n_layers - 1}")
    explicit = any(e.site.endswith((".attn.scores", ".attn.pattern")) for row in rows for e in row)
    per_row = _row_bytes(params, batch, seq, explicit)
    limit = len(rows) or 1
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (rows per batch); got {chunk_size}")
        limit = chunk_size
    if memory_limit is not None:
        if memory_limit < per_row:
            raise ValueError(f"memory_limit={memory_limit} bytes is below one row's estimated {per_row} bytes "
                             f"(batch {batch} x seq {seq}); give memory_limit >= {per_row} or fewer tokens")
        limit = min(limit, memory_limit // per_row)
    starts = [min((_layer_of(e.site) for e in row), default=cfg.n_layers) for row in rows]
    order = sorted(range(len(rows)), key=lambda r: starts[r])
    with torch.no_grad():
        _, base = forward_with(params, ids, capture=[*(f"blocks.{i}.resid_pre" for i in range(cfg.n_layers)),
                                                     f"blocks.{cfg.n_layers - 1}.resid_post"])
        base_x = dict(base)
        base_x[f"blocks.{cfg.n_layers}.resid_pre"] = base[f"blocks.{cfg.n_layers - 1}.resid_post"]
        out: list[Tensor | None] = [None] * len(rows)
        for c in range(0, len(order), limit):
            chunk = order[c:c + limit]
            tap = _RowsTap([rows[r] for r in chunk], batch)
            logits = _run_rows(params, tap, [starts[r] for r in chunk], base_x)
            for j, r in enumerate(chunk):
                out[r] = metric(logits[j * batch:(j + 1) * batch])
    return torch.stack(out)  # type: ignore[arg-type]


def _run_rows(params: GPTParams, tap: _RowsTap, starts: list[int], base_x: dict[str, Tensor]) -> Tensor:
    cfg = params.config
    x: Tensor | None = None
    for layer in range(cfg.n_layers + 1):
        joining = sum(1 for s in starts if s == layer)
        if joining:
            add = base_x[f"blocks.{layer}.resid_pre"].repeat(joining, 1, 1)
            x = add if x is None else torch.cat([x, add])
            tap.active += joining
        if layer < cfg.n_layers and x is not None:
            x = block(params.blocks[layer], x, config=cfg, layer=layer, tap=tap)
    assert x is not None
    h = layer_norm(params.final_norm, x, eps=cfg.ln_eps)
    return linear(h, head_matrix(params), None)

"""Transforms over the study primitives: activation-patching sweeps as one batch (`batched_runs`), gradients
with respect to any site (`grad` / `jacrev` through an additive edit), per-example gradients with `vmap(grad)`."""

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, jacrev, vmap

from ..model import readout, walk
from ..params import GPTParams
from ..shapes import checked
from .run import forward_with
from .sites import LAYER_SITES, SITE_DIMS, Activations, resolve_sites, site_names

__all__ = ["logit_diff", "patching_sweep", "HEAD_SITES", "head_patching_sweep", "RowEdit", "batched_runs",
           "site_grads", "per_example_grads", "per_example_grad_norms"]

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
    seq = _check_pair(clean_ids, corrupt_ids)
    layers = _grid_axis(layers, cfg.n_layers, "layers", "the model's layers")
    positions = _positions(positions, seq)
    names = [f"blocks.{i}.{site}" for i in layers]
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=names)
    axes = SITE_DIMS[f"blocks.{{i}}.{site}"].split()[1:]  # the axes after batch
    masks = [_axis_mask(axes, {"seq": seq}, clean_ids.device, seq=[p]) for p in positions]
    rows = [[RowEdit(n, m, clean[n])] for n in names for m in masks]
    out = _runs(params, corrupt_ids, rows, metric, vectorize, chunk_size, memory_limit)
    return out.reshape(len(layers), len(positions), *out.shape[1:])


HEAD_SITES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.result")
"""The per-layer sites with a heads axis, which `head_patching_sweep` patches one head at a time."""


def head_patching_sweep(params: GPTParams, clean_ids: Int[Tensor, "batch seq"],
                        corrupt_ids: Int[Tensor, "batch seq"], metric: Metric, *, site: str = "attn.z",
                        layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                        positions: Sequence[int] | None = None, by_position: bool = False, vectorize: bool = True,
                        chunk_size: int | None = None, memory_limit: int | None = None
                        ) -> Float[Tensor, "layer head *pos_metric"]:
    """Activation patching per head: run `corrupt_ids` with one head's `site` (`attn.z` its output, `attn.q/k/v`
    its queries/keys/values, `attn.pattern`/`attn.scores` its attention, `attn.result` its write into the stream)
    taken from `clean_ids`, and record `metric(logits)`; for every layer x head.

    `by_position=False`: the head is patched at all `positions` at once (default every position) -> `[layer,
    head, *metric]`. `by_position=True`: at each of `positions` separately -> `[layer, head, pos, *metric]`. The
    position is the site's positions axis: the query for `q`, `z`, `pattern`, the key for `k` and `v`.
    `vectorize`, `chunk_size`, `memory_limit`: as in `patching_sweep` (the batched engine `batched_runs`; pattern
    and scores patches run on the explicit attention path, everything else on fused attention).
    """
    cfg = params.config
    if site not in HEAD_SITES:
        raise ValueError(f"head_patching_sweep patches a site with a heads axis, one of {', '.join(HEAD_SITES)}; "
                         f"got {site!r} (for a whole-layer site use patching_sweep)")
    seq = _check_pair(clean_ids, corrupt_ids)
    layers = _grid_axis(layers, cfg.n_layers, "layers", "the model's layers")
    heads = _grid_axis(heads, cfg.n_heads, "heads", "the heads of a layer")
    positions = _positions(positions, seq)
    names = [f"blocks.{i}.{site}" for i in layers]
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=names)
    axes = SITE_DIMS[f"blocks.{{i}}.{site}"].split()[1:]
    device = clean_ids.device
    spots = [[p] for p in positions] if by_position else [positions]
    sizes = {"heads": cfg.n_heads, "seq": seq}
    masks = [_axis_mask(axes, sizes, device, heads=[h], seq=s) for h in heads for s in spots]
    rows = [[RowEdit(n, m, clean[n])] for n in names for m in masks]
    out = _runs(params, corrupt_ids, rows, metric, vectorize, chunk_size, memory_limit)
    grid = (len(layers), len(heads), len(positions)) if by_position else (len(layers), len(heads))
    return out.reshape(*grid, *out.shape[1:])


def _check_pair(clean_ids: Tensor, corrupt_ids: Tensor) -> int:
    """The shared seq of a clean/corrupt pair, or a ValueError."""
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean_ids {list(clean_ids.shape)} and corrupt_ids {list(corrupt_ids.shape)} must have "
                         "the same shape: patching pairs positions one to one")
    return clean_ids.shape[1]


def _index(i: Any) -> int | None:
    """`i` as a Python int (ints, numpy ints, 0-d integer tensors), or None for anything else (bools included)."""
    if isinstance(i, bool):
        return None
    try:
        return operator.index(i)
    except TypeError:
        return None


def _grid_axis(chosen: Sequence[int] | None, size: int, name: str, what: str) -> list[int]:
    """The indices of one grid axis (default all of `0..size-1`), each checked to be in range."""
    if chosen is None:
        return list(range(size))
    got = [_index(i) for i in chosen]
    if not got or any(i is None or not 0 <= i < size for i in got):
        raise ValueError(f"{name} must be a non-empty list of ints in 0..{size - 1} ({what}); got {list(chosen)}")
    return got  # type: ignore[return-value]


def _positions(positions: Sequence[int] | None, seq: int) -> list[int]:
    if positions is None:
        return list(range(seq))
    got = [_index(p) for p in positions]
    bad = [p for p, i in zip(positions, got, strict=True) if i is None or not -seq <= i < seq]
    if bad or not got:
        raise ValueError(f"positions {bad or list(positions)} out of range: the prompts have seq = {seq} (valid "
                         f"-{seq}..{seq - 1}, at least one)")
    return got  # type: ignore[return-value]


def _axis_mask(axes: Sequence[str], sizes: dict[str, int], device: torch.device, **index: Sequence[int]) -> Tensor:
    """A bool mask over a site's axes without batch (`axes`, e.g. `heads seq head_dim`): True at the given indices
    of the named axes (`heads=[2], seq=[0, 3]`; `sizes` gives their lengths), size 1 along every other axis, so
    it broadcasts against the site's value."""
    mask = torch.ones([1] * len(axes), dtype=torch.bool, device=device)
    for axis, chosen in index.items():
        at = axes.index(axis)
        line = torch.zeros(sizes[axis], dtype=torch.bool, device=device)
        line[list(chosen)] = True
        mask = mask & line.view(*([1] * at), sizes[axis], *([1] * (len(axes) - at - 1)))
    return mask


def _runs(params: GPTParams, ids: Tensor, rows: list[list["RowEdit"]], metric: Metric, vectorize: bool,
          chunk_size: int | None, memory_limit: int | None) -> Tensor:
    """The rows' metrics: batched (`batched_runs`) or, with `vectorize=False`, one `forward_with` per row."""
    if vectorize:
        return batched_runs(params, ids, rows, metric, chunk_size=chunk_size, memory_limit=memory_limit)
    with torch.no_grad():
        return torch.stack([metric(forward_with(params, ids, edit={e.site: _where(e) for e in row})[0])
                            for row in rows])


def _where(e: "RowEdit") -> Callable[[Tensor], Tensor]:
    return lambda x: torch.where(e.mask.to(x.device), torch.as_tensor(e.value, dtype=x.dtype, device=x.device), x)


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
    itemsize = params.compute_dtype.itemsize
    per_token = cfg.vocab_size + 3 * cfg.d_mlp + 10 * cfg.emb_dim
    attn = 3 * cfg.n_heads * seq if explicit else 0
    return batch * seq * (per_token + attn) * itemsize



def chunk_limit(total: int, per_row: int, chunk_size: int | None, memory_limit: int | None, *, unit: str,
                shape: str, fewer: str) -> int:
    """How many of `total` rows (one `unit` each, about `per_row` bytes) one batch may hold: all, at most
    `chunk_size`, and no more than `memory_limit` bytes; a ValueError naming the argument when neither can hold
    one."""
    limit = total
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 ({unit}s per batch); got {chunk_size}")
        limit = chunk_size
    if memory_limit is not None:
        if memory_limit < per_row:
            raise ValueError(f"memory_limit={memory_limit} bytes is below one {unit}'s estimated {per_row} bytes "
                             f"({shape}); give memory_limit >= {per_row} or {fewer}")
        limit = min(limit, memory_limit // per_row)
    return limit

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
    limit = chunk_limit(len(rows) or 1, per_row, chunk_size, memory_limit, unit="row",
                        shape=f"batch {batch} x seq {seq}", fewer="fewer tokens")
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
    """The model's one walk in segments: rows join the batch at the layer of their first edit (their residual
    stream there from the clean run), and each segment runs the blocks up to the next joining layer."""
    n = params.config.n_layers
    joins = sorted(set(starts))
    x: Tensor | None = None
    for layer, upto in zip(joins, [*joins[1:], n], strict=True):
        add = base_x[f"blocks.{layer}.resid_pre"].repeat(starts.count(layer), 1, 1)
        x = add if x is None else torch.cat([x, add])
        tap.active += starts.count(layer)
        x, _ = walk(params, x, start=layer, stop=upto, tap=tap)
    assert x is not None
    return readout(params, x)

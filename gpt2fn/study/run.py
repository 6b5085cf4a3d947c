"""Capture and edit activations as arguments of one forward pass: `forward_with(params, ids, capture=, edit=)`.

Built on the `tap` that `gpt2fn.forward` threads through every layer. The tap is made inside the call and dropped
at its end: nothing is registered on the model, nothing outlives the call but the returned values.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..model import forward
from ..params import GPTParams
from .sites import Activations, resolve_sites, site_dims

__all__ = ["Edit", "forward_with", "run_with_capture", "patch", "ablate_head", "steer", "edit_tap",
           "generation_tap", "resolve_edits"]

Edit = Callable[[Tensor], Tensor]
"""A pure function from a site's value to its replacement (same shape)."""

Positions = int | Sequence[int] | Tensor | None
Heads = int | Sequence[int] | Tensor | None


class _StudyTap:
    """The tap of one `forward_with` call: applies edits, then stores the requested sites (after the edit)."""

    def __init__(self, capture: Iterable[str], edit: Mapping[str, Edit], explicit_attention: bool,
                 positions: Tensor | None = None, log: list[dict[str, Tensor]] | None = None) -> None:
        self.capture = frozenset(capture)
        self.edit = dict(edit)
        self.explicit_attention = explicit_attention
        self.positions = positions  # [batch, seq] absolute positions of this call's queries (decoding), or None
        self.store: dict[str, Tensor] = {}
        self.log = log  # generation: the store of every call made through `.at`, in order (see `generation_tap`)

    def at(self, positions: Tensor) -> "_StudyTap":
        """The same edits for a call whose queries sit at absolute `positions` `[batch, seq]` (a decode step).
        With a `log` (a generation that captures), the new tap's store is appended to it."""
        child = _StudyTap(self.capture, self.edit, self.explicit_attention, positions, self.log)
        if self.log is not None and self.capture:
            self.log.append(child.store)
        return child

    def stacked(self) -> Activations:
        """The captures of every call made through `.at` (a prefill, then one-token steps), concatenated along
        each site's sequence (query) axis; a key axis (`attn.scores`/`attn.pattern`, over the cache's slots) is
        cut to the sequence's length, so each site has the shape `forward_with` gives on the whole sequence."""
        if not self.log:
            raise ValueError("nothing was captured: this tap made no calls with a capture")
        length = sum(store[next(iter(store))].shape[_seq_axis(next(iter(store)))] for store in self.log)
        out = {}
        for site in self.log[0]:
            parts = [store[site] for store in self.log]
            if site_dims(site).endswith("kv_seq"):
                parts = [t[..., :length] for t in parts]
            out[site] = torch.cat(parts, dim=_seq_axis(site))
        return Activations(out)

    def wants(self, site: str) -> bool:
        if self.explicit_attention and site.endswith((".attn.scores", ".attn.pattern")):
            return True
        return site in self.capture or site in self.edit

    def __call__(self, site: str, x: Tensor) -> Tensor:
        fn = self.edit.get(site)
        if fn is not None:
            if isinstance(fn, _PositionalEdit):
                y = fn.on(site, x, self.positions)
            else:
                y = fn.at(x, self.positions) if self.positions is not None and hasattr(fn, "at") else fn(x)
            if not isinstance(y, Tensor) or y.shape != x.shape:
                got = list(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"edit of site {site!r} returned {got}; it must return a tensor of the site's "
                                 f"shape {list(x.shape)}. Broadcast or expand inside the edit function.")
            x = y
        if site in self.capture:
            self.store[site] = x
        return x


def forward_with(params: GPTParams, ids: Tensor, *, capture: str | Iterable[str] = (),
                 edit: Mapping[str, Edit] | None = None, explicit_attention: bool = False,
                 **forward_kwargs: Any) -> tuple[Any, Activations]:
    """`gpt2fn.forward` with named sites captured and/or edited; returns `(forward's result, Activations)`.

    - `capture`: site names or glob patterns (`"blocks.*.attn.pattern"`); only these are stored. A captured site
      holds the value the model went on with, i.e. after any edit of that site.
    - `edit`: `{site or pattern: fn}`; `fn(value) -> value` of the same shape replaces the site's value
      (see `patch`, `ablate_head`, `steer`). A pattern applies the same fn at every site it matches.
    - `explicit_attention`: compute attention as softmax(q k^T) v even where no attention site is requested
      (`torch.func.vmap` batches it natively; the fused kernel falls back to a loop under vmap).
    - `forward_kwargs`: passed on to `gpt2fn.forward` (`positions`, `pad_mask`, `cache`, `generator`, `last_only`).

    Unknown site names raise a ValueError listing the valid ones. Attention `scores`/`pattern` exist only on the
    explicit path, which is taken exactly when one of them is captured or edited.
    """
    sites = resolve_sites(params.config, capture, what="capture")
    tap = _StudyTap(sites, resolve_edits(params.config, edit), explicit_attention)
    out = forward(params, ids, tap=tap, **forward_kwargs)
    return out, Activations(tap.store)


def resolve_edits(config: Any, edit: Mapping[str, Edit] | None) -> dict[str, Edit]:
    """`{site or pattern: fn}` as `{site: fn}`; unknown sites or two entries for one site raise ValueError."""
    edits: dict[str, Edit] = {}
    for request, fn in (edit or {}).items():
        if not callable(fn):
            raise TypeError(f"edit[{request!r}] must be a function value -> value; got {type(fn).__name__}. "
                            f"To set a value use gpt2fn.study.patch(value).")
        for site in resolve_sites(config, [request], what="edit"):
            if site in edits:
                raise ValueError(f"site {site!r} is matched by two edit entries (one is {request!r}); "
                                 "compose the functions into one entry")
            edits[site] = fn
    return edits


def edit_tap(config: Any, edit: Mapping[str, Edit]) -> _StudyTap:
    """The tap that applies `edit` (see `forward_with`) and captures nothing: what `generate(..., edit=)` threads
    through each decode step, bound to the step's absolute positions with `.at(positions)`."""
    return _StudyTap((), resolve_edits(config, edit), False)


def generation_tap(config: Any, edit: Mapping[str, Edit] | None, capture: str | Iterable[str]) -> _StudyTap:
    """The tap of `generate(..., edit=, capture=)`: applies `edit` and, when `capture` names sites, records what
    each prefill and decode step made through `.at(positions)` captures; `.stacked()` lines them up along the
    sequence axis. The sites are checked here (a ValueError naming the valid ones), before any work."""
    sites = resolve_sites(config, capture, what="capture")
    return _StudyTap(sites, resolve_edits(config, edit), False, log=[] if sites else None)


def _seq_axis(site: str) -> int:
    """The query (sequence) axis of a site's value, with its batch axis present (`embed.pos` included)."""
    return site_dims(site).replace("*batch", "batch").split().index("seq")


def run_with_capture(params: GPTParams, ids: Tensor, sites: str | Iterable[str], **forward_kwargs: Any
                     ) -> tuple[Any, Activations]:
    """`(logits, acts)` with the named sites captured: `forward_with(params, ids, capture=sites)`."""
    return forward_with(params, ids, capture=sites, **forward_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Edits. Axes: the heads axis is 1 (sites with 4 axes); the positions (query) axis is the second to last. The one
# site laid out otherwise, `attn.result` [batch seq heads d_model], is edited through a transposed view (see
# `_PositionalEdit.on`), so `positions=`/`heads=` mean the same axes at every site.

_POSITIONS_FIRST = (".attn.result",)  # sites [batch seq heads ...]: positions on axis 1, heads on axis 2


def _index_mask(spec: int | Sequence[int] | Tensor, size: int, device: torch.device, what: str) -> Tensor:
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.shape != (size,):
            raise ValueError(f"{what} mask has shape {list(spec.shape)}; expected [{size}]")
        return spec.to(device)
    index = [spec] if isinstance(spec, int) else (spec.flatten().tolist() if isinstance(spec, Tensor) else spec)
    bad = [i for i in index if not -size <= int(i) < size]
    if what == "positions":  # positions past the end are not reached yet (generation): they select nothing
        bad = [i for i in bad if int(i) < 0]
        index = [i for i in index if int(i) < size]
    if bad:
        raise ValueError(f"{what} {bad} out of range for an axis of size {size}")
    flat = torch.tensor([int(i) % size for i in index], dtype=torch.long, device=device)
    return torch.zeros(size, dtype=torch.bool, device=device).index_fill(0, flat, True)


def _static(spec: Positions | Heads) -> Any:
    """An index argument of an edit as Python ints, read once when the edit is made (a bool mask stays a
    tensor), so applying the edit reads no tensor's values: `torch.compile` traces it without a graph break."""
    if isinstance(spec, Tensor) and spec.dtype != torch.bool:
        return tuple(int(i) for i in spec.flatten().tolist())
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return tuple(int(i) for i in spec)
    return spec


def _absolute_index(positions: Positions) -> tuple[int, ...] | None:
    """`positions` (after `_static`) as the absolute positions a decode step compares its own with."""
    if positions is None:
        return None
    if isinstance(positions, int):
        return (positions,)
    if isinstance(positions, Tensor):  # a bool mask over positions 0, 1, ...
        return tuple(int(i) for i in positions.nonzero().flatten().tolist())
    return tuple(positions)


def _absolute_mask(x: Tensor, index: tuple[int, ...], at: Tensor) -> Tensor:
    """Where the queries at absolute positions `at` `[batch, seq]` are among `index`, shaped to broadcast
    against `x` (`[batch, seq, 1]`, or `[batch, 1, seq, 1]` with a heads axis)."""
    if any(int(i) < 0 for i in index):
        raise ValueError(f"positions {index} must be >= 0 while generating: they are absolute positions in the "
                         "sequence (count from the start, not from the end)")
    wanted = torch.tensor([int(i) for i in index], dtype=torch.long, device=x.device)
    hit = torch.isin(at.to(x.device), wanted)
    return hit[:, None, :, None] if x.ndim == 4 else hit[..., None]


class _PositionalEdit:
    """An edit made by `patch`/`steer`/`ablate_head`: `fn(x)` reads the positions axis of `x` as positions 0, 1,
    ... (a full forward); `fn.at(x, at)` reads them as the absolute positions `at` (a decode step). Called
    directly it takes `x` as `[batch heads seq ...]` or `[batch seq ...]`; through a tap, `on(site, x, at)` also
    serves `attn.result` (`[batch seq heads d_model]`), whose value and source it transposes to that order."""

    def __init__(self, apply: Callable[[Tensor, Tensor | None, bool], Tensor]) -> None:
        self._apply = apply

    def __call__(self, x: Tensor) -> Tensor:
        return self._apply(x, None, False)

    def at(self, x: Tensor, at: Tensor) -> Tensor:
        return self._apply(x, at, False)

    def on(self, site: str, x: Tensor, at: Tensor | None) -> Tensor:
        if x.ndim == 4 and site.endswith(_POSITIONS_FIRST):
            return self._apply(x.transpose(1, 2), at, True).transpose(1, 2)
        return self._apply(x, at, False)


def _source_at(src: Tensor, x: Tensor, at: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A patch source with a positions axis, read at the absolute positions `at` (default 0, 1, ...) and only
    where it has them: `(source, where it applies or None)`."""
    if src.ndim != x.ndim or src.shape[-2] == 1 or (at is None and src.shape[-2] == x.shape[-2]):
        return src, None
    if at is None:  # a full forward: its queries sit at positions 0, 1, ...
        at = torch.arange(x.shape[-2], device=x.device).expand(x.shape[0], -1)
    n = src.shape[-2]
    idx = at.to(x.device).clamp(max=n - 1)
    idx = idx[:, None, :, None] if x.ndim == 4 else idx[..., None]
    src = src.expand(x.shape[0], *src.shape[1:]) if src.shape[0] == 1 else src
    gathered = torch.take_along_dim(src, idx.expand(*x.shape[:-1], src.shape[-1]), dim=-2)
    inside = at.to(x.device) < n
    return gathered, inside[:, None, :, None] if x.ndim == 4 else inside[..., None]


def _where_mask(x: Tensor, positions: Positions, heads: Heads) -> Tensor | None:
    mask = None
    if positions is not None:
        pos = _index_mask(positions, x.shape[-2], x.device, "positions")
        mask = pos[:, None]
    if heads is not None:
        if x.ndim != 4:
            raise ValueError(f"heads= needs a site with a heads axis (attn.q/k/v/z/scores/pattern/result, "
                             f"attn.q/k/v_input); this site has shape {list(x.shape)}")
        h = _index_mask(heads, x.shape[1], x.device, "heads")[:, None, None]
        mask = h if mask is None else h & mask
    return mask


def patch(source: Tensor | float, *, positions: Positions = None, heads: Heads = None) -> Edit:
    """Replace the site's value by `source` (broadcastable: another run's activation, a mean, 0.0), everywhere or
    only at `positions` (query axis) and/or `heads`. `patch(acts[site])` with the run's own capture is the
    identity; with another prompt's capture it is activation patching."""
    positions, heads = _static(positions), _static(heads)
    absolute = _absolute_index(positions)

    def edit(x: Tensor, at: Tensor | None, swapped: bool) -> Tensor:
        src = torch.as_tensor(source, dtype=x.dtype, device=x.device)
        if swapped and src.ndim == 4:  # a capture of the site itself: [batch seq heads d] -> [batch heads seq d]
            src = src.transpose(1, 2)
        src, inside = _source_at(src, x, at)
        if at is None or positions is None:
            mask = _where_mask(x, None if at is not None else positions, heads)
        else:
            mask = _absolute_mask(x, absolute, at)
            if heads is not None:
                mask = mask & _where_mask(x, None, heads)
        if inside is not None:
            mask = inside if mask is None else mask & inside
        return src.expand_as(x) if mask is None else torch.where(mask, src, x)
    return _PositionalEdit(edit)


def ablate_head(head: int | Sequence[int], *, value: Tensor | float = 0.0, positions: Positions = None) -> Edit:
    """Zero-ablate (or, with `value=acts[site].mean(0)`, mean-ablate) attention head(s) at a site with a heads axis,
    typically `blocks.{i}.attn.z`: the head then writes nothing (or its mean) to the residual stream. `value`
    broadcasts against the site's `[batch heads seq head_dim]`; a `[heads seq head_dim]` mean gives each head its own.
    """
    return patch(value, positions=positions, heads=head)


def steer(vector: Tensor, *, scale: float = 1.0, positions: Positions = None) -> Edit:
    """Add `scale * vector` (e.g. a `[d_model]` steering direction) to the site's value, at `positions` or all.
    A number `scale` is held as a 0-d tensor, so under `torch.compile` a new scale is an input, not a new graph."""
    positions = _static(positions)
    absolute = _absolute_index(positions)
    factor = scale if isinstance(scale, Tensor) else torch.tensor(float(scale))

    def edit(x: Tensor, at: Tensor | None, swapped: bool) -> Tensor:
        add = factor.to(device=x.device) * vector.to(dtype=x.dtype, device=x.device)
        if positions is None:
            mask = None
        else:
            mask = _where_mask(x, positions, None) if at is None else _absolute_mask(x, absolute, at)
        return x + (add if mask is None else mask.to(x.dtype) * add)
    return _PositionalEdit(edit)

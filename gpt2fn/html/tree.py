"""A pytree as a collapsible outline (`<details>` elements, no script): records, tuples, mappings and tensors,
each tensor with its dtype, shape, device and summary statistics (mean ± std, min, max, zeros, NaN/inf counts and
a 16-bin histogram), each node with its path on hover.

Generic: it walks dataclasses (gpt2fn's parameter records, where `_fields` names the children and static fields
such as the config show as values), NamedTuples, tuples and lists, mappings (`Activations`; a mapping with a
`dims(key)` method gets each entry's axis names), tensors and plain values. It imports nothing from the model.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .core import View, escape, fmt

__all__ = ["tree_view", "tensor_summary", "STATS_LIMIT"]

STATS_LIMIT = 64 * 1024 * 1024
"""Tensors with more elements than this show shape and dtype only (statistics would cost a pass over them)."""

_OPEN_DEPTH = 1


def tensor_summary(t: Tensor) -> dict[str, Any]:
    """Statistics of a tensor as plain numbers: `numel`, and for real tensors on a device with data (not `meta`)
    and at most `STATS_LIMIT` elements: `mean`, `std`, `min`, `max` over the finite values, counts of `zeros`,
    `nan`, `inf`, and `hist` (16 bin counts over [min, max])."""
    out: dict[str, Any] = {"numel": t.numel()}
    if t.device.type == "meta" or t.numel() == 0 or t.numel() > STATS_LIMIT or t.is_complex():
        return out
    x = t.detach()
    if x.dtype == torch.bool:
        out["true"] = int(x.sum())
        return out
    x = x.float()
    finite = torch.isfinite(x)
    out["nan"] = int(torch.isnan(x).sum())
    out["inf"] = int((~finite).sum()) - out["nan"]
    out["zeros"] = int((x == 0).sum())
    v = x[finite]
    if v.numel():
        out.update(mean=float(v.mean()), std=float(v.std()) if v.numel() > 1 else 0.0, min=float(v.min()),
                   max=float(v.max()))
        lo, hi = out["min"], out["max"]
        out["hist"] = (torch.histc(v, bins=16, min=lo, max=hi).tolist() if hi > lo else [float(v.numel())])
    return out


def _hist(counts: list[float]) -> str:
    top = max(counts) or 1.0
    bars = "".join(f'<i style="height:{max(1.0, 14 * c / top):.1f}px"></i>' for c in counts)
    return f'<span class="g2f-hist" title="histogram, 16 bins from min to max">{bars}</span>'


def _tensor_line(t: Tensor) -> str:
    s = tensor_summary(t)
    dtype = str(t.dtype).removeprefix("torch.")
    parts = [f'<span class="g2f-type">{escape(dtype)}</span><span class="g2f-shape">{escape(list(t.shape))}'
             f"</span> <span class=\"g2f-stats\">{escape(t.device)}</span>"]
    if "mean" in s:
        stats = (f"≈{fmt(s['mean'])} ±{fmt(s['std'])} [{fmt(s['min'])}, {fmt(s['max'])}]"
                 + (f" zeros:{s['zeros']:,}" if s["zeros"] else "") + (f" nan:{s['nan']:,}" if s["nan"] else "")
                 + (f" inf:{s['inf']:,}" if s["inf"] else ""))
        parts.append(_hist(s["hist"]) + f'<span class="g2f-stats">{escape(stats)}</span>')
    elif "true" in s:
        text = f"true:{s['true']:,} of {s['numel']:,}"
        parts.append(f'<span class="g2f-stats">{escape(text)}</span>')
    elif s["numel"] > STATS_LIMIT:
        text = f"{s['numel']:,} elements: no statistics"
        parts.append(f'<span class="g2f-stats">{escape(text)}</span>')
    return " ".join(parts)


def _children(obj: Any) -> list[tuple[str, str, Any]] | None:
    """`[(label, path suffix, child)]` of a container, or None for a leaf."""
    if isinstance(obj, Tensor):
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = list(getattr(obj, "_fields", ())) or [f.name for f in dataclasses.fields(obj)]
        statics = [f.name for f in dataclasses.fields(obj) if f.name not in names]
        return [(n, f".{n}", getattr(obj, n)) for n in names + statics]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return [(n, f".{n}", getattr(obj, n)) for n in obj._fields]
    if isinstance(obj, (tuple, list)):
        return [(f"[{i}]", f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return [(str(k), f"[{k!r}]", v) for k, v in obj.items()]
    return None


def _leaves(obj: Any) -> tuple[int, int]:
    """(tensor elements, bytes) under obj."""
    if isinstance(obj, Tensor):
        return obj.numel(), obj.numel() * obj.element_size()
    kids = _children(obj) or []
    n = b = 0
    for _, _, c in kids:
        cn, cb = _leaves(c)
        n, b = n + cn, b + cb
    return n, b


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _node(label: str, path: str, obj: Any, depth: int, dims: str | None = None) -> str:
    name = f'<span class="g2f-name" title="{escape(path)}">{escape(label)}</span>'
    dim = f' <span class="g2f-dims">[{escape(dims)}]</span>' if dims else ""
    kids = _children(obj)
    if kids is None:
        if isinstance(obj, Tensor):
            return f'<div class="g2f-leaf">{name}: {_tensor_line(obj)}{dim}</div>'
        text = repr(obj)
        text = text if len(text) <= 300 else text[:297] + "..."
        return f'<div class="g2f-leaf">{name} = <span class="g2f-stats">{escape(text)}</span></div>'
    n, nbytes = _leaves(obj)
    kind = type(obj).__name__
    if isinstance(obj, (tuple, list)) and obj and not hasattr(obj, "_fields"):
        types = {type(c).__name__ for c in obj}
        kind = f"{len(obj)} x {types.pop()}" if len(types) == 1 else f"{kind} of {len(obj)}"
    counts = f" {n:,} values, {_size(nbytes)}" if n else ""
    getdims = getattr(obj, "dims", None) if isinstance(obj, Mapping) else None
    inner = []
    for lab, suffix, child in kids:
        d = None
        if callable(getdims):
            try:
                d = getdims(lab)
            except (KeyError, ValueError):
                d = None
        inner.append(_node(lab, path + suffix, child, depth + 1, d))
    opened = " open" if depth < _OPEN_DEPTH else ""
    return (f'<details{opened}><summary>{name}: <span class="g2f-type">{escape(kind)}</span>'
            f'<span class="g2f-stats">{escape(counts)}</span>{dim}</summary>{"".join(inner)}</details>')


def tree_view(obj: Any, *, name: str | None = None, title: str | None = None) -> View:
    """`obj` (a `GPTParams`, `Activations`, any pytree) as a collapsible outline; the top level starts open."""
    name = type(obj).__name__ if name is None else name
    return View(title or name, f'<div class="g2f-tree">{_node(name, name, obj, 0)}</div>')

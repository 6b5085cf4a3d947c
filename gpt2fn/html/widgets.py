"""The views themselves, from plain data (lists of strings and numbers, or tensors): tokens coloured by a value,
heat maps, the logit-lens table, bars, and the attention view.

Every function returns a :class:`~gpt2fn.html.core.View`. All but the attention view are static HTML (colours and
tooltips computed here), so they show even where a notebook does not run scripts; the attention view draws with
an inline script from data embedded as JSON and base64.
"""

import base64
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .core import View, colour, display_token, escape, fmt, script_json, text_colour

__all__ = ["tokens_view", "heatmap", "lens_table", "bars", "attention_view", "ATTENTION_BUDGET", "MAX_CELLS"]

MAX_CELLS = 250_000
"""The most cells a static heat map or lens table draws (a `<td>` each); larger grids raise a ValueError."""

ATTENTION_BUDGET = 3_000_000
"""Default byte budget of an attention view's stored pattern entries (before compression and base64)."""


def _floats(values: Any, name: str) -> list[float | None]:
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().tolist()
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1):
            out.append(float(v))
        else:
            raise TypeError(f"{name} must hold numbers (or None); got {type(v).__name__}")
    return out


def _strings(items: Sequence[Any], name: str) -> list[str]:
    if isinstance(items, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string; split it into tokens first")
    return [str(t) for t in items]


def _range(values: Sequence[float | None], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo = min(finite, default=0.0) if vmin is None else vmin
    hi = max(finite, default=1.0) if vmax is None else vmax
    return lo, hi


def _legend(lo: float, hi: float, signed: bool, label: str = "") -> str:
    left = colour(-max(abs(lo), abs(hi)) if signed else lo, lo, hi, signed=signed)
    mid = colour(0.0 if signed else (lo + hi) / 2, lo, hi, signed=signed)
    right = colour(max(abs(lo), abs(hi)) if signed else hi, lo, hi, signed=signed)
    m = max(abs(lo), abs(hi))
    a, b = (fmt(-m), fmt(m)) if signed else (fmt(lo), fmt(hi))
    return (f'<div class="g2f-legend">{escape(label)} <span>{a}</span>'
            f'<span class="g2f-ramp" style="background:linear-gradient(90deg,{left},{mid},{right})"></span>'
            f"<span>{b}</span></div>")


def tokens_view(tokens: Sequence[str], values: Sequence[float | None] | Tensor | Mapping[str, Any], *,
                title: str = "tokens", signed: bool | None = None, vmin: float | None = None,
                vmax: float | None = None, note: str = "") -> View:
    """Tokens coloured by a per-token value (a log-prob from `score`, a neuron, a DLA share, an SAE feature):
    one row of tokens per value set (`values` may be `{name: values}`), hover for the exact value.

    `signed` (default: True when a value is negative) picks the red-white-blue scale centred on 0; otherwise
    white to blue over `[vmin, vmax]` (default: the values' range). A None value (an unscored token) is grey.
    """
    tokens = _strings(tokens, "tokens")
    sets = dict(values) if isinstance(values, Mapping) else {"value": values}
    rows = []
    for name, vals in sets.items():
        vals = _floats(vals, f"values[{name!r}]")
        if len(vals) != len(tokens):
            raise ValueError(f"values[{name!r}] has {len(vals)} entries for {len(tokens)} tokens; give one value "
                             "per token (None for a token without one)")
        lo, hi = _range(vals, vmin, vmax)
        sgn = (lo < 0) if signed is None else signed
        spans = []
        for i, (tok, v) in enumerate(zip(tokens, vals, strict=True)):
            tip = f"{i}: {tok!r}\n{name} = {fmt(v, 5) if v is not None else 'none'}"
            spans.append(f'<span class="g2f-tok" data-i="{i}" title="{escape(tip)}" style="background:'
                         f'{colour(v, lo, hi, signed=sgn)};color:{text_colour(v, lo, hi, signed=sgn)}">'
                         f"{escape(display_token(tok))}</span>")
        label = f'<div class="g2f-rowlabel">{escape(name)}</div>' if len(sets) > 1 else ""
        rows.append(f'<div class="g2f-tokrow">{label}<div class="g2f-toks">{"".join(spans)}</div>'
                    f"{_legend(lo, hi, sgn, name)}</div>")
    extra = f'<p class="g2f-note">{escape(note)}</p>' if note else ""
    return View(title, extra + "".join(rows))


def _grid(values: Any, name: str) -> list[list[float | None]]:
    if isinstance(values, Tensor):
        if values.ndim != 2:
            raise ValueError(f"{name} must be 2-D [rows, cols]; got shape {list(values.shape)} (select or "
                             "reduce the other axes, e.g. result[..., 0] or result.mean(-1))")
        values = values.detach().float().cpu().tolist()
    rows = [_floats(r, name) for r in values]
    if rows and len({len(r) for r in rows}) != 1:
        raise ValueError(f"{name} rows differ in length: {sorted({len(r) for r in rows})}")
    return rows


def heatmap(values: Any, *, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None,
            title: str = "heat map", signed: bool | None = None, vmin: float | None = None, vmax: float | None = None,
            row_axis: str = "", col_axis: str = "", show_values: bool | None = None, note: str = "") -> View:
    """A 2-D grid as a coloured table (patching sweeps: layer x position, layer x head; attribution; detector
    scores). Hover a cell for row, column and value; `show_values` (default: 16 columns or fewer) prints them.
    """
    grid = _grid(values, "values")
    n_rows, n_cols = len(grid), len(grid[0]) if grid else 0
    if n_rows * n_cols > MAX_CELLS:
        raise ValueError(f"a heat map of {n_rows} x {n_cols} cells is too large to draw as HTML (limit "
                         f"{MAX_CELLS:,}); slice the rows or columns you want to see")
    rows = [str(i) for i in range(n_rows)] if rows is None else _strings(rows, "rows")
    cols = [str(j) for j in range(n_cols)] if cols is None else _strings(cols, "cols")
    if len(rows) != n_rows or len(cols) != n_cols:
        raise ValueError(f"{len(rows)} row labels and {len(cols)} column labels for a {n_rows} x {n_cols} grid")
    flat = [v for r in grid for v in r]
    lo, hi = _range(flat, vmin, vmax)
    sgn = (lo < 0) if signed is None else signed
    show = n_cols <= 16 if show_values is None else show_values
    head = "".join(f'<th class="g2f-col" title="{escape(c)}">{escape(display_token(c))}</th>' for c in cols)
    body = []
    for r, label in zip(grid, rows, strict=True):
        cells = []
        for v, c in zip(r, cols, strict=True):
            tip = f"{row_axis or 'row'} {label} · {col_axis or 'col'} {c}: {fmt(v, 5)}"
            text = escape(fmt(v, 2)) if show else ""
            cells.append(f'<td title="{escape(tip)}" style="background:{colour(v, lo, hi, signed=sgn)};'
                         f'color:{text_colour(v, lo, hi, signed=sgn)}">{text}</td>')
        body.append(f'<tr><th class="g2f-row">{escape(display_token(label))}</th>{"".join(cells)}</tr>')
    corner = escape(f"{row_axis} \\ {col_axis}" if row_axis or col_axis else "")
    extra = f'<p class="g2f-note">{escape(note)}</p>' if note else ""
    table = (f'<div class="g2f-scroll"><table class="g2f-heat"><thead><tr><th>{corner}</th>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>')
    return View(title, extra + table + _legend(lo, hi, sgn))


def lens_table(top_tokens: Sequence[Sequence[Sequence[str]]], top_probs: Any, *, layers: Sequence[str],
               tokens: Sequence[str], title: str = "logit lens", note: str = "") -> View:
    """The logit lens as a table: a row per layer (`embed`, `blocks.0`, ...), a column per position (headed by
    the input token), each cell the layer's top prediction coloured by its probability; hover for the top k.

    `top_tokens[layer][pos][k]` are token strings, `top_probs[layer][pos][k]` their probabilities.
    """
    probs = top_probs.detach().float().cpu().tolist() if isinstance(top_probs, Tensor) else top_probs
    layers, tokens = _strings(layers, "layers"), _strings(tokens, "tokens")
    if len(top_tokens) != len(layers) or any(len(r) != len(tokens) for r in top_tokens):
        raise ValueError(f"top_tokens must be [layers={len(layers)}][positions={len(tokens)}][k]")
    if len(layers) * len(tokens) > MAX_CELLS:
        raise ValueError(f"a lens table of {len(layers)} x {len(tokens)} cells is too large to draw (limit "
                         f"{MAX_CELLS:,}); pass fewer positions")
    head = "".join(f'<th class="g2f-col" title="{escape(f"{j}: {t!r}")}">{escape(display_token(t))}</th>'
                   for j, t in enumerate(tokens))
    body = []
    for name, row_t, row_p in zip(layers, top_tokens, probs, strict=True):
        cells = []
        for j, (ts, ps) in enumerate(zip(row_t, row_p, strict=True)):
            tip = f"{name} @ {j} ({tokens[j]!r})\n" + "\n".join(f"{fmt(p, 3)}  {t!r}" for t, p in zip(ts, ps,
                                                                                                     strict=True))
            p0 = float(ps[0])
            cells.append(f'<td title="{escape(tip)}" style="background:{colour(p0, 0.0, 1.0)};'
                         f'color:{text_colour(p0, 0.0, 1.0)}">{escape(display_token(str(ts[0])))}</td>')
        body.append(f'<tr><th class="g2f-row">{escape(name)}</th>{"".join(cells)}</tr>')
    extra = f'<p class="g2f-note">{escape(note)}</p>' if note else ""
    table = (f'<div class="g2f-scroll"><table class="g2f-heat g2f-lens"><thead><tr><th>layer \\ position</th>'
             f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    return View(title, extra + table + _legend(0.0, 1.0, False, "top-1 probability"))


def bars(labels: Sequence[str], values: Any, *, title: str = "bars", sort: bool = False, top: int | None = None,
         note: str = "") -> View:
    """Signed horizontal bars, one per label (direct logit attribution: blue pushes the logit up, red down).

    `sort` orders by |value|; `top` keeps that many of the largest |value| (the rest summed in one line).
    """
    labels = _strings(labels, "labels")
    vals = _floats(values, "values")
    if len(vals) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(vals)} values")
    items = list(zip(labels, vals, strict=True))
    rest: list[tuple[str, float | None]] = []
    if sort or top is not None:
        items.sort(key=lambda lv: -abs(lv[1]) if lv[1] is not None and math.isfinite(lv[1]) else 0.0)
    if top is not None and len(items) > top:
        items, rest = items[:top], items[top:]
    m = max((abs(v) for _, v in items if v is not None and math.isfinite(v)), default=0.0) or 1.0
    out = []
    for label, v in items:
        w = 0.0 if v is None or not math.isfinite(v) else min(abs(v) / m, 1.0) * 50
        side = "left:50%" if (v or 0) >= 0 else "right:50%"
        cls = "g2f-pos" if (v or 0) >= 0 else "g2f-neg"
        out.append(f'<div class="g2f-bar" title="{escape(f"{label}: {fmt(v, 6)}")}"><span class="g2f-barlabel">'
                   f'{escape(label)}</span><span class="g2f-track"><span class="g2f-fill {cls}" style="{side};'
                   f'width:{w:.2f}%"></span></span><span class="g2f-barval">{escape(fmt(v, 4))}</span></div>')
    if rest:
        total = sum(v for _, v in rest if v is not None and math.isfinite(v))
        out.append(f'<div class="g2f-note">{len(rest)} more, summing to {escape(fmt(total, 4))}</div>')
    extra = f'<p class="g2f-note">{escape(note)}</p>' if note else ""
    return View(title, extra + f'<div class="g2f-bars">{"".join(out)}</div>')


# -- attention --------------------------------------------------------------------------------------------------


def attention_topk(pattern: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's `[heads, q, kv]` pattern reduced to each query's `k` largest weights: key indices (int32),
    weights quantised to `uint8` (`round(255 w)`), and the mass those entries keep (`uint8`, of 255)."""
    p = pattern.detach().float()
    k = min(k, p.shape[-1])
    w, idx = p.topk(k, dim=-1)
    q = (w * 255).round().clamp(0, 255).to(torch.uint8)
    idx = torch.where(q > 0, idx, 0)
    mass = (w.sum(-1) * 255).round().clamp(0, 255).to(torch.uint8)
    return idx.to(torch.int32).cpu(), q.cpu(), mass.cpu()


def choose_k(layers: int, heads: int, queries: int, keys: int, budget: int) -> int:
    """Keys kept per query so the stored entries (3 bytes each, plus 1 byte of mass per query) fit `budget`."""
    per_query = max(1, (budget // max(1, layers * heads * queries) - 1) // 3)
    return max(1, min(keys, per_query))


def attention_view(tokens: Sequence[str], layers: Sequence[Tensor] | Tensor, *, layer_labels: Sequence[str] | None =
                   None, head_labels: Sequence[str] | None = None, key_tokens: Sequence[str] | None = None,
                   top_k: int | None = None, budget: int = ATTENTION_BUDGET, title: str = "attention") -> View:
    """Attention patterns per layer and head: a thumbnail per head (hover to preview, click to choose), the chosen
    head's pattern as a heat map (queries down, keys across), and the tokens; hovering a token colours every token
    by the attention it pays (`query -> keys`) or receives (`key <- queries`), and lists its top keys.

    `layers`: one `[heads, q, kv]` pattern per layer (a sequence, reduced one at a time, or a stacked `[layer,
    heads, q, kv]` tensor), or per layer the `attention_topk(pattern, k)` of one with `k = top_k` (what
    `gpt2fn.study.views.view_attention` passes, so no more than one layer's pattern is ever held).

    Size is bounded: each query keeps its `top_k` largest weights (default: as many as fit `budget` bytes, all
    of them for short texts), quantised to 1/255, with the share of attention they hold; the view says how many
    were kept. A 1024-token, 12 x 12-head view keeps 6 keys per query in about 2.8 MB before
    compression (deflate, decoded by the browser's `DecompressionStream`).
    """
    tokens = _strings(tokens, "tokens")
    keys = tokens if key_tokens is None else _strings(key_tokens, "key_tokens")
    layers = list(layers.unbind(0)) if isinstance(layers, Tensor) else list(layers)
    if not layers:
        raise ValueError("attention_view needs at least one layer's pattern")
    if len(keys) > 65535:
        raise ValueError(f"{len(keys)} keys do not fit the view's 16-bit key indices (at most 65535)")
    first = layers[0][0] if isinstance(layers[0], tuple) else layers[0]
    heads = first.shape[0] if isinstance(first, Tensor) and first.ndim == 3 else 0
    k = choose_k(len(layers), heads, len(tokens), len(keys), budget) if top_k is None else top_k
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, len(keys))
    reduced = []
    for i, p in enumerate(layers):
        if isinstance(p, tuple):  # already reduced by attention_topk
            p_idx = p[0] if len(p) == 3 and isinstance(p[0], Tensor) else None
            ok = p_idx is not None and p_idx.shape == (heads, len(tokens), k)
            got = list(p_idx.shape) if p_idx is not None else "a malformed tuple"
        else:
            ok = isinstance(p, Tensor) and p.ndim == 3 and p.shape == (heads, len(tokens), len(keys))
            got = list(p.shape) if isinstance(p, Tensor) else type(p).__name__
        if not ok:
            raise ValueError(f"layer {i}'s pattern is {got}; expected [heads={heads}, queries={len(tokens)}, "
                             f"keys={len(keys)}] (one per layer, batch axis selected), or attention_topk(pattern, "
                             f"{k}) of one")
        reduced.append(p if isinstance(p, tuple) else attention_topk(p, k))
    idx, w, mass = zip(*reduced, strict=True)
    raw = (torch.stack(idx).to(torch.int32).numpy().astype("<u2").tobytes()
           + torch.stack(w).numpy().tobytes() + torch.stack(mass).numpy().tobytes())
    layer_labels = [f"layer {i}" for i in range(len(layers))] if layer_labels is None else _strings(
        layer_labels, "layer_labels")
    head_labels = [f"head {h}" for h in range(heads)] if head_labels is None else _strings(head_labels, "head_labels")
    data = {"tokens": tokens, "keys": keys, "layers": layer_labels, "heads": head_labels, "k": k,
            "nq": len(tokens), "nk": len(keys), "bin": base64.b64encode(zlib.compress(raw, 6)).decode("ascii")}
    kept = "every key" if k >= len(keys) else f"the top {k} keys of each query (weights to 1/255)"
    note = f"{len(layers)} layers x {heads} heads, {len(tokens)} tokens; stored: {kept}."
    spans = "".join(f'<span class="g2f-tok" data-i="{i}">{escape(display_token(t))}</span>'
                    for i, t in enumerate(tokens))
    body = (f'<div class="g2f-attn"><script type="application/json" class="g2f-data">{script_json(data)}</script>'
            f'<p class="g2f-note">{escape(note)} Hover a token or a row; click to lock.</p>'
            '<div class="g2f-controls"><label>layer <select class="g2f-layer"></select></label> '
            '<label>tokens show <select class="g2f-mode"><option value="dst">attention paid: query → keys'
            '</option><option value="src">attention received: key ← queries</option></select></label></div>'
            '<div class="g2f-heads"></div><div class="g2f-main"><canvas class="g2f-canvas"></canvas>'
            '<div class="g2f-side"><div class="g2f-info">hover a token</div><ol class="g2f-list"></ol></div></div>'
            f'<div class="g2f-toks g2f-attn-toks">{spans}</div></div>')
    return View(title, body)

"""CPU products for decoding: the one home of gpt2fn's speed tricks for few-row matrix products.

Why: decoding multiplies a few rows (the batch) by every weight matrix, so a step is bound by reading the weights,
and torch runs a product of a few rows on one core. Splitting a weight in two halves and running the halves as one
batched product lets both cores stream. Two splits, both *views of the same storage* (no copy, no extra memory):

- on `in`: `[2, in/2, out]`, the two partial products summed (PERF-NOTES: 12 blocks 17.7 -> 13.3 ms/token). It
  serves one row (`IN_SPLIT_MAX_ROWS`), where it is as fast as any layout measured.
- on `out`: `[2, in, h]` with `h = ceil(out/2)` and strides `(out - h, out, 1)`: each half reads a band of columns
  of the `[in, out]` matrix in place (for an odd `out` the two bands share one column), the halves are joined.
  It serves 2..`OUT_SPLIT_MAX_ROWS` rows. GPT-2 124M's 48 block products + head, 2 threads, distinct weights:
  8 rows 38-39 ms against 45 (split on `in`) and 50 (plain `x @ W`); 16 rows 52 against 57 and 65; 32 rows 69
  against 85 and 96 (an ad-hoc interleaved timing; scripts/bench.py measures decoding end to end). A contiguous
  `[2, in, h]` copy ran no faster than the strided view, so no layout copies a matrix.

The policy, in one place (`layout_kind`): a weight is packed when it lives on the CPU in fp32, is contiguous,
more than one thread will run its products, and the products it will serve have at most `OUT_SPLIT_MAX_ROWS`
rows (split on `in` needs an even `in`, split on `out` at least two columns). `pack` returns the *decode layout*,
which `gpt2fn.decode.decode_params` puts in place of the `[in, out]` matrices; `gpt2fn.layers.linear` computes
`x @ W + b` for a 2-D `W` and calls `packed_affine` for a layout, so nothing depends on global state at the time of
the product: the layout is a value the caller holds. A layout split on `out` is told from one split on `in` by its
middle axis: it equals the input width. Every layout gives `x @ W + b` up to float rounding for any number of rows
(more rows than `OUT_SPLIT_MAX_ROWS`, a prefill, take the plain product over the same storage), under
`torch.func` transforms and `torch.compile` (tests/test_kernels.py).
"""

from typing import Literal

import torch
from torch import Tensor

__all__ = ["IN_SPLIT_MAX_ROWS", "OUT_SPLIT_MAX_ROWS", "SPLIT_MAX_ROWS", "layout_kind", "split_applies", "pack",
           "unpack", "packed_affine"]

IN_SPLIT_MAX_ROWS = 1
OUT_SPLIT_MAX_ROWS = 64
SPLIT_MAX_ROWS = OUT_SPLIT_MAX_ROWS  # products of more rows take the plain product over a layout's storage


def layout_kind(w: Tensor, *, rows: int, threads: int) -> Literal["in", "out"] | None:
    """Which split serves products of `rows` rows with `w` `[in, out]` fastest: "in", "out", or None (the plain
    matrix)."""
    if not (w.ndim == 2 and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
            and threads > 1 and 1 <= rows <= OUT_SPLIT_MAX_ROWS):
        return None
    if rows <= IN_SPLIT_MAX_ROWS and w.shape[0] % 2 == 0:
        return "in"
    return "out" if w.shape[1] >= 2 else None


def split_applies(w: Tensor, *, rows: int, threads: int) -> bool:
    """Whether `pack` lays `w` `[in, out]` out for products of `rows` rows (either split)."""
    return layout_kind(w, rows=rows, threads=threads) is not None


def pack(w: Tensor, *, rows: int, threads: int | None = None) -> Tensor:
    """`w` `[in, out]` as the decode layout that serves products of `rows` rows fastest (a view, never a copy):
    `[2, in/2, out]` split on `in`, `[2, in, ceil(out/2)]` split on `out`, or `w` itself where no split applies
    (see `layout_kind`). `threads` defaults to torch's current thread count. A layout is returned as it is."""
    threads = torch.get_num_threads() if threads is None else threads
    kind = layout_kind(w, rows=rows, threads=threads)
    if kind == "in":
        return w.view(2, w.shape[0] // 2, w.shape[1])
    if kind == "out":
        d_in, d_out = w.shape
        h = (d_out + 1) // 2
        return w.as_strided((2, d_in, h), (d_out - h, d_out, 1))
    return w


def _out_width(w: Tensor) -> int:
    """The `out` of a layout split on `out`, checked against its strides."""
    _, d_in, h = w.shape
    d_out = w.stride(1)
    if w.stride() != (d_out - h, d_out, 1) or d_out not in (2 * h, 2 * h - 1):
        raise ValueError(f"a layout [2, {d_in}, {h}] split on out must be the view made by gpt2fn.kernels.pack "
                         f"(strides (out - {h}, out, 1) with out {2 * h - 1} or {2 * h}), got strides "
                         f"{tuple(w.stride())}")
    return d_out


def _split_on_in(w: Tensor) -> bool:
    """Whether a layout is split on `in` (a contiguous `[2, in/2, out]`) rather than on `out` (a strided view
    whose rows are `out` apart, `out` >= 2 > its band width 1, or `out` > its band width)."""
    _, mid, last = w.shape
    return w.stride(2) == 1 and w.stride(1) == last and w.stride(0) == mid * last


def unpack(w: Tensor) -> Tensor:
    """The `[in, out]` matrix of a layout (a no-copy view); a 2-D matrix is returned as it is."""
    if w.ndim == 2:
        return w
    parts, mid, last = w.shape
    if _split_on_in(w):
        return w.reshape(parts * mid, last)
    return w.as_strided((mid, _out_width(w)), (w.stride(1), 1))


def packed_affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """`x @ W + b` for a layout `w` from `pack`. Split on `in` (`[2, in/2, out]`): the two halves of `in` as one
    batched product, summed. Split on `out` (`[2, in, h]`, middle axis the input width): the two column bands as
    one batched product, joined. Products of more than `SPLIT_MAX_ROWS` rows (a prefill) take the plain product
    over the same storage."""
    parts, mid, last = w.shape
    d_in = x.shape[-1]
    on_in = _split_on_in(w)
    if parts != 2 or (parts * mid if on_in else mid) != d_in:
        raise ValueError(f"layout {list(w.shape)} (split on {'in' if on_in else 'out'}) does not match an input "
                         f"of width {d_in}: pass the layout that gpt2fn.kernels.pack made for this matrix")
    rows = x.numel() // max(d_in, 1)
    if rows > SPLIT_MAX_ROWS or rows == 0:
        flat = unpack(w)
        y = x @ flat if b is None else torch.addmm(b, x.reshape(-1, d_in), flat)
        return y.view(*x.shape[:-1], flat.shape[1])
    if on_in:
        halves = torch.bmm(x.reshape(rows, parts, mid).transpose(0, 1), w)
        y = halves.sum(0) if b is None else halves.sum(0) + b
        return y.view(*x.shape[:-1], last)
    d_out = _out_width(w)
    xs = x.reshape(1, rows, d_in).expand(parts, rows, d_in)
    if b is None:
        bands = torch.bmm(xs, w)
    else:
        bands = torch.baddbmm(torch.stack([b[:last], b[d_out - last:]])[:, None], xs, w)
    if d_out == 2 * last:
        y = bands.transpose(0, 1).reshape(rows, d_out)
    else:
        y = torch.cat([bands[0], bands[1, :, 1:]], dim=1)
    return y.view(*x.shape[:-1], d_out)

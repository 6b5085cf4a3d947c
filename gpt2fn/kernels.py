"""CPU products for decoding: the one home of gpt2fn's speed tricks for few-row matrix products.

Why: decoding multiplies a few rows (the batch) by every weight matrix, so a step is bound by reading the weights
(and, from about 8 rows, by arithmetic as well). torch's products of 2..64 rows run far below both limits on the
CPUs this project is built on (MKL's small GEMMs: about 10 GB/s at 8 rows). Two families of decode layouts:

- **Panels** (`[P, in, SW]`, a copy), served by gpt2fn's native kernel (`gpt2fn.native`, built on first use):
  column `p*SW + j` of `W` is `panels[p, :, j]`, each panel contiguous, so each thread streams its panels front to
  back and keeps a block of up to 8 rows x one panel in vector registers (one weight load feeds 8 multiply-adds).
  `SW` is 48 or 64 floats with AVX-512 (16 or 32 with AVX2), the first width that divides `out`; a head whose
  vocabulary no width divides is padded with zero columns (`pad=True`) and its caller slices the logits. Any
  number of rows, one or many threads. GPT-2 124M's 48 block products + head, 2 threads, distinct weights
  (`scripts/bench.py --only products`, a quiet run): 1 row 15.1 ms (33 GB/s) against 22.9
  for the split views and 30.9 for `x @ W + b`; 8 rows 19.4 against 43.8 and 58.7; 32 rows 34.3 (231 GFLOP/s)
  against 88.5 and 110; 64 rows 55.0 against 134 and 155.
- **Views** of the `[in, out]` storage (no copy), the fallback when the native kernel is off (`gpt2fn.native.status`):
  split on `in` (`[2, in/2, out]`, the halves' partial products summed; one row) or on `out` (`[2, in, h]`,
  `h = ceil(out/2)`, strides `(out - h, out, 1)`: two column bands read in place, joined; 2..`OUT_SPLIT_MAX_ROWS`
  rows), each as one batched product so both cores stream (PERF-NOTES: 12 blocks 17.7 -> 13.3 ms/token).

The policy, in one place (`layout_kind`). `pack` returns the *decode layout*, which `gpt2fn.decode.decode_params`
puts in place of the `[in, out]` matrices; `gpt2fn.layers.linear` computes `x @ W + b` for a 2-D `W` and calls
`packed_affine` for a layout, so nothing depends on global state at the time of the product: the layout is a
value the caller holds. Every layout gives `x @ W + b` up to float rounding for any number of rows, and under
`torch.func` transforms, autograd and `torch.compile` a panel product takes torch's batched product over the same
panels instead of the native call (tests/test_kernels.py). Layouts are told apart by shape and strides: panels
are contiguous with the input width in the middle; a split on `in` has half of it there; a split on `out` is the
only strided one.
"""

import math
from typing import Literal

import torch
from torch import Tensor

from . import native

__all__ = ["IN_SPLIT_MAX_ROWS", "OUT_SPLIT_MAX_ROWS", "SPLIT_MAX_ROWS", "layout_kind", "split_applies", "pack",
           "unpack", "packed_affine", "panel_width", "to_panels", "native_applies"]

IN_SPLIT_MAX_ROWS = 1
OUT_SPLIT_MAX_ROWS = 64
SPLIT_MAX_ROWS = OUT_SPLIT_MAX_ROWS  # products of more rows take the plain product over a layout's storage


def panel_width(d_out: int, *, pad: bool = False) -> int | None:
    """The native kernel's fastest panel width that divides `d_out` (with `pad`, the fastest width when none
    does: the layout is then padded with zero columns); None without the kernel or without a width."""
    widths = native.panel_widths()
    for sw in widths:
        if d_out % sw == 0:
            return sw
    return widths[0] if pad and widths else None


def to_panels(w: Tensor, width: int) -> Tensor:
    """`w` `[in, out]` as panels `[ceil(out/width), in, width]` (a copy; columns past `out` are zero)."""
    d_in, d_out = w.shape
    parts = -(-d_out // width)
    panels = w.new_zeros(parts, d_in, width)
    full = d_out // width
    with torch.no_grad():
        if full:
            panels[:full].copy_(w[:, :full * width].unflatten(1, (full, width)).transpose(0, 1))
        if full < parts:
            panels[full, :, :d_out - full * width].copy_(w[:, full * width:])
    return panels


def layout_kind(w: Tensor, *, rows: int, threads: int, pad: bool = False, use_native: bool | None = None
                ) -> Literal["panels", "in", "out"] | None:
    """Which layout serves products of `rows` rows with `w` `[in, out]` fastest: "panels" (the native kernel,
    any rows and threads, when a panel width divides `out` or `pad` allows padding), "in", "out", or None (the
    plain matrix). `use_native` overrides whether the native kernel counts as available."""
    if not (w.ndim == 2 and w.device.type == "cpu" and w.dtype == torch.float32):
        return None
    use_native = native.available() if use_native is None else use_native
    if use_native and rows >= 1 and min(w.shape) >= 1 and panel_width(w.shape[1], pad=pad) is not None:
        return "panels"
    if not (w.is_contiguous() and threads > 1 and 1 <= rows <= OUT_SPLIT_MAX_ROWS):
        return None
    if rows <= IN_SPLIT_MAX_ROWS and w.shape[0] % 2 == 0:
        return "in"
    return "out" if w.shape[1] >= 2 else None


def split_applies(w: Tensor, *, rows: int, threads: int, use_native: bool | None = None) -> bool:
    """Whether `pack` lays `w` `[in, out]` out for products of `rows` rows (any layout)."""
    return layout_kind(w, rows=rows, threads=threads, use_native=use_native) is not None


def pack(w: Tensor, *, rows: int, threads: int | None = None, pad: bool = False, use_native: bool | None = None
         ) -> Tensor:
    """`w` `[in, out]` as the decode layout that serves products of `rows` rows fastest (see `layout_kind`):
    panels `[P, in, SW]` (a copy; with `pad`, `P * SW` may exceed `out` by zero columns, and the product then has
    `P * SW` columns), `[2, in/2, out]` split on `in` or `[2, in, ceil(out/2)]` split on `out` (views), or `w`
    itself. `threads` defaults to torch's current thread count. A layout is returned as it is."""
    threads = torch.get_num_threads() if threads is None else threads
    kind = layout_kind(w, rows=rows, threads=threads, pad=pad, use_native=use_native)
    if kind == "panels":
        width = panel_width(w.shape[1], pad=pad)
        assert width is not None
        return to_panels(w.detach(), width)
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


def _contiguous(w: Tensor) -> bool:
    """Whether a layout is contiguous (panels, or a split on `in`) rather than a split on `out` (a strided view
    whose rows are `out` apart, `out` >= 2 > its band width 1, or `out` > its band width)."""
    _, mid, last = w.shape
    return w.stride(2) == 1 and w.stride(1) == last and w.stride(0) == mid * last


def unpack(w: Tensor, d_in: int | None = None) -> Tensor:
    """The `[in, out]` matrix of a layout (a no-copy view for the splits; a copy of panels, with any padding
    columns); a 2-D matrix is returned as it is. `d_in` tells panels (input width in the middle) from a split on
    `in` (half of it) when both shapes fit; by default a contiguous layout with two parts is a split on `in`."""
    if w.ndim == 2:
        return w
    parts, mid, last = w.shape
    if _contiguous(w):
        if d_in == mid or (d_in is None and parts != 2):  # panels
            return w.transpose(0, 1).reshape(mid, parts * last)
        return w.reshape(parts * mid, last)
    return w.as_strided((mid, _out_width(w)), (w.stride(1), 1))


@torch.compiler.assume_constant_result
def _native_vector_width() -> int:
    """Floats per vector of the native build, 0 without it (a constant to torch.compile: it runs once, eagerly)."""
    return native.vector_width()


def _eligible(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """fp32 CPU tensors with nothing to differentiate, and panels of a width the kernel computes."""
    tensors = (x, w) if b is None else (x, w, b)
    vl = _native_vector_width()
    if not vl:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    width = w.shape[-1]
    return w.is_contiguous() and (b is None or b.is_contiguous()) and width % vl == 0 and width <= 4 * vl


def native_applies(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether an eager panel product calls the native kernel directly: plain fp32 CPU tensors, nothing to
    differentiate, no `torch.func` transform wrapping them, not tracing, and the kernel built."""
    if torch.compiler.is_compiling():
        return False
    tensors = [t for t in (x, w, b) if t is not None]
    if any(type(t) is not Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return _eligible(x, w, b)


def _native_product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The native kernel: `x` `[rows, in]` (contiguous) times panels `w`, plus `b` -> `[rows, P * SW]`."""
    parts, d_in, width = w.shape
    rows, d_out = x.shape[0], parts * width
    y = torch.empty(rows, d_out, dtype=x.dtype)
    lib = native.library()
    assert lib is not None
    lib.gpt2fn_panel_affine(x.data_ptr(), rows, d_in, d_in, w.data_ptr(), parts, width,
                            None if b is None else b.data_ptr(), y.data_ptr(), d_out, torch.get_num_threads())
    return y


@torch.library.custom_op("gpt2fn::panel_affine", mutates_args=())
def _panel_affine_op(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The native kernel as a torch operator, so a compiled graph (`torch.compile` of the decode step) calls it as
    one opaque node instead of lowering the product to inductor's own GEMM."""
    return _native_product(x.contiguous(), w, b)


@_panel_affine_op.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0] * w.shape[2])


def _panel_affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    parts, d_in, width = w.shape
    d_out = parts * width
    if b is not None and b.shape[-1] != d_out:
        raise ValueError(f"bias of {b.shape[-1]} entries for a panel layout of {d_out} columns ({parts} x {width})")
    rows = math.prod(x.shape[:-1])
    if rows and native_applies(x, w, b):
        return _native_product(x.reshape(rows, d_in).contiguous(), w, b).view(*x.shape[:-1], d_out)
    if rows and torch.compiler.is_compiling() and _eligible(x, w, b):
        return torch.ops.gpt2fn.panel_affine(x.reshape(rows, d_in), w, b).view(*x.shape[:-1], d_out)
    y = torch.matmul(x.reshape(1, rows, d_in), w).transpose(0, 1).reshape(rows, d_out)  # [P, rows, SW] -> rows
    if b is not None:
        y = y + b
    return y.view(*x.shape[:-1], d_out)


def packed_affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """`x @ W + b` for a layout `w` from `pack`. Panels (`[P, in, SW]`, contiguous, input width in the middle):
    the native kernel, or torch's batched product over the panels. Split on `in` (`[2, in/2, out]`): the two
    halves of `in` as one batched product, summed. Split on `out` (`[2, in, h]`, strided): the two column bands
    as one batched product, joined. Split products of more than `SPLIT_MAX_ROWS` rows (a prefill) take the plain
    product over the same storage."""
    parts, mid, last = w.shape
    d_in = x.shape[-1]
    contiguous = _contiguous(w)
    if contiguous and mid == d_in:
        return _panel_affine(x, w, b)
    on_in = contiguous
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

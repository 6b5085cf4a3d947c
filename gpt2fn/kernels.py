"""CPU products for decoding: the one home of gpt2fn's speed tricks for few-row matrix products.

Why: decoding multiplies a few rows (the batch) by every weight matrix, so a step is bound by reading the weights,
and torch runs a product of a few rows on one core. Splitting a weight in two halves along its `in` axis and
running the halves as one batched product lets both cores stream (PERF-NOTES: 12 blocks 17.7 -> 13.3 ms/token).

The policy, in one place (`split_applies`): a weight is packed when it lives on the CPU in fp32, is contiguous
with an even `in` axis, the products it will serve have at most `SPLIT_MAX_ROWS` rows, and more than one thread
will run them. Packing is explicit: `pack` returns a *decode layout*, a 3-D view `[2, in/2, out]` of the same
storage (no copy), which `gpt2fn.decode.decode_params` puts in place of the `[in, out]` matrices. `gpt2fn.layers.
linear` computes `x @ W + b` for a 2-D `W` and calls `packed_affine` for a layout, so nothing depends on global
state at the time of the product: the layout is a value the caller holds. Every layout gives `x @ W + b` up to
float rounding (tests/test_kernels.py).
"""

import torch
from torch import Tensor

__all__ = ["SPLIT_MAX_ROWS", "split_applies", "pack", "unpack", "packed_affine"]

SPLIT_MAX_ROWS = 16


def split_applies(w: Tensor, *, rows: int, threads: int) -> bool:
    """Whether products of `rows` rows with `w` `[in, out]` run faster split over two halves of `in`."""
    return (w.ndim == 2 and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
            and w.shape[0] % 2 == 0 and rows <= SPLIT_MAX_ROWS and threads > 1)


def pack(w: Tensor, *, rows: int, threads: int | None = None) -> Tensor:
    """`w` `[in, out]` as the decode layout that serves products of `rows` rows fastest: the view
    `[2, in/2, out]` when `split_applies`, else `w` itself. `threads` defaults to torch's current thread count."""
    threads = torch.get_num_threads() if threads is None else threads
    if split_applies(w, rows=rows, threads=threads):
        return w.view(2, w.shape[0] // 2, w.shape[1])
    return w


def unpack(w: Tensor) -> Tensor:
    """The `[in, out]` matrix of a layout (a no-copy view); a 2-D matrix is returned as it is."""
    return w if w.ndim == 2 else w.reshape(w.shape[0] * w.shape[1], w.shape[2])


def packed_affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """`x @ W + b` for a layout `w` `[2, in/2, out]` from `pack`: the two halves of `in` as one batched product,
    summed. Products of more than `SPLIT_MAX_ROWS` rows (a prefill) take the plain product over the same storage."""
    parts, half, d_out = w.shape
    d_in = x.shape[-1]
    if parts * half != d_in:
        raise ValueError(f"layout {list(w.shape)} does not match an input of width {d_in}")
    rows = x.numel() // max(d_in, 1)
    if rows > SPLIT_MAX_ROWS:
        flat = unpack(w)
        y = x @ flat if b is None else torch.addmm(b, x.reshape(-1, d_in), flat)
        return y.view(*x.shape[:-1], d_out)
    halves = torch.bmm(x.reshape(rows, parts, half).transpose(0, 1), w)
    y = halves.sum(0) if b is None else halves.sum(0) + b
    return y.view(*x.shape[:-1], d_out)

"""The products of the model, and the one policy that picks their kernel: `affine(x, W, b)` and `affine_t(x, E)`;
also the kernel of a decode step's attention (`attend_applies`, `native_attend`).

    affine(x, W, b)    x @ W + b    W [in, out]       every block matrix, and an untied head
    affine_t(x, E)     x @ E^T      E [out, in]       the tied head: the token embedding [vocab, d_model]

Both read the matrices the caller holds, in place: no copy and no layout of gpt2fn's own, on any device, for any
dtype (DESIGN principle 6). Which kernel computes them is decided here and nowhere else:

- **gpt2fn's native kernel** (`gpt2fn.native`, built on first use) for CPU products of fp32 activations with at
  most `NATIVE_MAX_ROWS` rows (decoding: the batch, or a short prompt) and nothing to differentiate: each of two
  threads reads its half of the stored matrix (half of the rows of W, the full width) front to back once per
  step, prefetching the next chunk in address order, and keeps a block of rows x a band of columns in vector
  registers; the halves are summed at the end. They are fixed by the matrix's size alone, so a row's result has
  the same bits on any thread count and alone or in any batch. The tied head is the dot-product orientation (each
  vocabulary row contiguous), which the kernel reads as it is. The weights may be stored fp32, bf16, fp16 or int8
  with a scale per output column (`gpt2fn.quantize`), the bias fp32 or 16-bit: they are widened to fp32 in
  registers, so a step reads 2 or 1 bytes per weight instead of 4, and accumulates in fp32. int8 on a CPU with
  AVX-512BW takes integer products instead (`native.int8_integer`): each input row is rounded to 16-bit integers
  with one scale and the sums are exact int32 (vpdpwssd with VNNI), 32 multiply-adds per instruction against the
  16 of a widened fp32 FMA; the rounding of the input is at most 1/(2 amax) of the row's largest value, amax =
  min(32767, (2^31 - 1) // 127 // in) (1/44000 for 768 inputs, 1/11000 for 3072), against the weights' own 1/254
  of each column's.
- On CPU, activations are fp32 whatever the weights' dtype (`GPTParams.compute_dtype`): where torch computes a
  product of fp32 activations with 16-bit or int8 weights (autograd, more rows), it widens the matrix first.
- **torch's own product** (`torch.addmm`, `x @ E.T`) everywhere else: more rows (a long prefill, training; MKL's
  GEMM is good there), autograd, `torch.func` transforms, other dtypes and devices, and whenever the native
  kernel is off (no compiler, `GPT2FN_NATIVE=0`). Under `torch.compile` the native kernel is the torch operator
  `gpt2fn::affine` (`gpt2fn::affine_t`), one opaque node of the graph.

Why (measured, `scripts/bench.py --only products`; GPT-2 124M's 48 block products + the head, distinct weights, 2
threads, ms per step): on an AMD EPYC (AVX-512), run 5 of docs/performance.md, fp32 native 18.3 / 21.4 / 60.1 ms
at 1 / 8 / 32 rows against torch's 34.5 / 70.9 / 103, 1.23x still at 128 rows (231 against 284). On an Intel Xeon
(AVX-512 + VNNI) MKL's 1-row product is already near the bandwidth (17.4 ms) and a prototype of this kernel gave
17.2; at 8 rows MKL packed 26.2 against the prototype's 31 (docs/performance.md has the rows of each CPU). One
policy, no per-CPU switch: the kernel is never slower than torch where it was measured at 1 row and leads by
1.4-3.7x at 2-64 rows on the AMD; `NATIVE_MAX_ROWS` is where torch's GEMM catches up.

A decode step's attention (`gpt2fn.layers.attend_fast`) takes the native `attend.cpp` for one query per row on CPU,
eager, with nothing to differentiate: the cache's keys and values are read in place (fp32, or 16-bit with
`cache_dtype=`), the softmax is fp32. A one-token step that donates its cache and has no tap (what `generate` runs)
goes further (`native_attend_append`, from `gpt2fn.layers.attention`): one call writes the step's key and value
into the cache, attends, and merges the heads, straight from the qkv product, with the same bits as the separate
calls. The torch calls around the kernel (splitting the heads, two `index_copy_`, slicing to the visible slots,
merging) cost more than its reads at batch 1. Prefills, speculative verification (several queries),
`torch.compile`, autograd and other devices take torch's scaled-dot-product attention.
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import native
from .params import Int8Matrix, Matrix

__all__ = ["NATIVE_MAX_ROWS", "affine", "affine_t", "native_applies", "native_affine", "native_affine_t",
           "attend_applies", "native_attend", "attend_append_applies", "native_attend_append"]

# Products of more rows take torch's GEMM (a prefill, training): the native kernel keeps its lead over MKL up to
# about 128 rows on the AMD EPYC (docs/performance.md)
NATIVE_MAX_ROWS = 128


_STORED = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int8: "i8"}
"""The native kernel's entry point per stored weight dtype (`gpt2fn.native.STORED_TYPES`)."""


@torch.compiler.assume_constant_result
def _native_on() -> bool:
    """Whether the native kernel is built (a constant to torch.compile: it runs once, eagerly)."""
    return native.vector_width() > 0


@torch.compiler.assume_constant_result
def _native_has(name: str) -> bool:
    return native.has_type(name)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(t: Tensor, dtype: torch.dtype | None = torch.float32) -> bool:
    """A plain CPU tensor (of `dtype`, when given): not a subclass, not wrapped by a `torch.func` transform,
    nothing to differentiate."""
    return (type(t) is Tensor and t.is_cpu and (dtype is None or t.dtype == dtype) and not _wrapped(t)
            and not (t.requires_grad and torch.is_grad_enabled()))


def _parts(w: Matrix) -> tuple[Tensor, Tensor | None]:
    """The stored tensor and its per-column scales (int8 only)."""
    return (w.q, w.scale) if isinstance(w, Int8Matrix) else (w, None)


def native_applies(x: Tensor, w: Matrix, b: Tensor | None = None) -> bool:
    """Whether the product of `x` `[..., in]` with the 2-D `w` (`W` of `affine`, `E` of `affine_t`; plus `b`) runs on
    the native kernel: the kernel built with an entry point for `w`'s stored dtype (fp32, bf16, fp16, or an
    `Int8Matrix`), plain CPU tensors with nothing to differentiate, fp32 activations and int8 scales,
    `w` with unit stride along its second axis, `b` contiguous, and at most `NATIVE_MAX_ROWS` rows. Under
    `torch.compile` the same rule holds, on the traced tensors' properties."""
    stored, scale = _parts(w)
    return _applies(x, stored, scale, b, torch.compiler.is_compiling())


def _applies(x: Tensor, stored: Tensor, scale: Tensor | None, b: Tensor | None, compiling: bool) -> bool:
    """`native_applies` on the parts of the matrix, `compiling` given (the products call it once per call)."""
    name = _STORED.get(stored.dtype)
    if name is None or (name == "i8") != (scale is not None):
        return False
    if not _native_on() or not _native_has(name) or stored.ndim != 2 or stored.stride(1) != 1:
        return False
    if stored.shape[0] < 1 or stored.shape[1] < 1:
        return False
    rows = math.prod(x.shape[:-1])
    if not 1 <= rows <= NATIVE_MAX_ROWS:
        return False
    if compiling:
        fp32 = [x] if scale is None else [x, scale]  # the bias may be stored in the weights' dtype: it is widened
        other = [stored] if b is None else [stored, b]
        return (all(t.dtype == torch.float32 for t in fp32)
                and all(t.device.type == "cpu" and not t.requires_grad for t in fp32 + other))
    return (_plain(x) and _plain(stored, None) and (b is None or (_plain(b, None) and b.is_contiguous()))
            and (scale is None or (_plain(scale) and scale.is_contiguous())))


@functools.cache
def _entry(kind: str, dtype: torch.dtype) -> Callable[..., int]:
    """The kernel's entry point `gpt2fn_<kind>_<stored type>` (kind: affine, affine_t, attend, attend_append)."""
    return getattr(native.library(), f"gpt2fn_{kind}_{_STORED[dtype]}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_BIAS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The bias dtypes the kernel widens itself (code passed as `btype`); any other is made fp32 first."""


def native_affine(x: Tensor, w: Tensor, b: Tensor | None, scale: Tensor | None = None) -> Tensor:
    """The native kernel itself, no policy (the caller has checked `native_applies`): `x` `[..., in]` (fp32, unit
    stride along `in`) @ `w` `[in, out]` (fp32, bf16, fp16, or int8 times `scale` `[out]`) + `b` (contiguous;
    fp32, bf16 or fp16, widened by the kernel), `[..., out]`. The output is made in its final shape and a
    contiguous `x` is read as it is (no reshape, no view: a decode step makes 49 of these calls, and each torch call
    around the kernel costs microseconds)."""
    d_in, d_out = x.shape[-1], w.shape[1]
    if x.ndim == 2 and x.stride(1) == 1:
        flat, rows, ldx = x, x.shape[0], x.stride(0)
    elif x.is_contiguous():
        flat, rows, ldx = x, x.numel() // d_in, d_in
    else:
        flat = _rows(x)
        rows, ldx = flat.shape[0], flat.stride(0)
    y = torch.empty(*x.shape[:-1], d_out, dtype=torch.float32)
    if b is not None and b.dtype not in _BIAS:
        b = b.to(torch.float32)
    _entry("affine", w.dtype)(flat.data_ptr(), rows, d_in, ldx, w.data_ptr(), d_out, w.stride(0), _ptr(scale),
                              _ptr(b), 0 if b is None else _BIAS[b.dtype], y.data_ptr(), d_out,
                              torch.get_num_threads(), 0)
    return y


def native_affine_t(x: Tensor, e: Tensor, scale: Tensor | None = None) -> Tensor:
    """The native kernel itself, no policy: `x` `[rows, in]` @ `e.T`, `e` `[out, in]` (unit stride along `in`;
    fp32, bf16, fp16, or int8 times `scale` `[out]`)."""
    rows, d_in = x.shape
    d_out = e.shape[0]
    y = torch.empty(rows, d_out, dtype=torch.float32)
    _entry("affine_t", e.dtype)(x.data_ptr(), rows, d_in, x.stride(0), e.data_ptr(), d_out, e.stride(0), _ptr(scale),
                                y.data_ptr(), d_out, torch.get_num_threads())
    return y


def _rows(x: Tensor) -> Tensor:
    """`x` as `[rows, in]` with unit stride along `in` (a view where it can be)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


@torch.library.custom_op("gpt2fn::affine", mutates_args=())
def _affine_op(x: Tensor, w: Tensor, b: Tensor | None, scale: Tensor | None) -> Tensor:
    """The native kernel as a torch operator, so a compiled graph (`torch.compile` of the decode step) calls it as
    one opaque node instead of lowering the product to inductor's own GEMM."""
    return native_affine(_rows(x), w, b, scale)


@_affine_op.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None, scale: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1], dtype=torch.float32)


@torch.library.custom_op("gpt2fn::affine_t", mutates_args=())
def _affine_t_op(x: Tensor, e: Tensor, scale: Tensor | None) -> Tensor:
    """`affine_t`'s native kernel as a torch operator (see `gpt2fn::affine`)."""
    return native_affine_t(_rows(x), e, scale)


@_affine_t_op.register_fake
def _(x: Tensor, e: Tensor, scale: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], e.shape[0], dtype=torch.float32)


def affine(x: Tensor, w: Matrix, b: Tensor | None) -> Tensor:
    """`x @ W + b` for `x` `[..., in]` and a matrix `W` `[in, out]` read in place, in `x`'s dtype (see the module
    docstring for the kernel that computes it; `W` may be stored in another dtype, or as an `Int8Matrix`)."""
    stored, scale = (w, None) if type(w) is Tensor else _parts(w)
    fits = x.shape[-1] == stored.shape[0] and (b is None or b.shape == (stored.shape[1],))
    compiling = torch.compiler.is_compiling()
    if fits and _applies(x, stored, scale, b, compiling):
        if not compiling:
            return native_affine(x, stored, b, scale)
        bias = b if b is None or b.dtype == torch.float32 else b.to(torch.float32)
        return torch.ops.gpt2fn.affine(_rows(x), stored, bias, scale).view(*x.shape[:-1], stored.shape[1])
    out = (*x.shape[:-1], stored.shape[1])
    flat = x.reshape(-1, x.shape[-1])
    if scale is not None:  # torch's product of the int8 values, then the column scales (no dequantized copy kept)
        y = (flat @ stored.to(x.dtype)) * scale.to(x.dtype)
        return (y if b is None else y + b.to(x.dtype)).view(out)
    if b is None:
        return (flat @ stored.to(x.dtype)).view(out)
    return torch.addmm(b.to(x.dtype), flat, stored.to(x.dtype)).view(out)


def affine_t(x: Tensor, e: Matrix) -> Tensor:
    """`x @ E^T` for `x` `[..., in]` and `E` `[out, in]` read in place: the tied head, `E` the token embedding (which
    may be stored in another dtype, or as an `Int8Matrix` with a scale per row)."""
    stored, scale = _parts(e)
    compiling = torch.compiler.is_compiling()
    if x.shape[-1] == stored.shape[1] and _applies(x, stored, scale, None, compiling):
        op = torch.ops.gpt2fn.affine_t if compiling else native_affine_t
        return op(_rows(x), stored, scale).view(*x.shape[:-1], stored.shape[0])
    y = x @ stored.to(x.dtype).T
    return y if scale is None else y * scale.to(x.dtype)


def attend_applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether the attention of a decode step runs on the native kernel (`attend.cpp`): eager (not compiling), plain
    CPU tensors with nothing to differentiate, one query per row and head (`q` `[batch, heads, 1, head_dim]`, fp32),
    keys and values of the same dtype (fp32, bf16 or fp16: a 16-bit cache is read in place), unit stride along
    `head_dim` and the same slot stride, and `mask` (which slots each row sees) bool, `[batch, 1, 1, slots]` or
    `[1, slots]`, or None (every slot)."""
    if torch.compiler.is_compiling() or q.ndim != 4 or q.shape[2] != 1 or k.ndim != 4 or k.shape != v.shape:
        return False
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or k.shape[2] < 1 or d < 1:
        return False
    return q.stride(3) == 1 and _reads_cache(k, v, mask, b, k.shape[2]) and _plain(q)


def _reads_cache(k: Tensor, v: Tensor, mask: Tensor | None, batch: int, width: int) -> bool:
    """What both native attentions need of the cache and the mask: keys and values of one dtype the kernel reads
    (fp32, bf16, fp16), unit stride along `head_dim` and one slot stride, and `mask` None or bool `[batch, 1, 1,
    width]` or `[1, width]`; all plain CPU tensors with nothing to differentiate."""
    name = _STORED.get(k.dtype)
    if name is None or name == "i8" or v.dtype != k.dtype or not _native_on() or not _native_has(name):
        return False
    if k.stride(3) != 1 or v.stride(3) != 1 or k.stride(2) != v.stride(2):
        return False
    if mask is not None and (mask.dtype != torch.bool or not (mask.shape == (batch, 1, 1, width)
                                                             or mask.shape == (1, width))
                             or not _plain(mask, torch.bool)):
        return False
    return _plain(k, None) and _plain(v, None)


def native_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The native attention itself, no policy (the caller has checked `attend_applies`): `softmax(q k^T /
    sqrt(head_dim))` over the visible slots, times `v`, `[batch, heads, 1, head_dim]` fp32, laid out as `[batch, 1,
    heads, head_dim]` so that merging the heads is a view."""
    b, h, _, d = q.shape
    width = k.shape[2]
    z = torch.empty(b, 1, h, d, dtype=torch.float32)
    m, msb, mst = _mask_args(mask)
    _entry("attend", k.dtype)(q.data_ptr(), b, h, d, q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
                              k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), width, m, msb, mst,
                              1.0 / math.sqrt(d), z.data_ptr(), z.stride(0), z.stride(2), torch.get_num_threads())
    return z.transpose(1, 2)


def _mask_args(mask: Tensor | None) -> tuple[int | None, int, int]:
    """The mask's pointer and its (row, slot) strides as the native attention takes them."""
    if mask is None:
        return None, 0, 0
    if mask.ndim == 4:
        return mask.data_ptr(), mask.stride(0), mask.stride(3)
    return mask.data_ptr(), 0, mask.stride(1)


def attend_append_applies(qkv: Tensor, k: Tensor, v: Tensor, slots: Tensor, mask: Tensor, n_heads: int) -> bool:
    """Whether a one-token decode step's attention runs as one native call (`native_attend_append`): eager, plain
    CPU tensors with nothing to differentiate, the qkv product `[batch, 1, 3 * heads * head_dim]` fp32 with unit
    stride along its last axis, the cache buffers `k` and `v` `[batch, heads, capacity, head_dim]` and `mask` as
    `attend_applies` takes them (the mask's width at most the capacity), and one slot (`slots` int64, one
    element) to write the new key and value to."""
    if torch.compiler.is_compiling() or qkv.ndim != 3 or qkv.shape[1] != 1 or k.ndim != 4 or k.shape != v.shape:
        return False
    b, h, capacity, d = k.shape
    if (h != n_heads or d < 1 or qkv.shape[0] != b or qkv.shape[2] != 3 * h * d or qkv.stride(2) != 1
            or qkv.dtype != torch.float32):
        return False
    if slots.dtype != torch.int64 or slots.numel() != 1 or not _plain(slots, None) or mask.shape[-1] > capacity:
        return False
    return _reads_cache(k, v, mask, b, mask.shape[-1]) and _plain(qkv)


def native_attend_append(qkv: Tensor, k: Tensor, v: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
    """The native one-token attention, no policy (the caller has checked `attend_append_applies`): the step's keys
    and values (the second and third thirds of `qkv`) written into slot `slots[0]` of the cache buffers `k` and `v`,
    in place and rounded to their dtype (as `index_copy_` writes them), then the queries (the first third)
    attended over the mask's `width` slots as `native_attend` does. Returns `z` with the heads merged,
    `[batch, 1, heads * head_dim]` fp32: the same bits as `native_attend` after writing the slot with torch."""
    b, h, _, d = k.shape
    width = mask.shape[-1]
    z = torch.empty(b, 1, h * d, dtype=torch.float32)
    m, msb, mst = _mask_args(mask)
    at, row = qkv.data_ptr(), qkv.stride(0)
    done = _entry("attend_append", k.dtype)(
        at, b, h, d, row, d, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), width, m, msb, mst, 1.0 / math.sqrt(d), z.data_ptr(), h * d, d, torch.get_num_threads(),
        at + 4 * h * d, at + 8 * h * d, row, d, slots.data_ptr())
    if done != 0:
        raise ValueError(f"the slot to write, {int(slots.reshape(()))}, is not one of the {width} slots the mask "
                         "covers; the mask must cover every slot written so far (see gpt2fn.model.walk)")
    return z

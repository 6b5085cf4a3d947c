"""8-bit weight-only quantization: `quantize(params, "int8")` and its inverse `dequantize(params)`.

    q8 = gpt2fn.quantize(params, "int8")     # every matrix int8, one fp32 scale per output column
    gpt2fn.generate(q8, "Hello")             # forward, decode_step, generate, stream, beam search, score accept it
    gpt2fn.save(q8, "model-int8.safetensors"); gpt2fn.load("model-int8.safetensors")   # round-trips
    params32 = gpt2fn.dequantize(q8)         # the fp32 tree it stands for (to train, edit or study weights)

Which leaves: the four matrices of every block and the head (the token embedding for a tied head, whose rows are
the head's output columns; its scales also dequantize an embedding lookup). Biases, layer norms and the position
embedding stay fp32: together they are under 1% of GPT-2 124M's weights and each feeds every position.

The format (symmetric, per output column): `scale[j] = max_i |W[i, j]| / 127`, `q[i, j] = round(W[i, j] / scale[j])`
clamped to [-127, 127], so a column's error is at most `scale[j] / 2` per entry. It is the format of CTranslate2's
`int8_float32` and of `torch.ao`'s weight-only int8, and the one a matrix-vector kernel reads fastest: the
product's reduction runs along the input axis, so a column scale multiplies each output once, after the sum
(`gpt2fn.kernels`). Activations stay fp32 (`GPTParams.compute_dtype`).

Functions that differentiate or edit the weights (`loss`, training, `gpt2fn.transforms`, the weight-based study
tools) refuse a quantized tree with a `QuantizedWeightsError` naming `gpt2fn.dequantize`: a gradient with respect to
int8 values, or an edited matrix rounded back to int8, is not what anyone asking for one means.
"""

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .params import (
    AttentionParams,
    BlockParams,
    GPTParams,
    Int8Matrix,
    MLPParams,
    expected_shapes,
    init_params_meta,
    is_quantized,
    key_report,
    named_leaves,
)

__all__ = ["FORMATS", "quantize", "dequantize", "quantize_matrix", "QuantizedWeightsError", "refuse_quantized",
           "quantized_shapes", "quantized_from_dict"]

FORMATS = ("int8",)
"""The formats `quantize` makes."""


class QuantizedWeightsError(TypeError):
    """A function that differentiates or edits weights was given a quantized tree."""


def refuse_quantized(params: Any, what: str) -> None:
    """Raise `QuantizedWeightsError` when `params` holds int8 matrices; `what` names the refusing function."""
    if is_quantized(params):
        raise QuantizedWeightsError(
            f"{what} differentiates or edits the weights, and these are int8 (gpt2fn.quantize); run it on "
            "gpt2fn.dequantize(params), the fp32 tree they stand for")


def quantize_matrix(w: Tensor, axis: int = 1) -> Int8Matrix:
    """`w` as int8 with one fp32 scale per index of `axis` (the output axis: 1 for `[in, out]`, 0 for the token
    embedding), symmetric, rounded to nearest. An all-zero column gets scale 1 (its values are exactly 0)."""
    if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_matrix takes a 2-D floating tensor, got {getattr(w, 'shape', type(w))}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1 (the output axis), got {axis!r}")
    w32 = w.detach().to(torch.float32)
    top = w32.abs().amax(dim=1 - axis)
    if not bool(torch.isfinite(top).all()):
        raise ValueError("the matrix holds inf or nan; int8 cannot represent it")
    scale = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    s = scale[None, :] if axis == 1 else scale[:, None]
    q = torch.round(w32 / s).clamp_(-127, 127).to(torch.int8)
    return Int8Matrix(q.contiguous(), scale.contiguous(), axis)


def quantize(params: GPTParams, format: str = "int8") -> GPTParams:
    """A tree whose matrices (every block's four, and the head) are int8 with a fp32 scale per output column;
    biases, norms and the position embedding fp32 (see the module docstring). `params` is not changed."""
    if not isinstance(params, GPTParams):
        raise TypeError(f"quantize takes a GPTParams tree (gpt2fn.load / init_params), got {type(params).__name__}")
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; choose one of {', '.join(FORMATS)} (16-bit "
                         "weights need no quantizer: gpt2fn.load(src, dtype='bf16') or tree_to(params, dtype=...))")
    if is_quantized(params):
        raise ValueError("params are already quantized; gpt2fn.dequantize(params) gives the fp32 tree")

    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(torch.float32)

    def norm(p: Any) -> Any:
        return p.replace(scale=f32(p.scale), shift=f32(p.shift))

    blocks = tuple(
        BlockParams(norm(b.norm1),
                    AttentionParams(quantize_matrix(b.attn.w_qkv), f32(b.attn.b_qkv), quantize_matrix(b.attn.w_out),
                                    f32(b.attn.b_out)),
                    norm(b.norm2),
                    MLPParams(quantize_matrix(b.mlp.w_fc), f32(b.mlp.b_fc), quantize_matrix(b.mlp.w_proj),
                              f32(b.mlp.b_proj)))
        for b in params.blocks)
    head = None if params.head is None else quantize_matrix(params.head, axis=1)
    return GPTParams(quantize_matrix(params.tok_emb, axis=0), f32(params.pos_emb), blocks, norm(params.final_norm),
                     head, params.config)


def dequantize(params: GPTParams, dtype: torch.dtype = torch.float32) -> GPTParams:
    """The floating tree a quantized tree stands for (`q * scale` for every int8 matrix), every leaf in `dtype`.
    A tree with no int8 matrix is returned cast to `dtype`."""
    if not isinstance(params, GPTParams):
        raise TypeError(f"dequantize takes a GPTParams tree, got {type(params).__name__}")
    tree = pytree.tree_map_only(Int8Matrix, lambda m: m.dequantize(dtype), params,
                                is_leaf=lambda n: isinstance(n, Int8Matrix))
    return pytree.tree_map_only(Tensor, lambda t: t.to(dtype), tree)


def _matrix_axes(config: Any) -> dict[str, int]:
    """The names of the matrices `quantize` makes int8, with their output axis."""
    names = {"tok_emb": 0} if config.tie_head else {"tok_emb": 0, "head": 1}
    for i in range(config.n_layers):
        for m in ("attn.w_qkv", "attn.w_out", "mlp.w_fc", "mlp.w_proj"):
            names[f"blocks.{i}.{m}"] = 1
    return names


def quantized_shapes(config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every leaf name of an int8 tree of `config` (as `named_leaves` gives them: `<matrix>.q`, `<matrix>.scale`),
    with its shape and dtype: the layout of a quantized safetensors file."""
    axes = _matrix_axes(config)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in expected_shapes(config).items():
        if name in axes:
            out[f"{name}.q"] = (shape, torch.int8)
            out[f"{name}.scale"] = ((shape[axes[name]],), torch.float32)
        else:
            out[name] = (shape, torch.float32)
    return out


def quantized_from_dict(config: Any, tensors: dict[str, Tensor], *, source: str = "checkpoint") -> GPTParams:
    """An int8 tree from `{name: tensor}` (names and dtypes of `quantized_shapes`), reporting every missing,
    unexpected, mis-shaped or mis-typed key at once (a ValueError)."""
    want = quantized_shapes(config)
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    wrong = [f"{k}: got {list(tensors[k].shape)} {tensors[k].dtype}, expected {list(s)} {d}"
             for k, (s, d) in want.items() if k in tensors and (tuple(tensors[k].shape) != s or tensors[k].dtype != d)]
    if missing or unexpected or wrong:
        raise ValueError(key_report(f"{source} does not match an int8 tree of {config}:", missing, unexpected, wrong))
    axes = _matrix_axes(config)

    def leaf(name: str) -> Any:
        if name in axes:
            return Int8Matrix(tensors[f"{name}.q"], tensors[f"{name}.scale"], axes[name])
        return tensors[name]

    skeleton = init_params_meta(config)
    leaves, spec = pytree.tree_flatten(skeleton)
    names = [name for name, _ in named_leaves(skeleton)]
    assert len(names) == len(leaves)
    return pytree.tree_unflatten([leaf(n) for n in names], spec)

"""Per-head weight views in TransformerLens's layout, as views of the stored tensors (no copies).

`attn_weights(params, layer)` splits the fused `w_qkv` `[d_model, 3*d_model]` and `w_out` `[d_model, d_model]` of
one layer into `W_Q, W_K, W_V` `[heads, d_model, head_dim]`, `W_O` `[heads, head_dim, d_model]` and the biases
`b_Q, b_K, b_V` `[heads, head_dim]`, `b_O` `[d_model]`. Layers are stored as separate tensors, so a view spans one
layer; `torch.stack` them for a `[layer, ...]` copy. Writing into a view writes the model's weights.
"""

from typing import NamedTuple

from torch import Tensor

from ..params import GPTParams, head_matrix
from ..quantize import refuse_quantized

__all__ = ["HeadWeights", "attn_weights", "W_E", "W_pos", "W_U"]


class HeadWeights(NamedTuple):
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    b_Q: Tensor | None
    b_K: Tensor | None
    b_V: Tensor | None
    b_O: Tensor | None


def _layer(params: GPTParams, layer: int) -> int:
    refuse_quantized(params, "attn_weights")
    n = params.config.n_layers
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer must be an int in 0..{n - 1} (or -{n}..-1); got {layer!r}")
    return layer % n


def attn_weights(params: GPTParams, layer: int) -> HeadWeights:
    """Layer `layer`'s attention weights per head, each a view of `w_qkv` / `w_out` / `b_qkv` / `b_out`."""
    cfg = params.config
    p = params.blocks[_layer(params, layer)].attn
    h, hd, d = cfg.n_heads, cfg.head_dim, cfg.emb_dim
    w = [p.w_qkv[:, i * d:(i + 1) * d].view(d, h, hd).permute(1, 0, 2) for i in range(3)]
    b = [None if p.b_qkv is None else p.b_qkv[i * d:(i + 1) * d].view(h, hd) for i in range(3)]
    return HeadWeights(*w, p.w_out.view(h, hd, d), *b, p.b_out)


def W_E(params: GPTParams) -> Tensor:
    """The token embedding `[vocab, d_model]` (the stored tensor itself)."""
    refuse_quantized(params, "W_E")
    return params.tok_emb


def W_pos(params: GPTParams) -> Tensor:
    """The position embedding `[context, d_model]` (the stored tensor itself)."""
    return params.pos_emb


def W_U(params: GPTParams) -> Tensor:
    """The unembedding `[d_model, vocab]`: the untied head, or a transposed view of the token embedding."""
    refuse_quantized(params, "W_U")
    return head_matrix(params)

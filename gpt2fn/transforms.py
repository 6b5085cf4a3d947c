"""Weight transforms `GPTParams -> GPTParams` that change the parameters but not what the model computes.

Never applied by default; each returns a new tree (the input is untouched) and is pinned by a property test:

- `fold_layer_norm`: move each layer norm's scale and shift into the linear map that reads it, leaving pure
  normalisations (scale 1, shift 0). Logits are unchanged up to rounding.
- `center_unembed`: subtract from each row of the unembedding its mean over the vocabulary. Every logit of a
  position moves by the same amount, so the softmax (and the argmax, and the loss) is unchanged.

- `center_writing_weights`: subtract from every matrix and bias that writes into the residual stream (the
  embeddings, each attention output and MLP output) its mean over `d_model`. Every reader of the stream is a
  layer norm, which removes the mean anyway, so logits are unchanged up to rounding; the residual stream itself
  becomes zero-mean at every position (TransformerLens's `center_writing_weights`).
- `fold_value_biases`: move the value biases into the attention output bias (`b_out += b_V @ w_out`): a pattern's
  rows sum to 1, so `pattern @ (v + b_V) = pattern @ v + b_V`. Logits and the residual stream are unchanged;
  `attn.v`/`attn.z`/`attn.result` lose the bias (TransformerLens's `fold_value_biases`).

These give interpretability a cleaner basis (as in TransformerLens' `fold_ln` / `center_unembed` /
`center_writing_weights` / `fold_value_biases`); SAEs trained on a processed TransformerLens model read the
processed activations (`gpt2fn.study.sae.prepare_for_sae` applies what an SAE's config names). A transform that
has to write a tied unembedding unties it: the head becomes its own `[d_model, vocab]` matrix (154 MB for 124M in
fp32) and `config.tie_head` becomes False. Work is done in at least fp32 and cast back to the parameters' dtype.
"""

import torch
from torch import Tensor

from .params import BlockParams, GPTParams, LayerNormParams, head_matrix
from .quantize import refuse_quantized

__all__ = ["fold_layer_norm", "center_unembed", "center_writing_weights", "fold_value_biases"]


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _fold(norm: LayerNormParams, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(x_hat * g + s) @ W + b == x_hat @ (g[:, None] * W) + (s @ W + b)."""
    dt = _work_dtype(w)
    w32, g = w.to(dt), norm.scale.to(dt)
    new_w = g[:, None] * w32
    if norm.shift is None:
        return new_w.to(w.dtype), b
    new_b = norm.shift.to(dt) @ w32 + (0 if b is None else b.to(dt))
    return new_w.to(w.dtype), new_b.to(w.dtype)


def _identity_norm(norm: LayerNormParams) -> LayerNormParams:
    return LayerNormParams(torch.ones_like(norm.scale), None if norm.shift is None else torch.zeros_like(norm.shift))


def fold_layer_norm(params: GPTParams, *, final: bool = True) -> GPTParams:
    """Fold every block's `norm1` into the q/k/v projection and `norm2` into the MLP's first matrix; with
    `final=True` also fold the final norm's scale into the unembedding.

    A norm's shift becomes a bias of the map it feeds (a model without q/k/v biases gains them:
    `config.qkv_bias` becomes True). The model has no unembedding bias, so the final norm keeps its shift
    expressed as `shift / scale` (exact while no scale entry is 0; a ValueError names them otherwise).
    """
    refuse_quantized(params, "fold_layer_norm")
    cfg = params.config
    qkv_bias = cfg.qkv_bias
    blocks = []
    for bp in params.blocks:
        w_qkv, b_qkv = _fold(bp.norm1, bp.attn.w_qkv, bp.attn.b_qkv)
        w_fc, b_fc = _fold(bp.norm2, bp.mlp.w_fc, bp.mlp.b_fc)
        qkv_bias = qkv_bias or b_qkv is not None
        blocks.append(BlockParams(norm1=_identity_norm(bp.norm1), attn=bp.attn.replace(w_qkv=w_qkv, b_qkv=b_qkv),
                                  norm2=_identity_norm(bp.norm2), mlp=bp.mlp.replace(w_fc=w_fc, b_fc=b_fc)))
    out = params.replace(blocks=tuple(blocks), config=cfg.replace(qkv_bias=qkv_bias))
    if not final:
        return out
    norm = params.final_norm
    zero = (norm.scale == 0).nonzero().flatten().tolist()
    if zero and norm.shift is not None:
        raise ValueError(f"cannot fold the final norm: its scale is 0 at {zero[:10]}, so its shift cannot move past "
                         "the unembedding (there is no unembedding bias). Use fold_layer_norm(params, final=False)")
    unembed = head_matrix(params)
    dt = _work_dtype(unembed)
    head = (norm.scale.to(dt)[:, None] * unembed.to(dt)).to(unembed.dtype).contiguous()
    shift = None if norm.shift is None else (norm.shift.to(dt) / norm.scale.to(dt)).to(norm.shift.dtype)
    return out.replace(final_norm=LayerNormParams(torch.ones_like(norm.scale), shift), head=head,
                       config=out.config.replace(tie_head=False))


def center_unembed(params: GPTParams) -> GPTParams:
    """Subtract from each row of the unembedding `[d_model, vocab]` its mean over the vocabulary: logits shift by a
    per-position constant, so softmax(logits) is unchanged. Unties a tied head (the embedding keeps its values)."""
    refuse_quantized(params, "center_unembed")
    unembed = head_matrix(params)
    dt = _work_dtype(unembed)
    u = unembed.to(dt)
    head = (u - u.mean(-1, keepdim=True)).to(unembed.dtype).contiguous()
    return params.replace(head=head, config=params.config.replace(tie_head=False))


def _center(t: Tensor | None) -> Tensor | None:
    """`t` minus its mean over the last (`d_model`) axis, worked in at least fp32."""
    if t is None:
        return None
    w = t.to(_work_dtype(t))
    return (w - w.mean(-1, keepdim=True)).to(t.dtype)


def center_writing_weights(params: GPTParams) -> GPTParams:
    """Make every write into the residual stream zero-mean over `d_model`: `tok_emb`, `pos_emb`, each attention's
    `w_out` (per output row) and `b_out`, each MLP's `w_proj` and `b_proj`. The layer norms that read the stream
    subtract the mean anyway, so logits are unchanged up to rounding. A tied head is untied first: it reads the
    final norm's output, not the stream, and must keep the embedding's original values."""
    blocks = tuple(bp.replace(attn=bp.attn.replace(w_out=_center(bp.attn.w_out), b_out=_center(bp.attn.b_out)),
                              mlp=bp.mlp.replace(w_proj=_center(bp.mlp.w_proj), b_proj=_center(bp.mlp.b_proj)))
                   for bp in params.blocks)
    head = params.head if params.head is not None else params.tok_emb.T.contiguous()
    return params.replace(tok_emb=_center(params.tok_emb), pos_emb=_center(params.pos_emb), blocks=blocks,
                          head=head, config=params.config.replace(tie_head=False))


def fold_value_biases(params: GPTParams) -> GPTParams:
    """Fold each layer's value bias into its output bias (`b_out += b_V @ w_out`, `b_V = 0`): exact because every
    attention row sums to 1. A model without q/k/v biases is returned as it is; one with value biases but no
    output bias (`config.bias=False`) raises a ValueError."""
    if params.config.qkv_bias is False:
        return params
    d = params.config.emb_dim
    blocks = []
    for i, bp in enumerate(params.blocks):
        b_qkv = bp.attn.b_qkv
        if b_qkv is None:
            blocks.append(bp)
            continue
        dt = _work_dtype(b_qkv)
        b_v = b_qkv[2 * d:].to(dt)
        if bp.attn.b_out is None:
            raise ValueError(f"block {i} has value biases but no attention output bias (config.bias=False) to fold "
                             "them into; fold_value_biases needs b_out")
        b_out = (bp.attn.b_out.to(dt) + b_v @ bp.attn.w_out.to(dt)).to(bp.attn.b_out.dtype)
        new_qkv = torch.cat([b_qkv[:2 * d], torch.zeros_like(b_qkv[2 * d:])])
        blocks.append(bp.replace(attn=bp.attn.replace(b_qkv=new_qkv, b_out=b_out)))
    return params.replace(blocks=tuple(blocks))

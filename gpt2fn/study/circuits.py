"""Attention-head circuits as factored matrices, and the composition scores between heads (Elhage et al. 2021,
"A Mathematical Framework for Transformer Circuits").

    ov_circuit(params, layer, head)       W_V @ W_O          [d_model, d_model]   what a head writes, per source
    qk_circuit(params, layer, head)       W_Q @ W_K^T        [d_model, d_model]   query x key bilinear form
    full_ov_circuit(params, layer, head)  W_E @ W_V W_O @ W_U  [vocab, vocab]     source token -> output logits
    full_qk_circuit(params, layer, head)  W_E @ W_Q W_K^T @ W_E^T [vocab, vocab]  query token x key token
    composition_scores(params, "k")       [layer, heads, layer, heads]            earlier head x later head

Each circuit is a :class:`FactoredMatrix` (nothing `[vocab, vocab]` is formed). `head=None` gives every head of
the layer (`[heads, ...]`); `layer=None` every layer too (`[layer, heads, ...]`, a stacked copy of the weights).
Orientation is the stored one (`x @ W`, rows read, columns write), as TransformerLens: a residual vector `x` at a
key position adds `x @ OV` to the destination; query `x` and key `y` score `x @ QK @ y^T / sqrt(head_dim)`.

Conventions, read before comparing numbers:
- The weights are used as given. A layer norm sits between the residual stream and every `W_Q/W_K/W_V` (and
  before `W_U`); unless `gpt2fn.transforms.fold_layer_norm(params)` was applied, its scale is *not* in these
  matrices. Fold first for circuits that mean what TransformerLens's do (its `from_pretrained` folds by default;
  its `no_processing` mode, like `params` as loaded, does not). The normalisation itself (centring, 1/std) is
  ignored either way, as in TransformerLens. TransformerLens's `fold_ln` also centres the reading weights
  (`W_Q/W_K/W_V`, `W_U`) over `d_model`, which `fold_layer_norm` does not: on the same weights the numbers here
  equal its `no_processing` ones, and its `fold_ln` ones after that centring too.
- Biases (`b_Q`, `b_K`, `b_V`, `b_O`, and the shifts a fold turns into them) are ignored.
- `W_E` is the token embedding `tok_emb` as stored (no layer norm applied); `source="pos"` / `query="pos"` /
  `key="pos"` read the position embedding `W_pos` `[ctx, d_model]` instead. `W_U` is the untied head or the tied
  `tok_emb^T`: every `GPTParams` has an unembedding, so no circuit lacks one.

Errors: a layer or head out of range or an unknown `kind` / `source` raise ValueError naming the
argument and the valid values; something other than `GPTParams` raises TypeError.
"""

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..params import GPTParams, head_matrix
from ..quantize import refuse_quantized
from ..shapes import checked
from .factored import FactoredMatrix
from .weights import _layer, attn_weights

__all__ = ["ov_circuit", "qk_circuit", "full_ov_circuit", "full_qk_circuit", "composition_scores",
           "composition_score"]

Kind = Literal["q", "k", "v"]
Embed = Literal["tok", "pos"]
KINDS = ("q", "k", "v")


# -- argument checks -----------------------------------------------------------------------------------------------

def _plain(params: GPTParams) -> GPTParams:
    if not isinstance(params, GPTParams):
        raise TypeError(f"params must be a GPTParams tree (from gpt2fn.load or init_params), got "
                        f"{type(params).__name__}")
    refuse_quantized(params, "the weight circuits (gpt2fn.study.circuits)")
    return params


def _heads(params: GPTParams, head: int | None) -> int | None:
    n = params.config.n_heads
    if head is None:
        return None
    if not isinstance(head, int) or isinstance(head, bool) or not -n <= head < n:
        raise ValueError(f"head must be an int in 0..{n - 1} (or -{n}..-1), or None for every head; got {head!r}")
    return head % n


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of 'q', 'k', 'v' (Q-, K- or V-composition); got {kind!r}")
    return kind


def _embed(params: GPTParams, which: str, name: str) -> Float[Tensor, "rows d_model"]:
    if which == "tok":
        return params.tok_emb
    if which == "pos":
        return params.pos_emb
    raise ValueError(f"{name} must be 'tok' (the token embedding W_E) or 'pos' (the position embedding W_pos); "
                     f"got {which!r}")


def _weights(params: GPTParams, layer: int | None, head: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`W_Q, W_K, W_V, W_O` of one layer (`[heads, ...]`, views) or every layer (`[layer, heads, ...]`, a copy),
    then of one head when `head` is an int."""
    params = _plain(params)
    h = _heads(params, head)
    if layer is None:
        per_layer = [attn_weights(params, i)[:4] for i in range(params.config.n_layers)]
        ws = [torch.stack(w) for w in zip(*per_layer, strict=True)]
    else:
        ws = list(attn_weights(params, _layer(params, layer))[:4])
    if h is not None:
        ws = [w[..., h, :, :] for w in ws]
    return tuple(ws)  # type: ignore[return-value]


# -- circuits ------------------------------------------------------------------------------------------------------

def ov_circuit(params: GPTParams, layer: int | None, head: int | None = None) -> FactoredMatrix:
    """The OV circuit `W_V @ W_O` `[d_model, d_model]` of head `head` of `layer` (`[heads, d_model, d_model]` for
    every head, `[layer, heads, ...]` with `layer=None`), factored through `head_dim`. A residual vector `x` read
    at a source position moves `x @ OV` (times its attention weight) into the destination's stream."""
    _, _, w_v, w_o = _weights(params, layer, head)
    return FactoredMatrix(w_v, w_o)


def qk_circuit(params: GPTParams, layer: int | None, head: int | None = None) -> FactoredMatrix:
    """The QK circuit `W_Q @ W_K^T` `[d_model, d_model]` (rows: query side, columns: key side): query `x` and key
    `y` score `x @ QK @ y^T / sqrt(head_dim)`. Shapes as :func:`ov_circuit`."""
    w_q, w_k, _, _ = _weights(params, layer, head)
    return FactoredMatrix(w_q, w_k.mT)


def full_ov_circuit(params: GPTParams, layer: int | None, head: int | None = None, *,
                    source: Embed = "tok") -> FactoredMatrix:
    """The full OV circuit `W_E @ W_V @ W_O @ W_U` `[vocab, vocab]`: row t is the direct effect on the logits of
    attending to token t (`source="pos"`: to position t, `[ctx, vocab]`), skipping every other layer. Held as
    `[.., vocab, head_dim]` and `[.., head_dim, vocab]`."""
    ov = ov_circuit(params, layer, head)
    return _embed(params, source, "source") @ ov @ head_matrix(params)


def full_qk_circuit(params: GPTParams, layer: int | None, head: int | None = None, *,
                    query: Embed = "tok", key: Embed = "tok") -> FactoredMatrix:
    """The full QK circuit `W_E @ W_Q @ W_K^T @ W_E^T` `[vocab, vocab]`: entry (s, t) is the attention score
    (before `/ sqrt(head_dim)`) of query token s for key token t read straight from the embedding. `query` / `key`
    = "pos" puts `W_pos` on that side (`[ctx, ...]`). Held as `[.., rows, head_dim]` and `[.., head_dim, cols]`."""
    qk = qk_circuit(params, layer, head)
    return _embed(params, query, "query") @ qk @ _embed(params, key, "key").T


# -- composition ---------------------------------------------------------------------------------------------------

def composition_score(left: FactoredMatrix, right: FactoredMatrix, kind: Kind, *, outer: bool = True
                      ) -> Float[Tensor, "..."]:
    """How much a later head reads what an earlier head writes: `||L @ R'||_F / (||L||_F ||R'||_F)`, in [0, 1].

    `left` is the earlier head's OV circuit `[*l, d_model, d_model]`; `right` the later head's QK circuit for
    `kind` "q" (R' = QK: the query reads the earlier output) and "k" (R' = QK^T: the key reads it), its OV circuit
    for "v" (R' = OV). With `outer=True` every left matrix meets every right one: `[*l, *r]` (TransformerLens's
    `composition_scores(..., broadcast_dims=True)`); with `outer=False` their leading axes broadcast together.
    Computed from `collapse_l`/`collapse_r` (small SVDs), never forming a product; in at least fp32.
    """
    if not isinstance(left, FactoredMatrix) or not isinstance(right, FactoredMatrix):
        raise TypeError(f"left and right must be FactoredMatrix circuits (e.g. ov_circuit, qk_circuit), got "
                        f"{type(left).__name__} and {type(right).__name__}")
    right = right.T if _kind(kind) == "k" else right
    if left.rdim != right.ldim:
        raise ValueError(f"composition_score: left {list(left.shape)} writes {left.rdim} columns but right "
                         f"{list(right.shape)} reads {right.ldim} rows (kind {kind!r})")
    lc = left.collapse_l()   # [*l, k, d]: ||lc @ X|| == ||L @ X||
    rc = right.collapse_r()  # [*r, d, k']: ||X @ rc|| == ||X @ R||
    return _score(lc, rc, len(left.batch_shape), len(right.batch_shape), outer)


def _score(lc: Tensor, rc: Tensor, nl: int, nr: int, outer: bool) -> Tensor:
    if outer:
        lc = lc.reshape(*lc.shape[:-2], *(1,) * nr, *lc.shape[-2:])
        rc = rc.reshape(*(1,) * nl, *rc.shape)
    return torch.linalg.matrix_norm(lc @ rc) / (torch.linalg.matrix_norm(lc) * torch.linalg.matrix_norm(rc))


def composition_scores(params: GPTParams, kind: Kind) -> Float[Tensor, "layer heads layer heads"]:
    """Q-, K- or V-composition scores of every pair of heads, `[layer, heads, layer, heads]`: entry
    `[l1, h1, l2, h2]` is :func:`composition_score` of head l1.h1's OV circuit (the writer) with head l2.h2's QK
    (kind "q": its queries read l1.h1's output; "k": its keys do) or OV circuit ("v": its values do).

    Only a strictly later layer can read an earlier one, so entries with `l2 <= l1` are 0 (TransformerLens's
    `all_composition_scores` applies the same upper-triangular mask over layers). Weights as given: fold layer
    norms first for TransformerLens's processed numbers (module docstring); biases are ignored. At least fp32.
    """
    _kind(kind)
    params = _plain(params)
    return _composition_scores(params, kind)


@checked
def _composition_scores(params: GPTParams, kind: str) -> Float[Tensor, "layer heads layer heads"]:
    cfg = params.config
    ov = ov_circuit(params, None)  # [layer, heads, d_model, d_model]
    right = ov if kind == "v" else qk_circuit(params, None)
    lc = ov.collapse_l()  # one batched SVD per side, shared by every pair
    rc = (right.T if kind == "k" else right).collapse_r()
    n, h = cfg.n_layers, cfg.n_heads
    rows = []
    for l1 in range(n):  # only later layers: about half the products of the full outer score
        zeros = lc.new_zeros(h, l1 + 1, h)
        later = [_score(lc[l1], rc[l1 + 1:], 1, 2, True)] if l1 + 1 < n else []  # [heads, n-l1-1, heads]
        rows.append(torch.cat([zeros, *later], dim=1))
    return torch.stack(rows)

"""GPT-2's layers as pure functions `f(params, x, *, options) -> y`.

Glossary of axis names: `gpt2fn.shapes`. References: Radford et al. 2019 (GPT-2: pre-norm blocks, final layer
norm), Vaswani et al. 2017 (scaled dot-product attention), Hendrycks & Gimpel 2016 (GELU), Ba et al. 2016
(layer normalisation).

Every function here reads only its arguments and returns new tensors. Two optional keyword arguments thread through:
- `generator`: a `torch.Generator` that turns dropout on (training); without it dropout is the identity.
- `tap`: a function `(site, value) -> value` called at each named activation site (see `gpt2fn.study`); it may
  return the value unchanged (capture) or a replacement (intervention). Without it nothing extra is computed.
  A tap may also have a method `wants(site) -> bool`; attention then takes the explicit path (which makes the
  `scores` and `pattern` sites exist) only when the tap wants one of them, and stays on fused SDPA otherwise.
  Likewise the per-head inputs `attn.q_input/k_input/v_input`, the layer-norm parts `*.scale`/`*.normalized` and
  the per-head `attn.result` are computed only when wanted.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .config import GPTConfig
from .kernels import affine, attend_append_applies, attend_applies, native_attend, native_attend_append
from .params import AttentionParams, BlockParams, LayerNormParams, MLPParams
from .shapes import check_record, checked

__all__ = [
    "Tap", "tap_site", "layer_norm", "layer_norm_sites", "gelu", "dropout", "linear", "split_heads", "merge_heads",
    "split_qkv", "key_visibility", "causal_mask",
    "write_slots", "attend_fast", "attend_explicit", "attention", "attention_pattern", "mlp", "block",
]

Tap = Callable[[str, Tensor], Tensor]
Hidden = Float[Tensor, "batch seq d_model"]


def tap_site(tap: Tap | None, site: str, x: Tensor) -> Tensor:
    """The value at activation site `site`: `x`, or what `tap` returns for it (a capture returns `x` itself)."""
    return x if tap is None else tap(site, x)


def _wants(tap: Tap | None, site: str) -> bool:
    """Whether `tap` reads `site`: a tap without a `wants` method reads every site."""
    return tap is not None and getattr(tap, "wants", lambda _: True)(site)


def layer_norm_sites(p: LayerNormParams, x: Tensor, eps: float, tap: Tap | None, site: str) -> Tensor:
    """`layer_norm` with its parts as sites `{site}.scale` (sqrt(var + eps), `[*batch, 1]`) and `{site}.normalized`
    ((x - mean) / scale), computed (and editable) only when `tap` wants one of them. When the tap returns them
    unchanged the output is the fused kernel's, so reading them changes no bits."""
    if not (_wants(tap, f"{site}.scale") or _wants(tap, f"{site}.normalized")):
        return layer_norm(p, x, eps=eps)
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    tapped = tap_site(tap, f"{site}.scale", scale)
    normalized = centred / tapped
    edited = tap_site(tap, f"{site}.normalized", normalized)
    if tapped is scale and edited is normalized:  # only read: the fused kernel's bits, as without the tap
        return layer_norm(p, x, eps=eps)
    out = edited * p.scale.to(x.dtype)
    return out if p.shift is None else out + p.shift.to(x.dtype)


@checked
def layer_norm(p: LayerNormParams, x: Float[Tensor, "*batch d_model"], *, eps: float = 1e-5
               ) -> Float[Tensor, "*batch d_model"]:
    """Layer normalisation: (x - mean) / sqrt(var + eps) * scale + shift over the last axis (biased variance)."""
    check_record(p, "norm")
    shift = None if p.shift is None else p.shift.to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], p.scale.to(x.dtype), shift, eps)


@checked
def gelu(x: Float[Tensor, "*shape"], *, approximate: str = "tanh") -> Float[Tensor, "*shape"]:
    """Gaussian error linear unit: x * Phi(x), with Phi's tanh approximation (GPT-2) or exact via erf ("erf")."""
    return F.gelu(x, approximate="tanh" if approximate == "tanh" else "none")


def dropout(x: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout with an explicit generator; the identity when `generator` is None or `rate` is 0."""
    if generator is None or rate == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep.to(x.dtype) / (1.0 - rate)


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Affine map `x @ W + b` with `W` stored `[in, out]`, read in place (the kernel: `gpt2fn.kernels.affine`)."""
    return affine(x, w, b)


def split_heads(x: Float[Tensor, "batch seq d_model"], n_heads: int) -> Float[Tensor, "batch heads seq head_dim"]:
    return rearrange(x, "b s (h d) -> b h s d", h=n_heads)


def merge_heads(z: Float[Tensor, "batch heads seq head_dim"]) -> Float[Tensor, "batch seq d_model"]:
    return rearrange(z, "b h s d -> b s (h d)")


def key_visibility(slots: Int[Tensor, " seq"], valid: Bool[Tensor, "batch kv_seq"] | None, k_len: int
                   ) -> Bool[Tensor, "batch 1 seq kv_seq"] | Bool[Tensor, "seq kv_seq"]:
    """The one visibility rule: which of `k_len` key slots each query (at slot `slots[t]`) attends to. A query sees
    its own slot and the slots before it; with `valid` (False on left padding, and on cache slots not yet written)
    only the valid ones among them, and always itself, so a padding query's softmax stays finite (no real token
    ever reads its output). A forward's queries are the last `seq` of `k_len` positions (`causal_mask`); a decode
    step's are the cache slots its tokens are written to (`gpt2fn.step`)."""
    key = torch.arange(k_len, device=slots.device)[None, :]
    mine = slots[:, None]
    past = key <= mine
    if valid is None:
        return past
    return (past & valid[:, None, None, :]) | (key == mine)


def causal_mask(q_len: int, k_len: int, key_mask: Bool[Tensor, "batch kv_seq"] | None,
                device: torch.device) -> Bool[Tensor, "batch 1 seq kv_seq"] | Bool[Tensor, "seq kv_seq"]:
    """`key_visibility` for queries that are the last `q_len` of `k_len` positions, `key_mask` False on padding."""
    return key_visibility(torch.arange(k_len - q_len, k_len, device=device), key_mask, k_len)


def attend_fast(q: Float[Tensor, "batch heads seq head_dim"], k: Float[Tensor, "batch heads kv_seq head_dim"],
                v: Float[Tensor, "batch heads kv_seq head_dim"], key_mask: Bool[Tensor, "batch kv_seq"] | None,
                mask: Bool[Tensor, "batch 1 seq kv_seq"] | None = None) -> Float[Tensor, "batch heads seq head_dim"]:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v through a fused kernel: a decode step's one query per row on
    CPU through gpt2fn's native attention (`gpt2fn.kernels.attend_applies`), everything else through torch's
    scaled-dot-product attention. `mask` (which keys each query sees, from `gpt2fn.step`) replaces the causal mask
    built from `key_mask`. Keys and values may be stored in another dtype than `q` (a 16-bit cache): the native
    kernel reads them in place, torch's gets them widened to `q`'s dtype."""
    if (mask is not None or (key_mask is None and q.shape[2] == 1)) and attend_applies(q, k, v, mask):
        return native_attend(q, k, v, mask)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q_len, k_len = q.shape[2], k.shape[2]
    if key_mask is None and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if key_mask is None and q_len == 1:  # one new query sees every cached key: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, key_mask, q.device))


def attend_explicit(q: Float[Tensor, "batch heads seq head_dim"], k: Float[Tensor, "batch heads kv_seq head_dim"],
                    v: Float[Tensor, "batch heads kv_seq head_dim"], key_mask: Bool[Tensor, "batch kv_seq"] | None,
                    *, mask: Bool[Tensor, "batch 1 seq kv_seq"] | None = None, drop_rate: float = 0.0,
                    generator: torch.Generator | None = None, tap: Tap | None = None, site: str = "attn"
                    ) -> tuple[Float[Tensor, "batch heads seq head_dim"], Float[Tensor, "batch heads seq kv_seq"]]:
    """The same attention written out, returning `(z, pattern)`; the pattern is exactly 0 above the diagonal."""
    if k.dtype != q.dtype:  # a 16-bit cache
        k, v = k.to(q.dtype), v.to(q.dtype)
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], key_mask, q.device)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = tap_site(tap, f"{site}.scores", scores.masked_fill(~mask, float("-inf")))
    pattern = tap_site(tap, f"{site}.pattern", torch.softmax(scores, dim=-1))
    return dropout(pattern, drop_rate, generator) @ v, pattern


def split_qkv(p: AttentionParams, x: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values `[batch heads seq head_dim]` of `x` from the one `w_qkv` product."""
    return _heads_of(linear(x, p.w_qkv, p.b_qkv), n_heads)


def _heads_of(qkv: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = rearrange(qkv, "b s (three h d) -> three b h s d", three=3, h=n_heads)
    return q, k, v


def _head_inputs(x: Tensor, n_heads: int, tap: Tap, site: str) -> tuple[Tensor | None, ...]:
    """The sites `{site}.q_input/k_input/v_input`: the residual stream entering the block as each head's queries
    (keys, values) read it, `[batch heads seq d_model]` (TransformerLens's `hook_q_input` with split qkv input, but
    heads on axis 1 as in `attn.q`). In GPT-2 every head reads the same stream, so the value is a broadcast view of
    `x`. Returns the edited inputs, None where the tap returned the view unchanged."""
    b, s, d = x.shape
    shared = x[:, None].expand(b, n_heads, s, d)
    edited = [tap_site(tap, f"{site}.{n}_input", shared) for n in "qkv"]
    return tuple(None if e is shared else e for e in edited)


def _head_shift(p: LayerNormParams, x: Tensor, edited: tuple[Tensor | None, ...], eps: float
                ) -> tuple[Tensor | None, ...]:
    """How much each head's normalised input moves under edits of its q/k/v input: `ln1(x') - ln1(x)` per head,
    `[batch heads seq d_model]`. Rows of an unedited head are the same numbers through the same kernel, so their
    shift is exactly 0 and their projections keep their bits; gradients flow through every row (no masking)."""
    if all(e is None for e in edited):
        return edited
    base = layer_norm(p, x, eps=eps)[:, None]
    return tuple(None if e is None else layer_norm(p, e, eps=eps) - base for e in edited)


def write_slots(buf: Tensor, slots: Tensor, new: Tensor, *, donate: bool) -> Tensor:
    """`buf` `[batch, heads, capacity, head_dim]` with `new` written at `slots` `[seq]` (along the capacity axis):
    a new tensor, or `buf` itself updated in place when the caller donates it (see `gpt2fn.cache`). A cache of
    another dtype than `new` (16-bit, `init_cache(dtype=...)`) stores it rounded to its own."""
    if new.dtype != buf.dtype:
        new = new.to(buf.dtype)
    return buf.index_copy_(2, slots, new) if donate else buf.index_copy(2, slots, new)


@checked
def attention(p: AttentionParams, x: Float[Tensor, "batch seq d_model"], *, n_heads: int,
              key_mask: Bool[Tensor, "batch kv_seq"] | None = None, drop_rate: float = 0.0,
              generator: torch.Generator | None = None, tap: Tap | None = None, site: str = "attn",
              kv: tuple[Tensor, Tensor] | None = None, slots: Tensor | None = None,
              mask: Bool[Tensor, "batch 1 seq kv_seq"] | None = None, donate: bool = False,
              head_shift: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None
              ) -> Hidden | tuple[Hidden, tuple[Tensor, Tensor]]:
    """Causal multi-head self-attention: project to q, k, v; attend over the past (and the cache); project out.

    `key_mask`: which keys are real tokens (left padding). Uses fused SDPA unless dropout or a tap needs the
    explicit pattern. Decoding (`gpt2fn.step`) passes this layer's cache buffers `kv`, the `slots` `[seq]` where
    `x`'s positions go and the `mask` of keys each query sees; it then returns `(out, (keys, values))`, the buffers
    with the new slots written (in place only when `donate`). `head_shift` (from `block`, for edits of its
    `attn.q_input/k_input/v_input`): per-head changes `[batch heads seq d_model]` of the normalised input the
    queries, keys, values read (None: unchanged); each goes through its own head's columns of `w_qkv` only.
    """
    check_record(p, site)
    qkv = linear(x, p.w_qkv, p.b_qkv)
    if (kv is not None and donate and tap is None and head_shift is None and slots is not None and mask is not None
            and (generator is None or drop_rate == 0.0)
            and attend_append_applies(qkv, kv[0], kv[1], slots, mask, n_heads)):
        # a one-token step written in place with nothing to show: the new key and value written, attended and the
        # heads merged in one native call (`gpt2fn.kernels.native_attend_append`), the same bits as below
        return linear(native_attend_append(qkv, kv[0], kv[1], slots, mask), p.w_out, p.b_out), kv
    q, k, v = _heads_of(qkv, n_heads)
    if head_shift is not None:  # x' W + b = (x W + b) + (x' - x) W, head by head: other heads keep their bits
        d = x.shape[-1]
        w = p.w_qkv
        q, k, v = (t if dx is None else t + torch.einsum(
            "bhsm,hme->bhse", dx, rearrange(w[:, i * d:(i + 1) * d], "m (h e) -> h m e", h=n_heads))
            for i, (t, dx) in enumerate(zip((q, k, v), head_shift, strict=True)))
    q, k, v = (tap_site(tap, f"{site}.{n}", t) for n, t in (("q", q), ("k", k), ("v", v)))
    if kv is not None:
        if slots is None or mask is None:
            raise ValueError("attention with cache buffers `kv` needs `slots` and `mask` (see gpt2fn.step)")
        kv = (write_slots(kv[0], slots, k, donate=donate), write_slots(kv[1], slots, v, donate=donate))
        k, v = kv
        if mask.shape[-1] < k.shape[2]:  # the mask covers the slots written so far (`gpt2fn.model.walk`)
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
    explicit = _wants(tap, f"{site}.scores") or _wants(tap, f"{site}.pattern")
    if not explicit and (generator is None or drop_rate == 0.0):
        z = attend_fast(q, k, v, key_mask, mask)
    else:
        z, _ = attend_explicit(q, k, v, key_mask, mask=mask, drop_rate=drop_rate, generator=generator, tap=tap,
                               site=site)
    z = tap_site(tap, f"{site}.z", z)
    out = None
    if _wants(tap, f"{site}.result"):  # each head's write into the residual stream: [batch seq heads d_model]
        w_o = p.w_out.view(n_heads, z.shape[-1], p.w_out.shape[-1])
        result = torch.einsum("bhsd,hdm->bshm", z, w_o)
        edited = tap_site(tap, f"{site}.result", result)
        if edited is not result:  # an edit: the output is the sum of the edited heads (when only read: fused)
            summed = edited.sum(2) if p.b_out is None else edited.sum(2) + p.b_out
            out = tap_site(tap, f"{site}.out", summed)
    if out is None:
        out = tap_site(tap, f"{site}.out", linear(merge_heads(z), p.w_out, p.b_out))
    return out if kv is None else (out, kv)


@checked
def attention_pattern(p: AttentionParams, x: Float[Tensor, "batch seq d_model"], *, n_heads: int,
                      key_mask: Bool[Tensor, "batch seq"] | None = None
                      ) -> Float[Tensor, "batch heads seq seq"]:
    """The attention weights softmax(q k^T / sqrt(head_dim) + mask): each row a distribution over the past."""
    check_record(p, "attn")
    q, k, v = split_qkv(p, x, n_heads)
    return attend_explicit(q, k, v, key_mask)[1]


@checked
def mlp(p: MLPParams, x: Float[Tensor, "*batch d_model"], *, approximate: str = "tanh",
        tap: Tap | None = None, site: str = "mlp") -> Float[Tensor, "*batch d_model"]:
    """Position-wise feed-forward network: gelu(x W_fc + b_fc) W_proj + b_proj."""
    check_record(p, site)
    pre = tap_site(tap, f"{site}.pre", linear(x, p.w_fc, p.b_fc))
    post = tap_site(tap, f"{site}.post", gelu(pre, approximate=approximate))
    return linear(post, p.w_proj, p.b_proj)


@checked
def block(p: BlockParams, x: Float[Tensor, "batch seq d_model"], *, config: GPTConfig, layer: int = 0,
          key_mask: Bool[Tensor, "batch kv_seq"] | None = None, generator: torch.Generator | None = None,
          tap: Tap | None = None, kv: tuple[Tensor, Tensor] | None = None, slots: Tensor | None = None,
          mask: Tensor | None = None, donate: bool = False
          ) -> Hidden | tuple[Hidden, tuple[Tensor, Tensor]]:
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.)), with dropout on each branch.
    With cache buffers `kv` (decoding, see `attention`) it returns `(x, (keys, values))`."""
    site, rate = f"blocks.{layer}", config.drop_rate
    x = tap_site(tap, f"{site}.resid_pre", x)
    edited = None
    if tap is not None and any(_wants(tap, f"{site}.attn.{n}_input") for n in "qkv"):
        edited = _head_inputs(x, config.n_heads, tap, f"{site}.attn")
    h = tap_site(tap, f"{site}.ln1", layer_norm_sites(p.norm1, x, config.ln_eps, tap, f"{site}.ln1"))
    a = attention(p.attn, h, n_heads=config.n_heads, key_mask=key_mask, drop_rate=rate, generator=generator,
                  tap=tap, site=f"{site}.attn", kv=kv, slots=slots, mask=mask, donate=donate,
                  head_shift=None if edited is None else _head_shift(p.norm1, x, edited, config.ln_eps))
    if kv is not None:
        a, kv = a
    x = tap_site(tap, f"{site}.resid_mid", x + dropout(a, rate, generator))
    h = tap_site(tap, f"{site}.ln2", layer_norm_sites(p.norm2, x, config.ln_eps, tap, f"{site}.ln2"))
    m = tap_site(tap, f"{site}.mlp.out", mlp(p.mlp, h, approximate=config.gelu, tap=tap, site=f"{site}.mlp"))
    x = tap_site(tap, f"{site}.resid_post", x + dropout(m, rate, generator))
    return x if kv is None else (x, kv)

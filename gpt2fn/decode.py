"""Decoding as a pure step with static shapes: `decode_step(params, cache, ids) -> (logits, cache')`.

    ids [batch, seq] --embed at cache.positions--> blocks (keys/values written at slots length .. length+seq,
    attention over every slot of the fixed capacity, masked to the real past) --> final norm --> logits

- Pure by default: the cache passed in is unchanged and stays usable (a second continuation of a prompt, a beam,
  a rollback). `donate=True` writes into the input's buffers instead (no copy of the cache per token) and marks
  the input consumed; using it again raises `gpt2fn.cache.DonatedCacheError`. `generate` donates.
- Static shapes: the cache's lengths and positions are tensors and attention always spans the whole capacity, so
  a one-token step has the same shapes at every position. `torch.compile(decode_step, fullgraph=True)` (or
  `compiled_decode_step()`) traces one graph per (batch, seq, capacity, dtype, device, donate) and reuses it for a
  whole generation. Shape checks and the data-dependent input checks (capacity, token range) step aside under
  compilation; eager calls run them.
- `decode_params(params)` is the decode-time weight layout, a derived value the caller may keep: on CPU fp32 the
  matrices and the head as panels for gpt2fn's native kernel (a copy), or, without it, the tied head as a
  `[d_model, vocab]` copy and the matrices as split views (`gpt2fn.kernels`).
"""

import dataclasses
import functools
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .cache import KVCache
from .kernels import layout_kind, pack
from .layers import Tap, _norm, _tap, block
from .model import _check_ids, unembed
from .params import GPTParams
from .shapes import check_record, checked

__all__ = ["decode_step", "compiled_decode_step", "decode_params", "key_visibility"]


def key_visibility(slots: Int[Tensor, " seq"], valid: Bool[Tensor, "batch kv_seq"]
                   ) -> Bool[Tensor, "batch 1 seq kv_seq"]:
    """Which cache slots each query (at `slots`) attends to: real slots up to its own, and always itself (so a
    padding query's softmax stays finite; no real token ever reads its output)."""
    key = torch.arange(valid.shape[1], device=valid.device)
    past = key[None, :] <= slots[:, None]
    return (past & valid[:, None, None, :]) | (key[None, :] == slots[:, None])


@checked
def decode_step(params: GPTParams, cache: KVCache, ids: Int[Tensor, "batch seq"], *,
                pad_mask: Bool[Tensor, "batch seq"] | None = None, tap: Tap | None = None, donate: bool = False,
                last_only: bool = False, positions: Int[Tensor, "batch seq"] | None = None
                ) -> tuple[Float[Tensor, "batch _seq vocab"], KVCache]:
    """One step of decoding: the logits of `ids` `[batch, seq]` after the tokens in `cache`, and the cache with
    them appended. A prefill and a one-token step are the same function.

    - `pad_mask`: False on left-padding tokens (their slots stay invisible; positions count real tokens only).
    - `tap`: study sites as in `gpt2fn.forward` (site names and values are those of a full forward).
    - `donate`: write into `cache`'s buffers and mark it consumed (see `gpt2fn.cache`); default out of place.
    - `last_only`: logits of the last position only (`[batch, 1, vocab]`), as generation needs.
    - `positions`: explicit position ids instead of the cache's count.
    """
    cache.check_live()
    seq = ids.shape[1]
    if not torch.compiler.is_compiling():
        _check_ids(params, ids, 0)
        check_record(params, "params")
        if cache.batch != ids.shape[0]:
            raise ValueError(f"cache holds batch {cache.batch} but ids have batch {ids.shape[0]}")
        if int(cache.length) + seq > cache.capacity:
            raise ValueError(f"cache of capacity {cache.capacity} holds {int(cache.length)} slots: no room for "
                             f"{seq} more; make it with init_cache(..., capacity=) large enough, or rollback")
    real = torch.ones_like(ids, dtype=torch.bool) if pad_mask is None else pad_mask
    slots = cache.length + torch.arange(seq, device=ids.device)
    if positions is None:
        positions = (cache.positions[:, None] + real.long().cumsum(-1) - 1).clamp(min=0)
    valid = cache.valid.index_copy_(1, slots, real) if donate else cache.valid.index_copy(1, slots, real)
    mask = key_visibility(slots, valid)

    cfg = params.config
    tok = _tap(tap, "embed.tok", params.tok_emb[ids])
    pos = _tap(tap, "embed.pos", params.pos_emb[positions])
    x = _tap(tap, "embed", tok + pos)
    keys, values = [], []
    for i, bp in enumerate(params.blocks):
        x, (k, v) = block(bp, x, config=cfg, layer=i, tap=tap, kv=(cache.keys[i], cache.values[i]), slots=slots,
                          mask=mask, donate=donate)
        keys.append(k)
        values.append(v)
    if last_only:
        x = x[:, -1:]
    x = _tap(tap, "final_norm", _norm(params.final_norm, x, cfg.ln_eps, tap, "final_norm"))
    logits = _tap(tap, "logits", unembed(params, x))
    new = KVCache(tuple(keys), tuple(values), valid, cache.length + seq, cache.positions + real.sum(-1))
    if donate:
        cache._consume()
    return logits, new


@functools.cache
def compiled_decode_step(mode: str | None = None) -> Callable[..., tuple[Tensor, KVCache]]:
    """`torch.compile(decode_step, fullgraph=True, dynamic=False)`, made once per `mode` (e.g. "reduce-overhead"
    for CUDA graphs) so every generation reuses its graphs. Call it like `decode_step` (without a tap)."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)


def decode_params(params: GPTParams, *, batch: int = 1, threads: int | None = None, native: bool | None = None
                  ) -> GPTParams:
    """The same weights laid out for decoding `batch` rows on this device: a derived value, never a leaf of
    `params`; keep it and pass it to `generate` to reuse it (applying it twice changes nothing).

    - On CPU in fp32 with the native kernel (`gpt2fn.native.status()`): every matrix and the head become panels
      (`gpt2fn.kernels.pack`), a copy of the weights (GPT-2 124M: about 500 MB, a few tenths of a second), which
      serve any batch and thread count. The head is padded with zero columns to a multiple of the panel width;
      `forward` and `decode_step` return exactly `vocab` logits.
    - Without it: a tied head becomes an untied `[d_model, vocab]` copy (`x @ W` streams GPT-2 124M's 154 MB head
      in about half the time of `x @ tok_emb.T`; PERF-NOTES: 11 -> 5.4 ms per token), and the matrices are split
      views for products of `batch` rows with `threads` threads (default: torch's current count), no copy.
    - In bf16 and on accelerators the weights are returned as they are.
    - `native`: None uses the native kernel when it is built; False asks for the split views (no copy of the
      blocks' weights, for memory); True is the same as None (panels need the kernel; without it, views).
    `forward`, `decode_step` and `generate` accept the result; study and training functions want the plain `params`.
    """
    if not isinstance(params, GPTParams):
        raise TypeError(f"params must be a GPTParams tree (from gpt2fn.load or init_params), got "
                        f"{type(params).__name__}")
    threads = torch.get_num_threads() if threads is None else threads
    use_native = False if native is False else None  # True and None alike: the kernel when it is built
    if params.head is None and params.device.type == "cpu" and params.dtype == torch.float32:
        head = params.tok_emb.detach().T
        if layout_kind(head, rows=batch, threads=threads, pad=True, use_native=use_native) != "panels":
            head = head.contiguous()
        params = params.replace(head=head, config=params.config.replace(tie_head=False))
    lay = functools.partial(pack, rows=batch, threads=threads, use_native=use_native)
    blocks = tuple(dataclasses.replace(
        b, attn=b.attn.replace(w_qkv=lay(b.attn.w_qkv), w_out=lay(b.attn.w_out)),
        mlp=b.mlp.replace(w_fc=lay(b.mlp.w_fc), w_proj=lay(b.mlp.w_proj))) for b in params.blocks)
    head = None if params.head is None else lay(params.head, pad=True)
    return params.replace(blocks=blocks, head=head)

"""Decoding as a pure step with static shapes: `decode_step(params, cache, ids) -> (logits, cache')`.

    ids [batch, seq] --embed at cache.positions--> blocks (keys/values written at slots length .. length+seq,
    attention over every slot of the fixed capacity, masked to the real past) --> final norm --> logits

The step is `gpt2fn.model.walk` with the cache as an argument: the same walk as `forward`, the same weights the
caller holds (no decode layout, no copy), the same key-visibility rule (`gpt2fn.layers.key_visibility`).

- Pure by default: the cache passed in is unchanged and stays usable (a second continuation of a prompt, a beam,
  a rollback). `donate=True` writes into the input's buffers instead (no copy of the cache per token) and marks
  the input consumed; using it again raises `gpt2fn.cache.DonatedCacheError`. `generate` donates.
- Static shapes: the cache's lengths and positions are tensors and attention always spans the whole capacity, so
  a one-token step has the same shapes at every position. `torch.compile(decode_step, fullgraph=True)` (or
  `compiled_decode_step()`) traces one graph per (batch, seq, capacity, dtype, device, donate) and reuses it for a
  whole generation. Shape checks and the data-dependent input checks (capacity, token range) step aside under
  compilation; eager calls run them.
"""

import functools
from collections.abc import Callable
from typing import Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .cache import KVCache
from .checks import check_ids
from .layers import Tap
from .model import walk
from .params import GPTParams
from .shapes import check_record, checked

__all__ = ["decode_step", "compiled_decode_step", "decode_step_at", "compiled_decode_step_at", "PositionalTap"]


class PositionalTap(Protocol):
    """A tap that is bound to the absolute positions of a call's tokens: `tap.at(positions [batch, seq]) -> Tap`
    (the edit taps of `gpt2fn.study`, whose `positions=` count from the start of the sequence)."""

    def at(self, positions: Tensor) -> Tap: ...


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
    cache.check_room(ids.shape[0], ids.shape[1])
    if not torch.compiler.is_compiling():
        check_ids(params.config, ids)
        check_record(params, "params")
    logits, new = walk(params, ids, cache=cache, positions=positions, pad_mask=pad_mask, donate=donate, tap=tap,
                       last_only=last_only)
    assert new is not None
    if donate:
        cache.mark_consumed()
    return logits, new


@functools.cache
def compiled_decode_step(mode: str | None = None) -> Callable[..., tuple[Tensor, KVCache]]:
    """`torch.compile(decode_step, fullgraph=True, dynamic=False)`, made once per `mode` (e.g. "reduce-overhead"
    for CUDA graphs) so every generation reuses its graphs. Call it like `decode_step` (without a tap)."""
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)


def decode_step_at(params: GPTParams, cache: KVCache, ids: Int[Tensor, "batch seq"], tap: PositionalTap,
                   at: Int[Tensor, "batch seq"], *, pad_mask: Bool[Tensor, "batch seq"] | None = None,
                   donate: bool = False, last_only: bool = False) -> tuple[Float[Tensor, "batch _seq vocab"], KVCache]:
    """`decode_step(params, cache, ids, tap=tap.at(at), ...)`: the tap is bound to the tokens' absolute positions
    `at` inside the call. Compiled (`compiled_decode_step_at()`), the positions are then a tensor argument and
    the tap (with the tensors its edits hold: steering vectors, patch sources) the same object at every step, so
    one graph serves a whole edited generation, as `compiled_decode_step` does for a plain one."""
    return decode_step(params, cache, ids, pad_mask=pad_mask, tap=tap.at(at), donate=donate, last_only=last_only)


@functools.cache
def compiled_decode_step_at(mode: str | None = None) -> Callable[..., tuple[Tensor, KVCache]]:
    """`torch.compile(decode_step_at, fullgraph=True, dynamic=False)`, made once per `mode`: what
    `generate(..., compile=True, edit=)` runs its one-token steps through. One graph serves every step, and
    every later edit that differs only in its tensors' values (steering vectors and scales, patch sources: graph
    inputs); the edited sites, the edits' kinds, positions, heads and tensor shapes are guarded (a change
    traces again)."""
    return torch.compile(decode_step_at, fullgraph=True, dynamic=False, mode=mode)

"""The decode state as a value: a key/value cache pytree with static shapes.

    KVCache
      keys, values  tuple of [batch, heads, capacity, head_dim] per layer    preallocated to a fixed capacity
      valid         [batch, capacity] bool                                  which slots hold real tokens
      length        [] int64                                                slots written so far (all rows)
      positions     [batch] int64                                           each row's next position id

Every field is a tensor of a shape fixed at `init_cache`, so a decode step has the same shapes at every position
and `torch.compile` traces it once (see `gpt2fn.step.decode_step`). Rows of a left-padded batch share slot
indices; `valid` hides the padding slots and `positions` counts only real tokens, so a row decodes exactly as the
same prompt alone.

A step never changes the cache it is given unless the caller donates it (`donate=True`, as JAX's
`donate_argnums`): then the new keys and values are written into the input's buffers, the returned cache shares
them, and the input is marked consumed. Using a consumed cache again (a step, `tree_map`, `rollback`, `select_rows`)
raises `DonatedCacheError`. `rollback`, `select_rows` and `grow` are plain functions on the value.
"""

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .config import GPTConfig
from .devices import parse_dtype

__all__ = ["KVCache", "DonatedCacheError", "init_cache", "rollback", "select_rows", "grow"]

_FIELDS = ("keys", "values", "valid", "length", "positions")


class DonatedCacheError(RuntimeError):
    """A cache was used after it was donated to a step (`donate=True`): its buffers now belong to the step's
    result. Keep using the cache the step returned, or step without donation to keep the input."""


def _ticket() -> list[bool]:
    """Whether a cache value was donated, as a one-item list shared by the values over the same buffers (a list
    because torch.compile traces its creation and mutation inside the step)."""
    return [False]


@dataclasses.dataclass(frozen=True, eq=False)
class KVCache:
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    valid: Tensor
    length: Tensor
    positions: Tensor
    _ticket: list[bool] = dataclasses.field(default_factory=_ticket, repr=False, compare=False)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def consumed(self) -> bool:
        """True once this cache was donated to a step; it must not be used again."""
        return self._ticket[0]

    def check_live(self, what: str = "this cache") -> None:
        """Raise `DonatedCacheError` if the cache was donated."""
        if self._ticket[0]:
            raise DonatedCacheError(
                f"{what} was donated to a decode step (donate=True) and its buffers now hold the step's result; "
                "use the cache that step returned, or call decode_step without donate=True to keep the input")

    def check_room(self, batch: int, seq: int) -> None:
        """Raise a ValueError unless this (live) cache holds `batch` rows and has room for `seq` more slots (the
        room check reads the length: it steps aside under `torch.compile`)."""
        self.check_live()
        if self.batch != batch:
            raise ValueError(f"cache holds batch {self.batch} but ids have batch {batch}")
        if not torch.compiler.is_compiling() and int(self.length) + seq > self.capacity:
            raise ValueError(f"cache of capacity {self.capacity} holds {int(self.length)} slots: no room for "
                             f"{seq} more; make it with init_cache(..., capacity=) large enough, or rollback")

    def mark_consumed(self) -> None:
        """Mark this cache donated (a step took its buffers); later uses raise `DonatedCacheError`."""
        self._ticket[0] = True


def _flatten(c: KVCache) -> tuple[list[Any], None]:
    c.check_live("a KVCache")
    return [c.keys, c.values, c.valid, c.length, c.positions], None


def _unflatten(children: Any, _: None) -> KVCache:
    return KVCache(*children)


def _flatten_with_keys(c: KVCache) -> tuple[list[tuple[Any, Any]], None]:
    c.check_live("a KVCache")
    return [(pytree.GetAttrKey(n), getattr(c, n)) for n in _FIELDS], None


pytree.register_pytree_node(KVCache, _flatten, _unflatten, serialized_type_name="gpt2fn.cache.KVCache",
                            flatten_with_keys_fn=_flatten_with_keys)


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a decoding call's `cache_dtype=` may ask for the keys and values."""


def check_cache_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`cache_dtype=` of `generate`, `generate_tokens`, `stream` and beam search: None (the keys and values in the
    activations' dtype, fp32 on CPU), or fp32, bf16 or fp16 as a torch dtype or a name (`"bf16"`). A 16-bit cache
    halves its memory and the bytes a step's attention reads; the keys and values are rounded to it as they are
    written (attention itself, its softmax included, stays in the activations' dtype)."""
    if dtype is None:
        return None
    try:
        parsed = parse_dtype(dtype)
    except ValueError as e:
        raise ValueError(f"cache_dtype: {e}") from None
    if parsed not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of float32, bfloat16, float16 (or None: the activations' dtype); "
                         f"got {parsed}")
    return parsed


def init_cache(config: GPTConfig, batch: int, capacity: int | None = None, *,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               padded: bool = False) -> KVCache:
    """An empty cache for `batch` sequences of up to `capacity` positions (default: the context length).

    `padded` is accepted for compatibility: every cache carries its `valid` mask, so left-padded prompts need
    nothing special (pass `pad_mask` to the step).
    """
    del padded
    capacity = config.context_length if capacity is None else capacity
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"cache batch must be an integer >= 1, got {batch!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= config.context_length:
        raise ValueError(f"cache capacity {capacity!r} must be an integer in [1, context_length="
                         f"{config.context_length}]")
    shape = (batch, config.n_heads, capacity, config.head_dim)
    keys = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers))
    values = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers))
    valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
    length = torch.zeros((), dtype=torch.long, device=device)
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    return KVCache(keys, values, valid, length, positions)


def rollback(cache: KVCache, n: int | Tensor) -> KVCache:
    """The cache as it was after its first `n` slots: later slots are forgotten. Each row's next position is
    recounted from the real tokens it keeps. The key/value buffers are shared with `cache`, not copied (a step
    out of place leaves both intact; donating either one consumes both).

    `n` may also be one count per row (an integer tensor `[batch]`): row `i` forgets its slots from `n[i]` on and
    the cache's length becomes the largest count, so a row that keeps fewer has invisible slots up to the others
    (as left padding is: they are hidden from attention and not counted in its positions). Speculative decoding
    rolls back this way when rows accept different numbers of drafted tokens (`gpt2fn.speculative`)."""
    cache.check_live()
    slot = torch.arange(cache.capacity, device=cache.valid.device)
    if isinstance(n, Tensor):
        if n.shape != (cache.batch,) or n.dtype.is_floating_point or n.dtype.is_complex or n.dtype == torch.bool:
            raise ValueError(f"rollback's per-row n must be an integer tensor [batch={cache.batch}]; got {n.dtype} "
                             f"of shape {list(n.shape)}")
        n = n.to(cache.valid.device)
        if not torch.compiler.is_compiling() and (int(n.min()) < 0 or int(n.max()) > int(cache.length)):
            raise ValueError(f"rollback needs per-row counts in [0, length={int(cache.length)}] (it cannot roll "
                             f"forward); got {n.tolist()}")
        valid = cache.valid & (slot < n[:, None])
        return dataclasses.replace(cache, valid=valid, length=n.max().to(cache.length.dtype).reshape(()),
                                   positions=valid.sum(-1))
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= cache.capacity:
        raise ValueError(f"rollback needs an integer n in [0, capacity={cache.capacity}], got {n!r}")
    if not torch.compiler.is_compiling() and n > int(cache.length):
        raise ValueError(f"cannot roll forward: the cache holds {int(cache.length)} slots, asked for {n}")
    valid = cache.valid & (slot < n)
    # the result shares the buffers, so it shares the ticket: donating either one consumes both
    return dataclasses.replace(cache, valid=valid, length=torch.full_like(cache.length, n),
                               positions=valid.sum(-1))


def select_rows(cache: KVCache, rows: Tensor) -> KVCache:
    """The cache of the given rows `[new_batch]` (int64 indices, repeats allowed): beams reordered or selected."""
    cache.check_live()
    rows = torch.as_tensor(rows, dtype=torch.long, device=cache.valid.device)
    if rows.ndim != 1:
        raise ValueError(f"rows must be a 1-D tensor of row indices, got shape {list(rows.shape)}")
    if not torch.compiler.is_compiling() and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= cache.batch):
        raise ValueError(f"row indices must be in [0, {cache.batch}); got {rows.tolist()}")
    pick = lambda t: t.index_select(0, rows)
    return KVCache(tuple(map(pick, cache.keys)), tuple(map(pick, cache.values)), pick(cache.valid), cache.length,
                   pick(cache.positions))


def grow(cache: KVCache, capacity: int) -> KVCache:
    """The same cache with room for `capacity` slots (at least its own): new buffers, the written slots copied,
    the new slots empty and invalid. `cache` is left as it was (a copy, not a donation); continuing a
    conversation past a cache's capacity grows it once per call (`gpt2fn.generate_tokens(..., cache=)`)."""
    cache.check_live()
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < cache.capacity:
        raise ValueError(f"grow needs an integer capacity >= the cache's {cache.capacity}, got {capacity!r}")
    extra = capacity - cache.capacity
    widen = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)
    valid = torch.cat([cache.valid, cache.valid.new_zeros(cache.batch, extra)], dim=1)
    return KVCache(tuple(map(widen, cache.keys)), tuple(map(widen, cache.values)), valid, cache.length.clone(),
                   cache.positions.clone())

"""The key/value cache as a pytree.

A cache holds, per layer, keys and values `[batch, heads, capacity, head_dim]` preallocated to the longest sequence
the caller will decode, a `valid` mask `[batch, capacity]` of which slots hold real tokens (left padding), and the
static `length` of slots written so far. `forward(params, ids, cache=cache)` returns `(logits, cache')` where
`cache'.length = cache.length + seq`.

Buffer reuse: for speed, `forward` writes the new keys/values into the preallocated buffers *in place* (no copy of
the whole context per token) and returns a new `KVCache` record over the same buffers. The record passed in must
not be reused afterwards (its buffers now hold the newer slots); `tests/test_model.py` pins this behaviour.
"""

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .config import GPTConfig

__all__ = ["KVCache", "init_cache"]


@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    valid: Tensor | None
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def advance(self, n: int) -> "KVCache":
        return dataclasses.replace(self, length=self.length + n)


def _flatten(c: KVCache) -> tuple[list[Any], int]:
    return [c.keys, c.values, c.valid], c.length


def _unflatten(children: Any, length: int) -> KVCache:
    return KVCache(*children, length=length)


def _flatten_with_keys(c: KVCache) -> tuple[list[tuple[Any, Any]], int]:
    return [(pytree.GetAttrKey(n), getattr(c, n)) for n in ("keys", "values", "valid")], c.length


pytree.register_pytree_node(KVCache, _flatten, _unflatten, serialized_type_name="gpt2fn.cache.KVCache",
                            flatten_with_keys_fn=_flatten_with_keys)


def init_cache(config: GPTConfig, batch: int, capacity: int | None = None, *,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               padded: bool = False) -> KVCache:
    """An empty cache for `batch` sequences of up to `capacity` positions (default: the context length).

    `padded=True` allocates the `valid` mask needed when prompts are left-padded (pass `pad_mask` to forward).
    """
    capacity = config.context_length if capacity is None else capacity
    if not 1 <= capacity <= config.context_length:
        raise ValueError(f"cache capacity {capacity} must be in [1, context_length={config.context_length}]")
    shape = (batch, config.n_heads, capacity, config.head_dim)
    keys = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers))
    values = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers))
    valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device) if padded else None
    return KVCache(keys, values, valid, 0)

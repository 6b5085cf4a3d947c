"""One home for the input checks that several entry points share; each message is written once.

    check_ids(config, ids)                   # forward, loss, decode_step: a [batch, seq] integer tensor in the context
    check_prompt_ids(ids, pad_mask, limit)   # generate, generate_tokens, stream, beam_search: a prompt batch
    check_token_range(ids, limit, what=...)  # "ids are integers within the vocabulary": tensors, arrays, lists, ints
    check_layer(config, layer, kind=...)     # a layer index: a block, a boundary between blocks, or a stream point

Every check raises a ValueError (a TypeError for a wrong type) naming the argument, what was expected, what came and
what to do. `params.check_params` is the check that a value is a `GPTParams` tree (it lives beside the type).

Reading values (the range check) needs values: it runs eagerly on every device and under `torch.func.grad` /
`jacrev` (ids are not transformed), and steps aside where no value can be read: while `torch.compile` traces, under
`vmap` over the ids, during CUDA-graph capture and on the meta device. There the embedding lookup is torch's check.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .config import GPTConfig

__all__ = ["check_ids", "check_prompt_ids", "check_token_range", "first_out_of_range", "check_layer"]

LayerKind = Literal["block", "boundary", "point"]


def first_out_of_range(values: Tensor | np.ndarray | Sequence[int] | int, lo: int, hi: int,
                       allowed: int | None = None) -> tuple[list[int], int] | None:
    """`(index, value)` of the first entry of `values` outside `[lo, hi)` (and not equal to `allowed`), or None;
    None also where a tensor's values cannot be read (see the module docstring). The index is a list with one
    entry per axis (`[]` for a single int)."""
    if isinstance(values, Tensor):
        return _first_in_tensor(values, lo, hi, allowed)
    if isinstance(values, np.ndarray):
        if values.size == 0 or (values.min() >= lo and values.max() < hi and allowed is None):
            return None  # min/max read a large memory-mapped corpus without a mask of its size
        outside = (values < lo) | (values >= hi)
        if allowed is not None:
            outside &= values != allowed
        where = np.argwhere(outside)
        return None if len(where) == 0 else ([int(i) for i in where[0]], int(values[tuple(where[0])]))
    if isinstance(values, int):
        return None if lo <= values < hi or values == allowed else ([], values)
    for i, v in enumerate(values):
        if not lo <= v < hi and v != allowed:
            return [i], int(v)
    return None


def _first_in_tensor(t: Tensor, lo: int, hi: int, allowed: int | None) -> tuple[list[int], int] | None:
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return None
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    outside = (t < lo) | (t >= hi)
    if allowed is not None:
        outside &= t != allowed
    try:
        if not bool(outside.any()):
            return None
    except RuntimeError:  # a vmap-batched tensor: data-dependent control flow cannot run while transformed
        return None
    where = [int(i) for i in outside.nonzero()[0]]
    return where, int(t[tuple(where)])


def check_token_range(ids: Tensor | np.ndarray | Sequence[int] | int, limit: int, *, what: str = "ids") -> None:
    """The one rule "token ids are integers in `[0, limit)`" (`limit`: the model's `vocab_size`, or `n_tokens` where
    padding rows may not be read as tokens), with its one message naming `what`, the first bad id and where it is."""
    bad = first_out_of_range(ids, 0, limit)
    if bad is not None:
        at = f" at {bad[0]}" if bad[0] else ""
        raise ValueError(f"{what} hold token id {bad[1]}{at}, outside this model's vocabulary [0, {limit}): it does "
                         "not cover these ids. Encode text with the model's tokenizer (gpt2fn.encode gives GPT-2's "
                         "ids) or use a model whose vocabulary covers them")


def _check_integer_ids(ids: Tensor, what: str) -> None:
    if ids.ndim != 2:
        hint = (" A residual stream [batch, seq, d_model] is the input of forward(..., start_at_layer=L)."
                if ids.ndim == 3 and ids.dtype.is_floating_point else " For a single sequence pass ids[None].")
        raise ValueError(f"{what} must be [batch, seq] token ids; got shape {list(ids.shape)}.{hint}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor of token ids; got dtype {ids.dtype}. Use ids.long().")


def check_ids(config: GPTConfig, ids: Tensor, *, start: int = 0, what: str = "ids") -> None:
    """Token ids at the model's entry points (`forward`, `loss`, `decode_step`), whatever the shape-check switch
    says: a tensor, `[batch, seq]`, integer, at least one position, `start + seq` within the context, and every id in
    `[0, vocab_size)`."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids [batch, seq]; got {type(ids).__name__}. "
                        "Use torch.tensor(ids) (or gpt2fn.encode(text) for text).")
    _check_integer_ids(ids, what)
    if ids.shape[1] == 0:
        raise ValueError(f"{what} has seq = 0 positions; pass at least one token")
    if start + ids.shape[1] > config.context_length:
        raise ValueError(f"sequence of {start + ids.shape[1]} positions (seq={ids.shape[1]}"
                         f"{f' after {start} cached' if start else ''}) exceeds context_length "
                         f"{config.context_length}; crop to the last {config.context_length} tokens")
    check_token_range(ids, config.vocab_size, what=what)


def check_prompt_ids(ids: Tensor, pad_mask: Tensor | None, limit: int) -> None:
    """A batch of prompts for generation: `[batch, seq]` integer ids with at least one row and one position, a
    `pad_mask` (if any) of the same shape, bool, True on each row's last position (left padding), and every real id
    in `[0, limit)` (`limit`: the ids the model may produce, `config.n_tokens`). Padding positions are not read."""
    _check_integer_ids(ids, "ids")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids of shape {list(ids.shape)} hold no prompt; pass at least one token per row")
    if pad_mask is not None:
        if pad_mask.shape != ids.shape or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be a bool tensor of the ids' shape {list(ids.shape)}; got "
                             f"{pad_mask.dtype} {list(pad_mask.shape)}")
        if not bool(pad_mask[:, -1].all()):
            raise ValueError("pad_mask must be True on each row's last position: pad on the left, not the right")
    check_token_range(ids if pad_mask is None else ids.masked_fill(~pad_mask, 0), limit, what="prompt ids")


def check_layer(config: GPTConfig, layer: int | None, *, name: str = "layer", kind: LayerKind = "block",
                allow_none: bool = False) -> int | None:
    """A layer index as a non-negative int, or a ValueError naming `name`, the valid range and what came.

    - `kind="block"`: a block, `0..n_layers-1`; `-n_layers..-1` count from the end (-1 is the last block).
    - `kind="boundary"`: where a partial run starts or stops (`forward`'s `start_at_layer`/`stop_at_layer`):
      `0..n_layers`, the stream entering that block (`n_layers`: after the last); `-n_layers..-1` count blocks from
      the end, as TransformerLens's `forward` does (-1 is the stream entering the last block).
    - `kind="point"`: one of the `n_layers + 1` points of the residual stream (`gpt2fn.study.decompose`): `0..n_layers`,
      and `-(n_layers + 1)..-1` index those points from the end, as TransformerLens's `accumulated_resid` does (-1 is
      after the last block).
    `allow_none`: None passes through (the caller's default)."""
    n = config.n_layers
    if layer is None and allow_none:
        return None
    top, lowest = {"block": (n - 1, -n), "boundary": (n, -n), "point": (n, -(n + 1))}[kind]
    if isinstance(layer, bool) or not isinstance(layer, int) or not lowest <= layer <= top:
        meaning = {"block": "a block", "boundary": f"the stream entering that block; {n}: after the last block",
                   "point": f"the stream entering that block; {n} or -1: after the last block"}[kind]
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int in 0..{top} ({meaning}), or "
                         f"{lowest}..-1 counted from the end, for this model's {n} layers; got {layer!r}")
    if layer >= 0:
        return layer
    return layer + (n + 1 if kind == "point" else n)

"""What a generation produced, as one value: `generate(..., return_details=True)` and `generate_tokens(...,
return_details=True)` return a `Generation`.

    r = gpt2fn.generate_tokens(params, ids, max_new_tokens=20, return_details=True, top_logprobs=5)
    r.ids, r.logprobs, r.top_ids, r.stop_reasons, r.lengths        # [rows, new], [rows, new], [rows, new, 5], ...
    more = gpt2fn.generate_tokens(params, next_ids, cache=r.cache)  # no second prefill of ids + r.ids

A keyword of the functions people already call (`return_details=True`, as `transformers`'
`return_dict_in_generate=True`) rather than a second function: every option (processors, seeds, stop strings, edits,
`cache=`) works with details and there is no second signature to keep in step. Without it nothing here runs: the
default path records nothing and does no extra step.

- `cache` holds every token of the rows: the prompt and each row's new tokens up to and including its EOS, or the
  token that completed its stop string (the stop string's tokens stay in the cache, as in `transformers`'
  sequences), so the row continues as if prefilled from `prompt + r.ids[i, :r.lengths[i]] + more`. To put the last
  token in, details run one more decode step at the end. Slots a row wrote after it stopped (EOS filler, tokens
  past a stop string while other rows went on) are marked invalid, as left padding is.
- `cache` is None where it could not hold the sequence: generation slid past the context window (the cache then
  holds a re-prefilled window, not the sequence), or the last token does not fit the context.
"""

import dataclasses

import torch
from torch import Tensor

from .cache import KVCache, grow
from .config import GPTConfig

__all__ = ["Generation", "Recorder", "StopReason", "continuation_cache", "check_top_logprobs"]

StopReason = str  # "eos" | "stop" | "length"


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
    """One generation's results, row by row (`rows` = prompts).

    - `ids` `[rows, new]`: the new tokens (after its EOS a row repeats the EOS id, as `generate_tokens` fills it);
      `torch.cat([prompt_ids, r.ids], 1)` is what `generate_tokens` returns.
    - `texts`: each row's text (text-level `generate` only, else None), as `generate` returns it.
    - `logprobs` `[rows, new]`: the model's log-probability of each chosen token (log_softmax of its logits, before
      any filter or processor; the values a `forward` over the final sequence gives).
    - `lengths`: each row's count of real new tokens (its EOS, or the token completing its stop string, included).
    - `stop_reasons`: per row "eos" (produced the EOS id), "stop" (a stop string appeared) or "length"
      (`max_new_tokens`).
    - `logits` `[rows, new, vocab]` (`output_logits=True`): the model's raw logits at each step.
    - `top_ids`, `top_logprobs` `[rows, new, k]` (`top_logprobs=k`): the `k` most likely ids at each step and their
      log-probabilities (the model's, most likely first).
    - `cache`: the final `KVCache`, live (see the module docstring), for `cache=` of the next call.
    """

    ids: Tensor
    logprobs: Tensor
    lengths: tuple[int, ...]
    stop_reasons: tuple[StopReason, ...]
    cache: KVCache | None
    texts: tuple[str, ...] | None = None
    logits: Tensor | None = None
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


def check_top_logprobs(top_logprobs: int | None, vocab: int) -> int | None:
    """`top_logprobs`: None or an int in `[1, vocab]`."""
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                     or not 1 <= top_logprobs <= vocab):
        raise ValueError(f"top_logprobs must be None or an integer in [1, {vocab}] (how many alternatives to keep "
                         f"per step), got {top_logprobs!r}")
    return top_logprobs


class Recorder:
    """Collects a `Generation` while `generate`'s loop runs: one per call, written only by that call's loop (the
    mutable helper of one call; the record it makes is frozen)."""

    def __init__(self, *, logits: bool = False, top_logprobs: int | None = None) -> None:
        self.keep_logits, self.top = logits, top_logprobs
        self.tokens: list[Tensor] = []
        self.logprobs: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.tops: list[tuple[Tensor, Tensor]] = []
        self.stopped: dict[int, tuple[StopReason, int]] = {}  # row -> (reason, new tokens) where the text stopped
        self.base = 0  # cache slots before the first new token (prefill included)
        self.cache: KVCache | None = None

    def step(self, logits: Tensor, token: Tensor, logprob: Tensor) -> None:
        """One step: the model's logits `[rows, vocab]`, the chosen ids `[rows]` and their log-probabilities."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.keep_logits:
            self.logits.append(logits.float().clone())
        if self.top is not None:
            values, ids = torch.log_softmax(logits.float(), -1).topk(self.top, dim=-1)
            self.tops.append((ids, values))

    def stop_row(self, row: int, reason: StopReason) -> None:
        """Row `row` stopped at the last recorded step (text level: EOS or a stop string)."""
        self.stopped.setdefault(row, (reason, len(self.tokens)))

    def result(self, eos_id: int | None, rows: int, texts: tuple[str, ...] | None = None) -> Generation:
        """The record of `rows` rows: stop reasons from EOS (token level) or from `stop_row`, and the cache with each
        row's slots after its end marked invalid."""
        new = len(self.tokens)
        ids = torch.stack(self.tokens, 1) if self.tokens else torch.zeros(rows, 0, dtype=torch.long)
        lengths, reasons = [new] * rows, ["length"] * rows
        if eos_id is not None and new:
            hit = ids == eos_id
            firsts = hit.long().argmax(1).tolist()
            for i, any_hit in enumerate(hit.any(1).tolist()):
                if any_hit:
                    lengths[i], reasons[i] = firsts[i] + 1, "eos"
        for i, (reason, n) in self.stopped.items():
            if n <= lengths[i]:
                lengths[i], reasons[i] = n, reason
        return Generation(ids, torch.stack(self.logprobs, 1) if self.logprobs else torch.zeros(rows, 0), tuple(lengths),
                          tuple(reasons), self._trimmed(lengths), texts,
                          torch.stack(self.logits, 1) if self.keep_logits and self.logits else None,
                          torch.stack([i for i, _ in self.tops], 1) if self.tops else None,
                          torch.stack([v for _, v in self.tops], 1) if self.tops else None)

    def _trimmed(self, lengths: list[int]) -> KVCache | None:
        cache = self.cache
        if cache is None:
            return None
        slot = torch.arange(cache.capacity, device=cache.valid.device)
        end = self.base + torch.tensor(lengths, device=cache.valid.device)
        valid = cache.valid & (slot < end[:, None])
        return dataclasses.replace(cache, valid=valid, positions=valid.sum(-1))


def continuation_cache(cache: KVCache, config: GPTConfig, *, batch: int, seq: int, max_new_tokens: int,
                       device: torch.device, dtype: torch.dtype) -> tuple[KVCache, bool]:
    """The cache a call with `cache=` decodes into, and whether its first step may donate it.

    The caller's cache is never consumed: with room for the `seq` new prompt tokens and `max_new_tokens` it is
    used as it is and the first step runs out of place (one copy, then the call's own buffers are donated); without
    room it is grown into a new cache of exactly the capacity needed (`gpt2fn.cache.grow`, a copy) and donated.
    Past the context window there is no room to grow into: a ValueError says what to do."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a gpt2fn.KVCache (a Generation's .cache), got {type(cache).__name__}")
    cache.check_live("cache=")
    if cache.batch != batch:
        raise ValueError(f"cache= holds {cache.batch} rows but {batch} prompts were given; continue every row of the "
                         "cache (gpt2fn.select_rows picks rows)")
    if cache.valid.device != device or cache.keys[0].dtype != dtype:
        raise ValueError(f"cache= is {cache.keys[0].dtype} on {cache.valid.device}; these params decode in {dtype} "
                         f"on {device}: continue with the params that made the cache (and its cache_dtype=)")
    if len(cache.keys) != config.n_layers or cache.keys[0].shape[1] != config.n_heads or (
            cache.keys[0].shape[3] != config.head_dim):
        raise ValueError(f"cache= has {len(cache.keys)} layers of {cache.keys[0].shape[1]} heads x "
                         f"{cache.keys[0].shape[3]}; the model has {config.n_layers} of {config.n_heads} x "
                         f"{config.head_dim}: continue with the params that made the cache")
    held = int(cache.length)
    need = held + seq + max_new_tokens
    if need > config.context_length:
        raise ValueError(f"cache= holds {held} slots; {seq} prompt tokens and max_new_tokens={max_new_tokens} more "
                         f"need {need}, past the context window of {config.context_length}. Ask for fewer tokens, "
                         "or generate from the ids without cache= (the prompt is then cropped to the window)")
    if need <= cache.capacity:
        return cache, False
    return grow(cache, need), True

"""Decoding strategies as pure functions `logits -> logits` (filters) and `logits -> token ids` (choosers).

Every function reads only its arguments and returns new tensors; randomness comes from explicit
`torch.Generator`s, one per batch row, so a row's sample never depends on the other rows of its batch.
Logits are `[batch, vocab]` (the last position's); filtering works in fp32 whatever the model's dtype.

    logits -> mask_vocab (padding ids of a nanoGPT vocab) -> repetition_penalty (Keskar et al. 2019, CTRL)
           -> no_repeat_ngram (Paulus et al. 2017) -> suppress_tokens
           -> temperature -> top_k (Fan et al. 2018) -> top_p (nucleus, Holtzman et al. 2019)
           -> min_p (Nguyen et al. 2024, after temperature) -> sample / greedy

The order is `transformers`' (`GenerationMixin._get_logits_processor`): processors, then the sampling warpers.

`temperature == 0` means greedy (argmax), the seed's behaviour and the default.
"""

import dataclasses
import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .shapes import checked

__all__ = [
    "SamplingOptions", "check_options", "mask_vocab", "repetition_penalty", "scale_temperature", "top_k_filter",
    "top_p_filter", "min_p_filter", "no_repeat_ngram", "suppress_tokens", "greedy", "sample", "row_generators",
    "filter_logits", "choose", "next_token",
]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to choose the next token: greedy when `temperature == 0`, else sample from the filtered distribution."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    no_repeat_ngram_size: int | None = None
    suppress: tuple[int, ...] | None = None  # any sequence of ids is accepted and stored as a tuple

    def __post_init__(self) -> None:
        check_options(self.temperature, self.top_k, self.top_p, self.repetition_penalty, min_p=self.min_p,
                      no_repeat_ngram_size=self.no_repeat_ngram_size, suppress=self.suppress)
        if self.suppress is not None:
            object.__setattr__(self, "suppress", tuple(int(i) for i in self.suppress))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_options(temperature: float, top_k: int | None, top_p: float | None,
                  repetition_penalty: float | None, *, min_p: float | None = None,
                  no_repeat_ngram_size: int | None = None, suppress: Sequence[int] | None = None) -> None:
    """Raise a ValueError naming every bad decoding option at once."""
    problems = []
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        problems.append(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        problems.append(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        problems.append(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if repetition_penalty is not None and (not isinstance(repetition_penalty, (int, float))
                                           or not math.isfinite(repetition_penalty) or repetition_penalty <= 0):
        problems.append(f"repetition_penalty must be a finite number > 0 (1 = none) or None, "
                        f"got {repetition_penalty!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float))
                              or not 0.0 <= min_p <= 1.0):
        problems.append(f"min_p must be in [0, 1] (0 = none) or None, got {min_p!r}")
    if no_repeat_ngram_size is not None and (isinstance(no_repeat_ngram_size, bool)
                                             or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 1):
        problems.append(f"no_repeat_ngram_size must be an integer >= 1 or None, got {no_repeat_ngram_size!r}")
    if suppress is not None:
        bad = _bad_ids(suppress)
        if bad is not None:
            problems.append(f"suppress must be a sequence of token ids >= 0 (the ids never to produce) or None; "
                            f"got {bad}")
    if problems:
        raise ValueError("; ".join(problems))


def _bad_ids(ids: object) -> str | None:
    """Why `ids` is not a sequence of non-negative int token ids, or None when it is."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        return f"{ids!r} (not a list or tuple of ints)"
    wrong = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    return f"{wrong!r} in {list(ids)!r}" if wrong else None


@checked
def mask_vocab(logits: Float[Tensor, "batch vocab"], n_tokens: int, allowed: Bool[Tensor, " vocab"] | None = None
               ) -> Float[Tensor, "batch vocab"]:
    """Forbid ids `>= n_tokens` (the padding rows of a padded vocabulary, nanoGPT's 50304) and, when `allowed`
    is given, every id where it is False (a model trained on a corpus's own vocabulary): they are never produced."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if n_tokens >= logits.shape[-1]:
        return logits
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= n_tokens, float("-inf"))


@checked
def repetition_penalty(logits: Float[Tensor, "batch vocab"], seen: Bool[Tensor, "batch vocab"], penalty: float
                       ) -> Float[Tensor, "batch vocab"]:
    """CTRL's repetition penalty on ids already `seen`: positive logits divided by `penalty`, negative ones
    multiplied (so `penalty > 1` always makes a repeat less likely), as Hugging Face does."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@checked
def scale_temperature(logits: Float[Tensor, "batch vocab"], temperature: float) -> Float[Tensor, "batch vocab"]:
    """logits / temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}; 0 means greedy: use greedy()")
    return logits / temperature


@checked
def top_k_filter(logits: Float[Tensor, "batch vocab"], k: int) -> Float[Tensor, "batch vocab"]:
    """Keep the `k` largest logits of each row (ties with the k-th are kept too), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@checked
def top_p_filter(logits: Float[Tensor, "batch vocab"], p: float) -> Float[Tensor, "batch vocab"]:
    """Nucleus filter: keep the fewest most-probable ids whose probabilities sum to at least `p` (always >= 1)."""
    if p >= 1.0:
        return logits
    # transformers' TopPLogitsWarper's arithmetic, so the two agree to the bit at the boundary: ascending order,
    # an id is dropped when the mass of the ids ranked at or below it is at most 1 - p (the top id always stays)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    below = torch.softmax(sorted_logits.float(), dim=-1).cumsum(-1)
    drop_sorted = below <= (1 - p)
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@checked
def min_p_filter(logits: Float[Tensor, "batch vocab"], min_p: float) -> Float[Tensor, "batch vocab"]:
    """Min-p: keep the ids whose probability is at least `min_p` times the most likely id's (which always stays).

    As `transformers`' MinPLogitsWarper; meant for the temperature-scaled logits. A row with no finite logit
    is returned unchanged."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    probs = torch.softmax(logits, dim=-1)
    # min_p <= 1, so the top probability always passes its own threshold: no separate "keep one" step
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


@checked
def no_repeat_ngram(logits: Float[Tensor, "batch vocab"], history: Int[Tensor, "batch seq"], n: int,
                    real: Bool[Tensor, "batch seq"] | None = None) -> Float[Tensor, "batch vocab"]:
    """No repeated n-grams (Paulus et al. 2017): forbid every id that would complete an `n`-gram already in the row.

    `history` is each row's tokens so far, prompt included (as `transformers`' NoRepeatNGramLogitsProcessor);
    `real` marks its real tokens where rows are padded (on the left, as `generate` lays them out). An n-gram is
    a window of `n` consecutive real positions: windows touching padding never count, and a row whose last
    `n - 1` positions are not all real bans nothing. Vectorised: the last `n - 1` tokens are matched against
    every window of the history at once (`unfold`), and each matching window bans its own last token."""
    if isinstance(n, bool) or n < 1:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 1, got {n}")
    batch, seq = history.shape
    vocab = logits.shape[-1]
    if seq < n:  # no complete n-gram yet
        return logits
    prefix = history[:, seq - n + 1:]                       # [batch, n-1], empty for n == 1
    windows = history.unfold(1, n, 1)                       # [batch, seq-n+1, n]
    matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # [batch, seq-n+1]
    if real is not None:
        matches = matches & real.unfold(1, n, 1).all(-1) & real[:, seq - n + 1:].all(-1, keepdim=True)
    # non-matching windows (and ids outside the logits' vocab, which cannot be produced) go to a spare column
    last = windows[..., -1]
    target = torch.where(matches & (last >= 0), last.clamp(max=vocab), vocab)
    banned = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device).scatter(1, target, True)
    return logits.masked_fill(banned[:, :vocab], float("-inf"))


@checked
def suppress_tokens(logits: Float[Tensor, "batch vocab"], ids: Sequence[int]) -> Float[Tensor, "batch vocab"]:
    """Never produce the token `ids` (`transformers`' SuppressTokensLogitsProcessor): their logits become -inf."""
    bad = _bad_ids(ids)
    vocab = logits.shape[-1]
    if bad is None and any(i >= vocab for i in ids):
        bad = f"{[i for i in ids if i >= vocab]!r} in {list(ids)!r}"
    if bad is not None:
        raise ValueError(f"suppress ids must be token ids in [0, {vocab}) for these logits; got {bad}")
    if not ids:
        return logits
    banned = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    banned[torch.tensor(list(ids), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(banned, float("-inf"))


@checked
def greedy(logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
    """The most likely id of each row (the first one on ties)."""
    return logits.argmax(dim=-1)


@checked
def sample(logits: Float[Tensor, "batch vocab"], generators: Sequence[torch.Generator]) -> Int[Tensor, " batch"]:
    """One id per row drawn from softmax(logits), row `i` with `generators[i]` only (ids at -inf are never drawn)."""
    if len(generators) != logits.shape[0]:
        raise ValueError(f"sample needs one generator per row: got {len(generators)} for {logits.shape[0]} rows")
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def row_generators(seed: int | torch.Generator | Sequence[int | torch.Generator] | None, batch: int,
                   device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row: an int seed `s` gives row `i` the seed `s + i` (so row `i` of a batch draws exactly
    what the same prompt alone draws with seed `s + i`); a sequence gives one seed or generator per row; a single
    Generator is only accepted for batch 1; None draws a fresh seed from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, torch.Generator):
        if batch != 1:
            raise ValueError(f"one torch.Generator cannot drive {batch} independent rows; pass an int seed or a "
                             "list with one seed/generator per row")
        return [seed]
    if isinstance(seed, int) and not isinstance(seed, bool):
        seeds: Sequence[int | torch.Generator] = [seed + i for i in range(batch)]
    elif isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = seed
        if len(seeds) != batch:
            raise ValueError(f"seed lists one entry per row: got {len(seeds)} for a batch of {batch}")
    else:
        raise ValueError(f"seed must be an int, a torch.Generator, a list of them (one per row) or None; "
                         f"got {seed!r}")
    return [s if isinstance(s, torch.Generator) else torch.Generator(device=device).manual_seed(int(s))
            for s in seeds]


def filter_logits(logits: Float[Tensor, "batch vocab"], options: SamplingOptions, *, n_tokens: int,
                  seen: Bool[Tensor, "batch vocab"] | None = None, allowed: Bool[Tensor, " vocab"] | None = None,
                  history: Int[Tensor, "batch seq"] | None = None,
                  history_mask: Bool[Tensor, "batch seq"] | None = None) -> Float[Tensor, "batch vocab"]:
    """The scores the next token is chosen from (fp32): padded or not allowed ids masked, repeats penalised,
    repeated n-grams and suppressed ids banned, then (sampling only) temperature, top-k, top-p and min-p. Greedy
    decoding takes their argmax, sampling draws from their softmax (`next_token`); speculative decoding compares
    the target's and the draft's softmax (`gpt2fn.speculative`).

    `seen` (ids already in each row) feeds the repetition penalty; `history` (each row's tokens so far, prompt
    included) and `history_mask` (its real tokens, False on left padding) feed `no_repeat_ngram_size`. The same
    functions are the processors of `gpt2fn.processors` (`repetition_penalty(1.2)`, `top_k(40)`, ...)."""
    logits = mask_vocab(logits.float(), n_tokens, allowed)
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the ids already in each row")
        logits = repetition_penalty(logits, seen, options.repetition_penalty)
    if options.no_repeat_ngram_size is not None:
        if history is None:
            raise ValueError("no_repeat_ngram_size needs `history`, each row's tokens so far [batch, seq] "
                             "(and `history_mask` where rows are left padded)")
        logits = no_repeat_ngram(logits, history, options.no_repeat_ngram_size, history_mask)
    if options.suppress:
        logits = suppress_tokens(logits, options.suppress)
    if options.greedy:
        return logits
    logits = scale_temperature(logits, options.temperature)
    if options.top_k is not None:
        logits = top_k_filter(logits, options.top_k)
    if options.top_p is not None:
        logits = top_p_filter(logits, options.top_p)
    if options.min_p is not None and options.min_p > 0:
        logits = min_p_filter(logits, options.min_p)
    return logits


def choose(logits: Float[Tensor, "batch vocab"], options: SamplingOptions,
           generators: Sequence[torch.Generator] | None = None) -> Int[Tensor, " batch"]:
    """The next id of each row from (filtered) logits: greedy when `options.temperature == 0`, else a sample."""
    if options.greedy:
        return greedy(logits)
    if generators is None:
        raise ValueError("sampling (temperature > 0) needs generators, one per row; see row_generators()")
    return sample(logits, generators)


def next_token(logits: Float[Tensor, "batch vocab"], options: SamplingOptions, *, n_tokens: int,
               generators: Sequence[torch.Generator] | None = None, seen: Bool[Tensor, "batch vocab"] | None = None,
               allowed: Bool[Tensor, " vocab"] | None = None, history: Int[Tensor, "batch seq"] | None = None,
               history_mask: Bool[Tensor, "batch seq"] | None = None) -> Int[Tensor, " batch"]:
    """The whole pipeline: `choose(filter_logits(logits, ...))` (see both)."""
    return choose(filter_logits(logits, options, n_tokens=n_tokens, seen=seen, allowed=allowed, history=history,
                                history_mask=history_mask), options, generators)

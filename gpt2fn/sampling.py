"""Decoding strategies as pure functions `logits -> logits` (filters) and `logits -> token ids` (choosers).

Every function reads only its arguments and returns new tensors; randomness comes from explicit
`torch.Generator`s, one per batch row, so a row's sample never depends on the other rows of its batch.
Logits are `[batch, vocab]` (the last position's); filtering works in fp32 whatever the model's dtype.

    logits -> mask_vocab (padding ids of a nanoGPT vocab) -> repetition_penalty (Keskar et al. 2019, CTRL)
           -> temperature -> top_k (Fan et al. 2018) -> top_p (nucleus, Holtzman et al. 2019) -> sample / greedy

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
    "top_p_filter", "greedy", "sample", "row_generators", "next_token",
]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to choose the next token: greedy when `temperature == 0`, else sample from the filtered distribution."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        check_options(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_options(temperature: float, top_k: int | None, top_p: float | None,
                  repetition_penalty: float | None) -> None:
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
    if problems:
        raise ValueError("; ".join(problems))


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
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the ids ranked strictly higher
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


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


def next_token(logits: Float[Tensor, "batch vocab"], options: SamplingOptions, *, n_tokens: int,
               generators: Sequence[torch.Generator] | None = None, seen: Bool[Tensor, "batch vocab"] | None = None,
               allowed: Bool[Tensor, " vocab"] | None = None) -> Int[Tensor, " batch"]:
    """The whole pipeline: mask padded (or not allowed) ids, penalise repeats, then greedy or
    temperature/top-k/top-p sampling."""
    logits = mask_vocab(logits.float(), n_tokens, allowed)
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen`, the ids already in each row")
        logits = repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return greedy(logits)
    logits = scale_temperature(logits, options.temperature)
    if options.top_k is not None:
        logits = top_k_filter(logits, options.top_k)
    if options.top_p is not None:
        logits = top_p_filter(logits, options.top_p)
    if generators is None:
        raise ValueError("sampling (temperature > 0) needs generators, one per row; see row_generators()")
    return sample(logits, generators)

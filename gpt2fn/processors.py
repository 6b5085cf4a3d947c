"""Rules of generation as plain functions: a processor is `fn(logits [batch, vocab], ids [batch, seq]) -> logits`.

    generate(params, prompt, processors=[bad_words([[464, 3290]]), sequence_bias({(11,): -2.0}), ...])

`generate`, `generate_tokens` and `stream` apply the processors after their built-in filters (the keywords
`repetition_penalty`, `no_repeat_ngram_size`, `suppress`, then, when sampling, `temperature`, `top_k`, `top_p`,
`min_p`), in the order listed, and choose the next token from the result (greedy when `temperature=0`, else a
sample). A processor must be pure: read its arguments, write into neither, return new logits of the same shape.

- `logits`: fp32, after the built-in filters (temperature-scaled when sampling); `-inf` marks an id that will not
  be produced.
- `ids`: each row's tokens so far, prompt included (as cropped to the context window; with `cache=`, the tokens of
  this call only: the cache holds keys and values, not ids), one column per step, `int64`. **Left padding is
  `PAD = -1`**: every row has the same width (so length rules count as `transformers`' do: padded width), and a
  padded slot can never match a real id, so n-gram and sequence rules see only real tokens, as the same prompt
  run alone. Use `ids >= 0` for the mask of real tokens; `ids.clamp(min=0)` before indexing with them.
  (`transformers` passes the padding as real ids, so its n-gram and repetition rules count it.)

Factories (each returns a `Processor`, a named, checked callable; any plain function of that signature works too):

- `temperature(t)`, `top_k(k)`, `top_p(p)`, `min_p(p)`: the sampling warpers (`TemperatureLogitsWarper`,
  `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper` in `transformers`);
- `repetition_penalty(r)`, `no_repeat_ngram(n)`, `suppress(ids)`: the built-in processors
  (`RepetitionPenaltyLogitsProcessor`, `NoRepeatNGramLogitsProcessor`, `SuppressTokensLogitsProcessor`);
- `bad_words(sequences)`: token sequences never produced (`NoBadWordsLogitsProcessor`);
- `sequence_bias({seq: bias})`: add `bias` to the token completing `seq` (`SequenceBiasLogitsProcessor`);
- `min_new_tokens(n, prompt_len=, eos_id=)`, `min_length(n, eos_id=)`: no EOS before `n` new (or total) tokens
  (`MinNewTokensLengthLogitsProcessor`, `MinLengthLogitsProcessor`);
- `forced_eos_at_max(max_length, eos_id=)`: EOS as the token that makes the rows `max_length` long
  (`ForcedEOSTokenLogitsProcessor`).

The built-in factories call the very functions of `gpt2fn.sampling` that the keywords run (`top_k_filter`,
`repetition_penalty`, ...): one implementation, two ways to order it. To reorder the built-ins, leave the keywords
unset and list the processors; to sample from processed logits pass `temperature=1.0` (a division by one) and put
`temperature(t)` where it belongs in the list.

Every factory checks its arguments when called (a ValueError or TypeError naming the argument); the ids a processor
names are checked against the model's vocabulary where generation starts (`check_processors`).
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from . import sampling
from .checks import check_token_range
from .sampling import check_options
from .tokenizer import EOT

__all__ = [
    "PAD", "Processor", "LogitsProcessor", "check_processors", "apply_processors", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "no_repeat_ngram", "suppress", "bad_words", "sequence_bias", "min_new_tokens",
    "min_length", "forced_eos_at_max",
]

PAD = -1  # what a processor sees in `ids` at a left-padding position

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Processor:
    """A named processor `(logits [batch, vocab], ids [batch, seq]) -> logits`; `token_ids` are the ids it names
    (checked against the model's vocabulary when generation starts, and against the logits at every call)."""

    name: str
    fn: LogitsProcessor = dataclasses.field(repr=False)
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:  # sorted, so the largest id (the one range check per call) is the last
        object.__setattr__(self, "token_ids", tuple(sorted(set(self.token_ids))))

    def __call__(self, logits: Tensor, ids: Tensor) -> Tensor:
        _check_call(logits, ids, self)
        return self.fn(logits, ids)


def _check_call(logits: Tensor, ids: Tensor, p: Processor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(ids, Tensor):
        raise TypeError(f"{p.name} takes (logits, ids), two torch.Tensors; got ({_describe(logits)}, "
                        f"{_describe(ids)})")
    if logits.ndim != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"{p.name}: logits must be a float tensor [batch, vocab]; got "
                         f"{_describe(logits)}")
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.shape[0] != logits.shape[0]:
        raise ValueError(f"{p.name}: ids must be an integer tensor [batch={logits.shape[0]}, seq] (each row's "
                         f"tokens so far, {PAD} on left padding); got {_describe(ids)}")
    if p.token_ids and p.token_ids[-1] >= logits.shape[1]:
        raise ValueError(f"{p.name} names token id {p.token_ids[-1]}, outside these logits' vocabulary "
                         f"[0, {logits.shape[1]})")


def _describe(x: object) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def check_processors(processors: Sequence[LogitsProcessor] | None, n_tokens: int) -> tuple[LogitsProcessor, ...]:
    """`processors` as a tuple, checked at generation's entry points: a list or tuple of callables, and every id a
    `Processor` names within the ids the model may produce, `[0, n_tokens)`."""
    if processors is None:
        return ()
    if callable(processors) or isinstance(processors, (str, bytes)) or not isinstance(processors, Sequence):
        raise TypeError(f"processors must be a list of functions fn(logits, ids) -> logits; got "
                        f"{type(processors).__name__}" + (" (wrap a single processor in a list: [fn])"
                                                         if callable(processors) else ""))
    for i, p in enumerate(processors):
        if not callable(p):
            raise TypeError(f"processors[{i}] is a {type(p).__name__}, not a function fn(logits, ids) -> logits; "
                            "make one with gpt2fn.processors (bad_words, sequence_bias, top_k, ...) or write one")
        if isinstance(p, Processor) and p.token_ids:
            check_token_range(list(p.token_ids), n_tokens, what=f"processors[{i}] ({p.name})")
    return tuple(processors)


def apply_processors(processors: Sequence[LogitsProcessor], logits: Tensor, ids: Tensor) -> Tensor:
    """`processors[-1](... processors[0](logits, ids) ..., ids)`: each in turn, each result checked to be logits of
    the shape it was given (a wrong result names the processor)."""
    for i, p in enumerate(processors):
        out = p(logits, ids)
        if not isinstance(out, Tensor) or out.shape != logits.shape or not out.dtype.is_floating_point:
            raise ValueError(f"processors[{i}] ({getattr(p, 'name', getattr(p, '__name__', type(p).__name__))}) "
                             f"returned {_describe(out)}; a processor returns float logits of the shape it was "
                             f"given, {list(logits.shape)}")
        logits = out
    return logits


def _real(ids: Tensor) -> Tensor:
    return ids >= 0


# ---------------------------------------------------------------------------------------------------------------
# The built-ins, as processors (the functions of gpt2fn.sampling)


def temperature(t: float) -> Processor:
    """logits / t (`t > 0`): `gpt2fn.sampling.scale_temperature`."""
    check_options(t, None, None, None)
    if t == 0:
        raise ValueError("temperature(t) scales logits and needs t > 0; greedy decoding is generate's "
                         "temperature=0, not a processor")
    return Processor(f"temperature({t})", lambda logits, ids: sampling.scale_temperature(logits, t))


def top_k(k: int) -> Processor:
    """Keep the `k` largest logits of each row: `gpt2fn.sampling.top_k_filter`."""
    check_options(1.0, k, None, None)
    return Processor(f"top_k({k})", lambda logits, ids: sampling.top_k_filter(logits, k))


def top_p(p: float) -> Processor:
    """The nucleus of mass `p`: `gpt2fn.sampling.top_p_filter`."""
    check_options(1.0, None, p, None)
    return Processor(f"top_p({p})", lambda logits, ids: sampling.top_p_filter(logits, p))


def min_p(p: float) -> Processor:
    """Keep ids with at least `p` times the top probability: `gpt2fn.sampling.min_p_filter`."""
    check_options(1.0, None, None, None, min_p=p)
    return Processor(f"min_p({p})", lambda logits, ids: sampling.min_p_filter(logits, p))


def repetition_penalty(penalty: float) -> Processor:
    """CTRL's penalty on every id already in the row (prompt included, padding not):
    `gpt2fn.sampling.repetition_penalty`."""
    check_options(1.0, None, None, penalty)

    def apply(logits: Tensor, ids: Tensor) -> Tensor:
        batch, vocab = logits.shape  # padding (and any id past the logits) lands in a spare last column
        at = torch.where(_real(ids) & (ids < vocab), ids, vocab)
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device).scatter(1, at, True)
        return sampling.repetition_penalty(logits, seen[:, :vocab], penalty)

    return Processor(f"repetition_penalty({penalty})", apply)


def no_repeat_ngram(n: int) -> Processor:
    """Never repeat an `n`-gram of the row (windows touching padding never count):
    `gpt2fn.sampling.no_repeat_ngram`."""
    check_options(1.0, None, None, None, no_repeat_ngram_size=n)
    return Processor(f"no_repeat_ngram({n})", lambda logits, ids: sampling.no_repeat_ngram(logits, ids, n, _real(ids)))


def suppress(ids: Sequence[int]) -> Processor:
    """Never produce these ids: `gpt2fn.sampling.suppress_tokens`."""
    check_options(1.0, None, None, None, suppress=ids)
    banned = tuple(int(i) for i in ids)
    return Processor(f"suppress({list(banned)})", lambda logits, _: sampling.suppress_tokens(logits, banned), banned)


# ---------------------------------------------------------------------------------------------------------------
# Sequence rules


def _sequence(seq: object, what: str) -> tuple[int, ...]:
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or len(seq) == 0:
        raise TypeError(f"{what} must be a non-empty list or tuple of token ids; got {seq!r:.60}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in seq):
        raise ValueError(f"{what} must hold token ids (ints >= 0); got {list(seq)!r:.60}")
    return tuple(int(i) for i in seq)


def sequence_bias(biases: Mapping[Sequence[int], float]) -> Processor:
    """Add `bias` to the logit of a sequence's last token wherever the row ends with the rest of it (a sequence of
    one token is biased at every step), as `transformers`' SequenceBiasLogitsProcessor: biases of sequences with
    the same last token add up; `-inf` forbids the sequence.

    `biases`: `{(id, ..., id): bias}` (a dict of tuples) or a list of `(ids, bias)` pairs."""
    pairs = list(biases.items()) if isinstance(biases, Mapping) else biases
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise TypeError("sequence_bias takes a non-empty dict {(id, ...): bias} or list of ((id, ...), bias) pairs; "
                        f"got {biases!r:.60}")
    table: dict[tuple[int, ...], float] = {}
    for entry in pairs:
        if not isinstance(entry, Sequence) or len(entry) != 2:
            raise TypeError(f"sequence_bias entries are ((id, ...), bias) pairs; got {entry!r:.60}")
        seq, bias = _sequence(entry[0], "a sequence_bias key"), entry[1]
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or bias != bias:
            raise ValueError(f"the bias of {list(seq)} must be a number (-inf forbids it); got {bias!r}")
        table[seq] = float(bias)  # a repeated sequence: the last bias counts, as a dict would keep it
    by_prefix: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for seq, bias in table.items():
        by_prefix.setdefault(len(seq) - 1, []).append((seq, bias))
    # per prefix length n: (prefixes [sequences, n], last ids [sequences], biases [sequences]), made once (CPU)
    groups = [(n, torch.tensor([s[:-1] for s, _ in g], dtype=torch.long).reshape(len(g), n),
               torch.tensor([s[-1] for s, _ in g], dtype=torch.long), torch.tensor([b for _, b in g]))
              for n, g in by_prefix.items()]

    def apply(logits: Tensor, ids: Tensor) -> Tensor:
        dev, (batch, seq) = logits.device, ids.shape
        bias = torch.zeros(logits.shape, dtype=logits.dtype, device=dev)
        for n, prefixes, last, amount in groups:
            if n > seq:  # the row is shorter than the prefix: it cannot end with it
                continue
            amount, last = amount.to(device=dev, dtype=logits.dtype), last.to(dev)
            if n == 0:
                bias.index_add_(1, last, amount.expand(batch, -1))
                continue
            match = (ids[:, None, seq - n:] == prefixes.to(dev)).all(-1)               # [batch, sequences]
            bias.index_add_(1, last, torch.where(match, amount, 0.0))
        return logits + bias

    named = ", ".join(f"{list(s)}: {b}" for s, b in list(table.items())[:3]) + (", ..." if len(table) > 3 else "")
    return Processor(f"sequence_bias({{{named}}})", apply, tuple(sorted({i for s in table for i in s})))


def bad_words(sequences: Sequence[Sequence[int]]) -> Processor:
    """Never produce any of these token sequences: the last token of each is forbidden wherever the row ends with
    the rest (`transformers`' NoBadWordsLogitsProcessor, which is `sequence_bias` with bias -inf, as here)."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence) or not sequences:
        raise TypeError(f"bad_words takes a non-empty list of token-id sequences, e.g. [[464], [11, 290]]; got "
                        f"{sequences!r:.60}")
    if all(isinstance(i, int) for i in sequences):
        raise TypeError(f"bad_words takes a list of sequences; got one flat list {list(sequences)!r:.60}: wrap it "
                        "([[...]]) for one sequence, or list each id alone ([[a], [b]]) to ban single tokens")
    seqs = [_sequence(s, f"bad_words[{i}]") for i, s in enumerate(sequences)]
    p = sequence_bias({s: float("-inf") for s in seqs})
    return dataclasses.replace(p, name=f"bad_words({[list(s) for s in seqs[:3]]}{'...' if len(seqs) > 3 else ''})")


# ---------------------------------------------------------------------------------------------------------------
# Length rules (lengths count columns of `ids`: with left padding, the padded width, as transformers counts)


def _count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {n!r}")
    return n


def _eos(eos_id: object) -> int:
    if isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0:
        raise ValueError(f"eos_id must be a token id (an int >= 0; <|endoftext|> is {EOT}), got {eos_id!r}")
    return eos_id


def _forbid_eos(logits: Tensor, eos_id: int) -> Tensor:
    column = torch.arange(logits.shape[1], device=logits.device) == eos_id
    return logits.masked_fill(column, float("-inf"))


def min_new_tokens(n: int, *, prompt_len: int, eos_id: int = EOT) -> Processor:
    """No `eos_id` until `n` tokens follow the prompt of `prompt_len` columns (`ids.shape[1] - prompt_len < n`), as
    `transformers`' MinNewTokensLengthLogitsProcessor. `prompt_len` is the width of the ids generation starts from:
    `ids.shape[1]` for `generate_tokens` (padded, cropped to the context), `len(gpt2fn.encode(prompt))` for text."""
    n, prompt_len, eos_id = _count(n, "min_new_tokens"), _count(prompt_len, "prompt_len"), _eos(eos_id)
    return Processor(f"min_new_tokens({n}, prompt_len={prompt_len}, eos_id={eos_id})",
                     lambda logits, ids: _forbid_eos(logits, eos_id) if ids.shape[1] - prompt_len < n else logits,
                     (eos_id,))


def min_length(n: int, *, eos_id: int = EOT) -> Processor:
    """No `eos_id` while the rows hold fewer than `n` columns, prompt included (MinLengthLogitsProcessor)."""
    n, eos_id = _count(n, "min_length"), _eos(eos_id)
    return Processor(f"min_length({n}, eos_id={eos_id})",
                     lambda logits, ids: _forbid_eos(logits, eos_id) if ids.shape[1] < n else logits, (eos_id,))


def forced_eos_at_max(max_length: int, *, eos_id: int = EOT) -> Processor:
    """Force `eos_id` as the token that makes the rows `max_length` columns long, prompt included
    (`transformers`' ForcedEOSTokenLogitsProcessor: every other logit -inf, EOS's 0)."""
    max_length, eos_id = _count(max_length, "max_length"), _eos(eos_id)

    def apply(logits: Tensor, ids: Tensor) -> Tensor:
        if ids.shape[1] != max_length - 1:
            return logits
        column = torch.arange(logits.shape[1], device=logits.device) == eos_id
        return torch.where(column, 0.0, torch.full_like(logits, float("-inf")))

    return Processor(f"forced_eos_at_max({max_length}, eos_id={eos_id})", apply, (eos_id,))

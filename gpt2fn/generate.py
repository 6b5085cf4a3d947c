"""Autoregressive generation: `generate` (text -> text), `generate_tokens` (ids -> ids), `stream` (text pieces).

Data flow: text -> tokenizer.encode -> left-padded ids + mask -> prefill `decode_step(params, cache, ids)` once ->
one `decode_step` per new token -> `gpt2fn.sampling.filter_logits` -> `processors` (`gpt2fn.processors`) ->
`gpt2fn.sampling.choose` -> ids -> incremental UTF-8 decode -> text. `return_details=True` records what the loop
saw into a `gpt2fn.details.Generation` (with the final cache; `cache=` continues from one); off, nothing is recorded.

- The cache is preallocated to `prompt + max_new_tokens` positions (at most the context length) and donated from
  step to step (`gpt2fn.step`: written in place, the previous value consumed); a decode step does no work that
  grows with the sequence beyond attention over the capacity.
- Batches of prompts of different lengths are left-padded; positions are counted from the mask, so a row's
  tokens are those of the same prompt run alone (sampling included: row `i` has its own generator).
- Past the context window the sequence slides: when the cache is full, the last `context_length - slide`
  tokens are prefilled again (`slide = max(1, context_length // 8)`), so each token sees between
  `context_length - slide` and `context_length` tokens of context. A prompt longer than the window is cropped
  from the left with a warning, like the seed's loop.
- `draft=` (a draft model or prompt lookup) decodes speculatively: `gpt2fn.speculative`, dispatched from the
  token loop below, with the same outputs (greedy) or the same distribution (sampling).
- Every step reads the weights the caller holds, as they are (no decode layout, no copy: `gpt2fn.kernels` picks
  the kernel). Shape checks run on the prefill and the first decode step, then step aside: on every step they
  would cost more than half again the step's time for GPT-2 124M.
"""

import codecs
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .beam import beam_search, check_beam_options
from .cache import KVCache, check_cache_dtype, init_cache, rollback
from .checks import check_prompt_ids
from .details import Recorder, check_top_logprobs, continuation_cache
from .devices import parse_device
from .model import left_pad, trained_vocab_index
from .params import GPTParams, check_params, tree_to
from .processors import PAD, LogitsProcessor, apply_processors, check_processors
from .sampling import SamplingOptions, choose, filter_logits, row_generators
from .shapes import checks_enabled, shape_checks
from .speculative import Draft, PromptLookup, check_draft, speculative_steps
from .step import compiled_decode_step, compiled_decode_step_at, decode_step, decode_step_at
from .tokenizer import EOT, encode, tokenizer

__all__ = ["generate", "generate_tokens", "stream"]

Seed = int | torch.Generator | Sequence[int | torch.Generator] | None


# ---------------------------------------------------------------------------------------------------------------
# Token level


@dataclasses.dataclass(frozen=True)
class _Request:
    max_new_tokens: int
    options: SamplingOptions
    eos_id: int | None
    edit: Any = None  # a gpt2fn.study tap applying the edits and recording the captures, or None
    compile: bool = False
    logprobs: bool = False
    processors: tuple[LogitsProcessor, ...] = ()  # gpt2fn.processors, applied after the built-in filters
    capture: bool = False  # whether `edit` records captures (`gpt2fn.study.run.generation_tap`)
    draft: Draft | None = None  # speculative decoding (gpt2fn.speculative): a draft model or PromptLookup
    draft_tokens: int = 0
    cache_dtype: torch.dtype | None = None  # the KV cache's keys and values (None: the activations' dtype)


def _request(params: GPTParams, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
             repetition_penalty: float | None, eos: bool | int | None, *, min_p: float | None = None,
             no_repeat_ngram_size: int | None = None, suppress: Sequence[int] | None = None,
             edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None, compile: bool = False,
             logprobs: bool = False, processors: Sequence[LogitsProcessor] | None = None,
             capture: str | Sequence[str] | None = None, draft: Any = None, draft_tokens: Any = None,
             cache_dtype: torch.dtype | str | None = None) -> _Request:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, min_p, no_repeat_ngram_size,
                              None if suppress is None else tuple(suppress))
    tap = None
    if edit or capture:
        if capture and compile:
            raise ValueError("capture= records each step's activations eagerly; compile=True compiles the steps: "
                             "drop one of them")
        from .study.run import generation_tap  # study builds on the model, not the other way round

        tap = generation_tap(params.config, edit, capture or ())
    n_tokens = params.config.n_tokens
    if eos is True:
        eos_id = EOT if EOT < n_tokens else None  # a model with a smaller vocabulary has no <|endoftext|>
    elif eos is False or eos is None:
        eos_id = None
    elif isinstance(eos, int) and 0 <= eos < n_tokens:
        eos_id = eos
    else:
        raise ValueError(f"eos must be True (<|endoftext|>), False/None (never stop early) or a token id in "
                         f"[0, {n_tokens}); got {eos!r}")
    spec, k = check_draft(params, draft, draft_tokens, edit=bool(edit), compile=bool(compile))
    if capture and spec is not None:
        raise ValueError("capture= records one-token steps; speculative decoding checks several tokens per "
                         "step: drop capture= or draft=")
    if processors and spec is not None:
        raise ValueError("processors= are not applied by speculative decoding (its rejection rule compares the "
                         "built-in filtered distributions of both models): drop processors= or draft=")
    return _Request(max_new_tokens, options, eos_id, tap, bool(compile), bool(logprobs),
                    check_processors(processors, n_tokens), capture=bool(capture), draft=spec, draft_tokens=k,
                    cache_dtype=check_cache_dtype(cache_dtype))


def _crop_to_window(ids: Tensor, mask: Tensor | None, ctx: int) -> tuple[Tensor, Tensor | None]:
    if ids.shape[1] <= ctx:
        return ids, mask
    longest = ids.shape[1] if mask is None else int(mask.sum(1).max())
    if longest > ctx:
        warnings.warn(f"prompt of {longest} tokens is longer than the context window of {ctx}; keeping the last "
                      f"{ctx} tokens", stacklevel=4)
    return ids[:, -ctx:], None if mask is None else mask[:, -ctx:]


def _token_steps(params: GPTParams, ids: Tensor, mask: Tensor | None, request: _Request,
                 generators: list[torch.Generator] | None, cache: KVCache | None = None,
                 record: Recorder | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield `(next token [batch], its log-probability [batch] or None)` of every row, step by step; finished
    rows (EOS) repeat the EOS id. The log-probability is the model's (log_softmax of its logits, before any
    sampling filter), computed only when the request asks for it.

    Each step is `decode_step` donating the cache it was given (one owner, no copy per token); with `compile`
    the one-token steps run through `compiled_decode_step()` (with edits `compiled_decode_step_at()`, the edit
    tap an argument: one graph for the whole generation either way). Edits
    (`request.edit`) are applied at the prefill and every step, at the absolute positions of the tokens. With
    `request.capture` the last token is run through the model too (one step more, so the captures cover every
    position of the final ids) and the sequence must fit the context window (no slide)."""
    if request.draft is not None:  # speculative decoding: its own loop over the same decode_step
        yield from speculative_steps(params, request.draft, ids, mask, generators, options=request.options,
                                     eos_id=request.eos_id, max_new_tokens=request.max_new_tokens,
                                     draft_tokens=request.draft_tokens, logprobs=request.logprobs,
                                     cache_dtype=request.cache_dtype)
        return
    cfg, opts = params.config, request.options
    (batch, prompt_len), ctx = ids.shape, cfg.context_length
    if request.capture and prompt_len + request.max_new_tokens > ctx:
        raise ValueError(f"capture= needs the whole sequence inside the context window: prompt {prompt_len} + "
                         f"max_new_tokens {request.max_new_tokens} > context_length {ctx}; past the window "
                         "generation slides and no single forward gives the captures. Lower max_new_tokens")
    keep = ctx - max(1, ctx // 8)  # tokens kept when the window slides
    if mask is not None and bool(mask.all()):
        mask = None
    donate, filled = True, prompt_len
    kv_dtype = request.cache_dtype or params.compute_dtype
    if cache is None:
        cache = init_cache(cfg, batch, min(ctx, prompt_len + request.max_new_tokens), device=ids.device,
                           dtype=kv_dtype)
    else:  # a continuation (gpt2fn.details): the caller's cache is not consumed; it has room, never slides
        cache, donate = continuation_cache(cache, cfg, batch=batch, seq=prompt_len,
                                           max_new_tokens=request.max_new_tokens, device=ids.device,
                                           dtype=kv_dtype)
        filled += int(cache.length)
    capacity = cache.capacity
    # every token so far, preallocated: the source of a re-prefill when the window slides
    history = torch.empty(batch, prompt_len + request.max_new_tokens, dtype=torch.long, device=ids.device)
    history[:, :prompt_len] = ids
    real = None
    if mask is not None:
        real = torch.ones(history.shape, dtype=torch.bool, device=ids.device)
        real[:, :prompt_len] = mask
    seen = None
    if opts.repetition_penalty is not None:
        seen = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool, device=ids.device)
        seen.scatter_(1, ids, mask if mask is not None else torch.ones_like(ids, dtype=torch.bool))
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    allowed = None
    if cfg.trained_vocab is not None:  # a model trained on a corpus's own vocabulary predicts only those ids
        allowed = trained_vocab_index(cfg, ids.device)[1] >= 0
    step_fn = compiled_decode_step() if request.compile else decode_step
    edit = request.edit
    edited_step = compiled_decode_step_at() if request.compile else decode_step_at  # one graph for every step

    def tap_for(tokens: Tensor, pad: Tensor | None, before: KVCache) -> Any:  # the edits at absolute positions
        if edit is None:
            return None
        at = (before.positions[:, None] + (torch.ones_like(tokens, dtype=torch.bool) if pad is None else pad)
              .long().cumsum(-1) - 1).clamp(min=0)  # as the walk counts them
        return edit.at(at)

    def one_step(tok: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        if edit is None:
            return step_fn(params, cache, tok[:, None], donate=True, last_only=True)
        return edited_step(params, cache, tok[:, None], edit, cache.positions[:, None], donate=True, last_only=True)

    def finish(tok: Tensor) -> None:  # details: the last token into the cache too, so it holds the whole sequence
        if record is not None:
            record.cache = None if slid or filled == capacity else one_step(tok, cache)[1]

    every = request.capture and any(s.startswith(("final_norm", "logits")) for s in edit.capture)
    logits, cache = decode_step(params, cache, ids, pad_mask=mask, donate=donate, last_only=not every,
                                tap=tap_for(ids, mask, cache))
    slid = False
    if record is not None:
        record.base = filled
        if request.max_new_tokens == 0:  # the prefill only: its cache
            record.cache = cache
    checking = checks_enabled()  # the caller's setting for the prefill and the first step; then off (speed)
    for step in range(request.max_new_tokens):
        with shape_checks(checking):
            so_far = prompt_len + step
            scores = filter_logits(logits[:, -1], opts, n_tokens=cfg.n_tokens, seen=seen, allowed=allowed,
                                   history=history[:, :so_far],
                                   history_mask=None if real is None else real[:, :so_far])
            if request.processors:  # they see PAD (-1) on left padding, see gpt2fn.processors
                shown = history[:, :so_far] if real is None else history[:, :so_far].masked_fill(
                    ~real[:, :so_far], PAD)
                scores = apply_processors(request.processors, scores, shown)
            tok = choose(scores, opts, generators)
        logprob = None
        if request.logprobs:
            logprob = torch.log_softmax(logits[:, -1].float(), -1).gather(-1, tok[:, None])[:, 0]
        if request.eos_id is not None:
            tok = tok.masked_fill(done, request.eos_id)
            done = done | (tok == request.eos_id)
        if record is not None:
            assert logprob is not None
            record.step(logits[:, -1], tok, logprob)
        try:
            yield tok, logprob
        except GeneratorExit:  # the caller stopped early (every text row hit a stop string)
            finish(tok)
            raise
        end = prompt_len + step + 1
        last = step == request.max_new_tokens - 1 or (request.eos_id is not None and bool(done.all()))
        if last and not request.capture:
            finish(tok)
            return
        history[:, end - 1] = tok
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if filled == capacity:  # the window slides: prefill the last `keep` tokens again into the same buffers
            window_mask = None if real is None else real[:, end - keep:end]
            window = history[:, end - keep:end]
            restart = rollback(cache, 0)
            logits, cache = decode_step(params, restart, window, pad_mask=window_mask, donate=True,
                                        last_only=True, tap=tap_for(window, window_mask, restart))
            filled, slid = keep, True
            continue
        with shape_checks(checking):
            logits, cache = one_step(tok, cache)
        filled += 1
        checking = False
        if last:  # capturing: the last token went through the model as well
            return


def _prepare(params: GPTParams, device: torch.device | str | None) -> GPTParams:
    params = check_params(params)
    if device is not None:
        device = parse_device(device)
        if device != params.device:
            params = tree_to(params, device=device)
    return params


def _check_beams(request: _Request, num_beams: int, length_penalty: float, early_stopping: bool | str,
                 num_return_sequences: int) -> dict[str, Any] | None:
    """The beam-search options, checked; None for plain decoding (num_beams == 1)."""
    check_beam_options(num_beams, num_return_sequences, length_penalty, early_stopping, request.max_new_tokens)
    if num_beams == 1:
        return None
    if request.draft is not None:
        raise ValueError(f"num_beams={num_beams} does not combine with draft= (speculative decoding speeds up "
                         "greedy and sampled decoding): drop draft= or use num_beams=1")
    opts = request.options
    if not opts.greedy or opts.top_k is not None or opts.top_p is not None or opts.min_p is not None:
        raise ValueError("beam search is deterministic: temperature, top_k, top_p and min_p do not apply with "
                         f"num_beams={num_beams}; leave them unset (or use num_beams=1 to sample)")
    if request.edit is not None or request.compile or request.logprobs:
        raise ValueError("num_beams > 1 does not combine with edit=, capture=, compile=True or "
                         "return_logprobs=True")
    if opts.repetition_penalty is not None or opts.no_repeat_ngram_size is not None or opts.suppress is not None:
        raise ValueError("repetition_penalty, no_repeat_ngram_size and suppress are not applied by beam search "
                         "here; leave them unset with num_beams > 1")
    return dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                num_return_sequences=num_return_sequences)


def _recorder(request: _Request, beams: dict[str, Any] | None, cache: KVCache | None, *, details: bool,
              logits: bool, top_logprobs: int | None, logprobs: bool, vocab: int) -> Recorder | None:
    """The details options, checked; a Recorder when `return_details=True` (see gpt2fn.details), else None."""
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a gpt2fn.KVCache (a Generation's .cache), got {type(cache).__name__}")
    if (logits or top_logprobs is not None) and not details:
        raise ValueError("output_logits and top_logprobs are parts of the details record: add return_details=True")
    if beams is not None and (details or cache is not None):
        raise ValueError("num_beams > 1 does not combine with return_details=True or cache=")
    if (details or cache is not None) and (request.draft is not None or request.capture):
        raise ValueError("return_details=True and cache= follow one-token steps; they do not combine with draft= "
                         "(several tokens per step) or capture= yet: drop one of them")
    if details and logprobs:
        raise ValueError("return_details=True already holds the log-probabilities (.logprobs): drop return_logprobs")
    if not details:
        return None
    return Recorder(logits=bool(logits), top_logprobs=check_top_logprobs(top_logprobs, vocab))


def _continue(params: GPTParams, ids: Tensor, mask: Tensor | None, request: _Request, beams: dict[str, Any] | None,
              seed: Seed, cache: KVCache | None = None, record: Recorder | None = None
              ) -> tuple[Tensor, Tensor | None]:
    """The new ids `[rows, new]` after the (cropped) prompt, and their log-probabilities when requested."""
    window, mask = (ids, mask) if cache is not None else _crop_to_window(ids, mask, params.config.context_length)
    cfg = params.config
    if beams is not None:  # beam_search masks a trained vocabulary itself
        out = beam_search(params, window, pad_mask=mask, max_new_tokens=request.max_new_tokens,
                          eos_id=request.eos_id, n_tokens=cfg.n_tokens, cache_dtype=request.cache_dtype, **beams)
        return out[:, window.shape[1]:], None
    gens = None if request.options.greedy else row_generators(seed, ids.shape[0], params.device)
    steps = list(_token_steps(params, window, mask, request, gens, cache, record))
    if not steps:  # max_new_tokens=0 with details: the prefill only (its cache)
        return ids.new_zeros(ids.shape[0], 0), None
    new = torch.stack([t for t, _ in steps], dim=1)
    return new, (torch.stack([lp for _, lp in steps], dim=1) if request.logprobs else None)


@torch.no_grad()
def generate_tokens(params: GPTParams, ids: Tensor, *, max_new_tokens: int = 20, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                    min_p: float | None = None, no_repeat_ngram_size: int | None = None,
                    suppress: Sequence[int] | None = None, seed: Seed = None, eos: bool | int | None = None,
                    pad_mask: Tensor | None = None, device: torch.device | str | None = None, compile: bool = False,
                    edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None, return_logprobs: bool = False,
                    num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
                    num_return_sequences: int = 1, processors: Sequence[LogitsProcessor] | None = None,
                    cache: KVCache | None = None, return_details: bool = False, output_logits: bool = False,
                    top_logprobs: int | None = None, capture: str | Sequence[str] | None = None,
                    draft: GPTParams | PromptLookup | str | None = None, draft_tokens: int | None = None,
                    cache_dtype: torch.dtype | str | None = None) -> Any:
    """Continue each row of `ids` `[batch, seq]`: returns `[batch, seq + new]` (the prompt, then the new ids).

    `new` is `max_new_tokens`, or fewer when every row has produced `eos` (an id; True means `<|endoftext|>`);
    after its EOS a row is filled with the EOS id. `pad_mask` (False on left padding) lets rows differ in length.
    `return_logprobs=True` returns `(ids, logprobs [batch, new])` as well. With `num_beams > 1` the rows are
    `[batch * num_return_sequences, seq + new]`, each prompt's best hypotheses first. Options as in :func:`generate`
    (`processors`, `return_details`, `output_logits`, `top_logprobs`, `cache_dtype` included); `cache=` (a
    `Generation`'s cache): `ids` are the tokens that follow the cached ones, and the result equals generating from
    the whole sequence.

    `capture=[sites]` (names or patterns, as in `gpt2fn.study.forward_with`) returns `(ids, acts)` (or
    `(ids, logprobs, acts)`): `acts[site]` holds every position of the returned ids along the site's sequence
    axis, the prompt's from the prefill and one per new token (the last one is run through the model too), and
    equals `forward_with(params, ids, capture=sites, edit=edit, pad_mask=mask)[1]` up to float rounding, where
    `mask` is `pad_mask` followed by True for the new tokens. See :func:`generate` for what each position holds.
    """
    params = _prepare(params, device)
    request = _request(params, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos, min_p=min_p,
                       no_repeat_ngram_size=no_repeat_ngram_size, suppress=suppress, edit=edit, compile=compile,
                       logprobs=return_logprobs or return_details, processors=processors, capture=capture,
                       draft=draft, draft_tokens=draft_tokens, cache_dtype=cache_dtype)
    beams = _check_beams(request, num_beams, length_penalty, early_stopping, num_return_sequences)
    record = _recorder(request, beams, cache, details=return_details, logits=output_logits,
                       top_logprobs=top_logprobs, logprobs=return_logprobs, vocab=params.config.vocab_size)
    _check_seed(seed)
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a torch.Tensor of token ids [batch, seq], got {type(ids).__name__}; "
                        "for text use gpt2fn.generate")
    ids = ids.to(params.device)
    pad_mask = None if pad_mask is None else pad_mask.to(params.device)
    check_prompt_ids(ids, pad_mask, params.config.n_tokens)
    if request.max_new_tokens == 0 and record is None:
        out, logprobs = ids, torch.zeros(ids.shape[0], 0)
        if request.capture:  # nothing is generated: the captures are the prompt's own forward
            from .study.run import forward_with

            acts = forward_with(params, ids, capture=capture, edit=edit, pad_mask=pad_mask)[1]
    else:
        new, logprobs = _continue(params, ids, pad_mask, request, beams, seed, cache, record)
        if record is not None:
            return record.result(request.eos_id, ids.shape[0])
        prompt = ids if beams is None else ids.repeat_interleave(beams["num_return_sequences"], dim=0)
        out = torch.cat([prompt, new], dim=1)
        if request.capture:
            acts = request.edit.stacked()
    if request.capture:
        return (out, logprobs, acts) if return_logprobs else (out, acts)
    return (out, logprobs) if return_logprobs else out


# ---------------------------------------------------------------------------------------------------------------
# Text level


class TextStream:
    """Token ids -> text pieces for one row: never splits a multi-byte UTF-8 character, and holds back any text
    that might be the start of a stop string, so the pieces concatenate to exactly the final text."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._bytes = tokenizer().decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._pending = ""
        self.done = False

    def push(self, token: int) -> str:
        """Text that is now final after `token` (possibly empty); sets `done` when a stop string appears."""
        if self.done:
            return ""
        self._pending += self._utf8.decode(self._bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once no more tokens will come."""
        if self.done:
            return ""
        self._pending += self._utf8.decode(b"", final=True)
        out = self._release(final=True)
        self.done = True
        return out

    def _release(self, *, final: bool) -> str:
        text = self._pending
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.done, self._pending = True, ""
            return text[:min(hits)]
        hold = 0 if final else max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                   default=0)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold]


def _check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if not isinstance(stop, (str, Sequence)) or isinstance(stop, (bytes, bytearray)):
        raise TypeError(f"stop must be a string or a list of strings; got {type(stop).__name__} {stop!r}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them; got {stop!r}")
    return stops


def _check_seed(seed: Seed) -> None:
    """The seed's type, checked even when decoding is greedy and the seed is not used."""
    if not (seed is None or isinstance(seed, torch.Generator) or (isinstance(seed, int) and not isinstance(seed, bool))
            or (isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)))):
        raise TypeError(f"seed must be an int, a torch.Generator, one per row, or None; got {type(seed).__name__} "
                        f"{seed!r:.40}")


def _encode_prompts(prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, (bytes, bytearray)):
            raise TypeError(f"prompt {i} is bytes; pass text: prompt.decode('utf-8')")
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__} {p!r:.40}")
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one character (to generate unconditionally, "
                             "start from '<|endoftext|>')")
        rows.append(encode(p, allow_special=True))
    return rows


def _text_rows(params: GPTParams, prompts: Sequence[str], request: _Request, *, seed: Seed,
               stop: str | Sequence[str] | None, beams: dict[str, Any] | None = None, cache: KVCache | None = None,
               record: Recorder | None = None) -> Iterator[tuple[int, str, float | None]]:
    """Yield `(row, text piece, log-probability of the piece's token or None)` as pieces become final, for every
    row (`len(prompts) * num_return_sequences` rows with beams). `record` (details) learns where each row stopped."""
    _check_seed(seed)
    stops = _check_stop(stop)
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    ids, mask = left_pad(_encode_prompts(prompts, params.config.n_tokens), device=params.device)
    check_prompt_ids(ids, mask, params.config.n_tokens)
    n_rows = len(prompts) * (1 if beams is None else beams["num_return_sequences"])
    rows = [TextStream(stops) for _ in range(n_rows)]
    if request.max_new_tokens > 0 or record is not None or request.capture:
        if beams is not None:
            steps: Iterator[tuple[Tensor, Tensor | None]] = iter(
                [(t, None) for t in _continue(params, ids, mask, request, beams, seed)[0].T])
        else:
            window, wmask = (ids, mask) if cache is not None else _crop_to_window(ids, mask,
                                                                                  params.config.context_length)
            gens = None if request.options.greedy else row_generators(seed, ids.shape[0], params.device)
            steps = _token_steps(params, window, wmask, request, gens, cache, record)
        try:
            for tok, logprob in steps:
                lps = None if logprob is None else logprob.tolist()
                for i, t in enumerate(tok.tolist()):
                    if rows[i].done:
                        continue
                    piece = rows[i].finish() if t == request.eos_id else rows[i].push(t)
                    if record is not None and rows[i].done:
                        record.stop_row(i, "eos" if t == request.eos_id else "stop")
                    yield i, piece, None if lps is None else lps[i]
                if all(r.done for r in rows) and not request.capture:  # captures run on to the ids' end
                    break
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()
    for i, r in enumerate(rows):
        piece = r.finish()
        if piece:
            yield i, piece, None


def generate(params: GPTParams, prompt: str | Sequence[str], *, max_new_tokens: int = 20, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             min_p: float | None = None, no_repeat_ngram_size: int | None = None,
             suppress: Sequence[int] | None = None, seed: Seed = None, stop: str | Sequence[str] | None = None,
             eos: bool | int | None = True, device: torch.device | str | None = None, compile: bool = False,
             edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None, return_logprobs: bool = False,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             num_return_sequences: int = 1, processors: Sequence[LogitsProcessor] | None = None,
             cache: KVCache | None = None, return_details: bool = False, output_logits: bool = False,
             top_logprobs: int | None = None, capture: str | Sequence[str] | None = None,
             draft: GPTParams | PromptLookup | str | None = None, draft_tokens: int | None = None,
             cache_dtype: torch.dtype | str | None = None) -> Any:
    """The model's continuation of `prompt` (without the prompt); a list of prompts gives a list of continuations.

    - `temperature=0` (default) is greedy; above 0 it samples, optionally from the `top_k` most likely ids,
      the nucleus of mass `top_p` and/or the ids with at least `min_p` times the top probability.
      `repetition_penalty > 1` discourages ids already in the row; `no_repeat_ngram_size=n` never repeats an
      n-gram of the row; `suppress` lists ids never produced (each as the `transformers` processor of that name).
    - `seed`: an int (row `i` draws with `seed + i`), a `torch.Generator` (one prompt), or one per row; None
      draws a fresh seed. The same seed gives the same text, whatever else is in the batch.
    - Each row stops at `<|endoftext|>` (`eos=True`; or an id; False: never), at the first `stop` string (not
      included in the text), or after `max_new_tokens`.
    - `device`: where to run (params are moved if elsewhere); None runs where the params are.
    - `compile`: run the one-token steps through `torch.compile` (`gpt2fn.step.compiled_decode_step`): the
      same tokens; the first call compiles (seconds), later ones reuse the graph. With `edit=` the steps run
      through `compiled_decode_step_at` (the edit tap and the step's positions are arguments): one graph, no
      break, for steer/patch/ablate edits. A new edit reuses the graph when only its tensors' values differ
      (steering vectors and scales, patch sources: graph inputs) and is traced again when its sites, functions'
      kind, positions, heads or tensor shapes differ (those are guarded).
    - `edit={site: fn}`: the edits of `gpt2fn.study` (`steer`, `patch`, `ablate_head`, any `fn(value) -> value`)
      applied at the prefill and at every step; `positions=` of an edit are absolute positions in the sequence.
    - `return_logprobs=True`: returns `(text, logprobs)`, the model's log-probability (log_softmax of its logits,
      before sampling filters) of each token the row produced (a list per prompt for a list of prompts).
    - `num_beams > 1`: beam search as `transformers`' `generate(num_beams=, do_sample=False)`, with
      `length_penalty`, `early_stopping` and `num_return_sequences` (then each prompt gives a list of texts).
    - `processors=[fn, ...]`: rules `fn(logits, ids) -> logits` applied after the built-in filters, in order
      (`gpt2fn.processors`: `bad_words`, `sequence_bias`, `min_new_tokens`, `forced_eos_at_max`, the built-ins).
    - `return_details=True`: returns a `gpt2fn.Generation` (texts, ids, log-probs, stop reasons, the final cache;
      `output_logits=True` adds each step's logits, `top_logprobs=k` the k most likely ids): see `gpt2fn.details`.
    - `cache=`: a `Generation`'s cache; `prompt` is then the text that follows it (one string per cached row), and
      the rows continue as if prefilled from the cached tokens and `encode(prompt)` (no second prefill). The
      cache is not consumed; it grows (a copy) when it lacks room. Penalties and processors see this call's ids.
    - `capture=[sites]` (names or patterns of `gpt2fn.study`): returns `(text, acts)` (`(text, logprobs, acts)`
      with `return_logprobs`), the activations of every position, stacked along each site's sequence axis,
      with a batch axis of one row per prompt (one for a single prompt). Position `j` is token `j` of the ids
      `generate_tokens(params, ids, pad_mask=mask, capture=...)` returns for `ids, mask = left_pad(prompts'
      tokens)`: the left-padded prompt (from the prefill), then one position per new token; the last new token
      is run through the model too, so `acts` equal `forward_with(params, those ids, capture=, edit=,
      pad_mask=)` at every position (`tests/test_generate_capture.py`). With a capture the batch runs until
      every row has its EOS or `max_new_tokens` (a stop string ends a row's text, not its tokens), so a row's
      positions after its EOS hold the run over the EOS fill, and positions of left padding hold what that
      forward gives there (the pad token at position 0, seeing only itself): mask them with the pad mask.
      Edits apply as without a capture, and captured sites hold the edited values. The whole sequence must fit
      the context window (past it generation slides: refused); capture does not combine with `compile=True`
      or beams. :func:`stream` does not capture.
    - `draft=draft_params` (a smaller model with the same vocabulary), `draft="prompt_lookup"` or
      `draft=PromptLookup(max_ngram=, min_ngram=)`: speculative decoding (`gpt2fn.speculative`), `draft_tokens`
      proposals (default 4) checked per target step. Greedy text is the target's own; sampled text has the
      target's distribution. The prompt plus `max_new_tokens` must fit the context (the window does not slide).
    - `cache_dtype="bf16"` or `"fp16"` (or a torch dtype): the KV cache stores keys and values in 16 bits, half its
      memory (GPT-2 XL at batch 8 over 1024 positions: 2.5 GB instead of 5), rounded as they are written;
      attention and its softmax stay in the activations' dtype. None (default): the activations' dtype, fp32 on
      CPU. A `cache=` continuation takes the `cache_dtype` of the call that made it.
    """
    single = isinstance(prompt, str)
    if not single and (isinstance(prompt, (bytes, bytearray)) or not hasattr(prompt, "__iter__")):
        raise TypeError(f"prompt must be a string or a list of strings; got {type(prompt).__name__} "
                        f"{prompt!r:.40}" + (" (decode bytes first: prompt.decode('utf-8'))"
                                              if isinstance(prompt, (bytes, bytearray)) else ""))
    _check_seed(seed)
    prompts = [prompt] if single else list(prompt)
    params = _prepare(params, device)
    request = _request(params, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos, min_p=min_p,
                       no_repeat_ngram_size=no_repeat_ngram_size, suppress=suppress, edit=edit, compile=compile,
                       logprobs=return_logprobs or return_details, processors=processors, capture=capture,
                       draft=draft, draft_tokens=draft_tokens, cache_dtype=cache_dtype)
    beams = _check_beams(request, num_beams, length_penalty, early_stopping, num_return_sequences)
    record = _recorder(request, beams, cache, details=return_details, logits=output_logits,
                       top_logprobs=top_logprobs, logprobs=return_logprobs, vocab=params.config.vocab_size)
    per = 1 if beams is None else beams["num_return_sequences"]
    texts = [""] * (len(prompts) * per)
    logprobs: list[list[float]] = [[] for _ in texts]
    with torch.no_grad():
        for i, piece, lp in _text_rows(params, prompts, request, seed=seed, stop=stop, beams=beams, cache=cache,
                                       record=record):
            texts[i] += piece
            if lp is not None:
                logprobs[i].append(lp)
    if record is not None:
        return record.result(request.eos_id, len(prompts), tuple(texts))
    out: Any = texts if per == 1 else [texts[i * per:(i + 1) * per] for i in range(len(prompts))]
    lps: Any = logprobs
    if single:
        out, lps = out[0], logprobs[0]
    if request.capture:
        acts = request.edit.stacked()
        return (out, lps, acts) if return_logprobs else (out, acts)
    return (out, lps) if return_logprobs else out


def stream(params: GPTParams, prompt: str, *, max_new_tokens: int = 20, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
           min_p: float | None = None, no_repeat_ngram_size: int | None = None,
           suppress: Sequence[int] | None = None, seed: Seed = None, stop: str | Sequence[str] | None = None,
           eos: bool | int | None = True, device: torch.device | str | None = None, compile: bool = False,
           edit: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
           processors: Sequence[LogitsProcessor] | None = None, cache: KVCache | None = None,
           capture: str | Sequence[str] | None = None, draft: GPTParams | PromptLookup | str | None = None,
           draft_tokens: int | None = None, cache_dtype: torch.dtype | str | None = None) -> Iterator[str]:
    """Like :func:`generate` for one prompt, yielding text pieces as soon as they are final. The pieces
    concatenate to `generate`'s text; a multi-byte UTF-8 character is never split between two pieces.
    `processors`, `cache`, `draft` and `cache_dtype` as in :func:`generate`.

    `capture=` is refused (a ValueError when the first piece is asked for): a stream yields text only, and a
    piece is not a position (a piece may hold several tokens or wait for the next). Capture with
    `generate(..., capture=)` or `generate_tokens(..., capture=)`, which return the activations of every
    position beside the text or ids."""
    if capture:
        raise ValueError("stream yields text pieces only and does not capture activations; use "
                         "gpt2fn.generate(..., capture=sites) or gpt2fn.generate_tokens(..., capture=sites), which "
                         "return them beside the text or ids")
    _check_seed(seed)
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}; use generate for a batch")
    params = _prepare(params, device)
    request = _request(params, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos, min_p=min_p,
                       no_repeat_ngram_size=no_repeat_ngram_size, suppress=suppress, edit=edit, compile=compile,
                       processors=processors, draft=draft, draft_tokens=draft_tokens, cache_dtype=cache_dtype)
    _recorder(request, None, cache, details=False, logits=False, top_logprobs=None, logprobs=False,
              vocab=params.config.vocab_size)  # checks cache=
    with torch.no_grad():
        for _, piece, _ in _text_rows(params, [prompt], request, seed=seed, stop=stop, cache=cache):
            if piece:
                yield piece

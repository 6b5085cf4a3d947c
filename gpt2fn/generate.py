"""Autoregressive generation: `generate` (text -> text), `generate_tokens` (ids -> ids), `stream` (text pieces).

Data flow: text -> tokenizer.encode -> left-padded ids + mask -> prefill `forward(..., cache)` once -> one
`forward` per new token on the cache -> `gpt2fn.sampling.next_token` -> ids -> incremental UTF-8 decode -> text.

- The cache is preallocated to `prompt + max_new_tokens` positions (at most the context length) and filled in
  place (see `gpt2fn.cache`); a decode step does no work that grows with the sequence beyond attention itself.
- Batches of prompts of different lengths are left-padded; positions are counted from the mask, so a row's
  tokens are those of the same prompt run alone (sampling included: row `i` has its own generator).
- Past the context window the sequence slides: when the cache is full, the last `context_length - slide`
  tokens are prefilled again (`slide = max(1, context_length // 8)`), so each token sees between
  `context_length - slide` and `context_length` tokens of context. A prompt longer than the window is cropped
  from the left with a warning, like the seed's loop.
- Decode-time layout (a derived value, never a leaf of `params`): on CPU in fp32 a tied head is read through a
  transposed `[d_model, vocab]` copy, because torch reads `x @ W` weights about twice as fast as `x @ W.T`
  (see `decode_params`). Shape checks run on the prefill and the first decode step, then step aside: on
  every step they would cost more than half again the step's time for GPT-2 124M.
"""

import codecs
import dataclasses
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .cache import init_cache
from .model import forward, trained_vocab_index
from .params import GPTParams, tree_to
from .sampling import SamplingOptions, next_token, row_generators
from .shapes import checks_enabled, shape_checks
from .tokenizer import EOT, encode, tokenizer

__all__ = ["generate", "generate_tokens", "stream", "default_device", "decode_params", "left_pad"]

Seed = int | torch.Generator | Sequence[int | torch.Generator] | None


def default_device() -> torch.device:
    """The seed's order of preference: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def decode_params(params: GPTParams) -> GPTParams:
    """The same weights laid out for decoding on this device: a derived value, never a leaf of `params`.

    On CPU in fp32 a tied head becomes an untied `[d_model, vocab]` copy: `x @ W` streams GPT-2 124M's 154 MB
    head in about half the time of `x @ tok_emb.T` (PERF-NOTES: 11 -> 5.4 ms per token). The copy costs about a
    tenth of a second, so the last one made is kept while its `tok_emb` lives and is unchanged (one slot; see
    `_transposed`). In bf16 and on accelerators the `[vocab, d_model]` orientation is as fast: no copy.
    """
    if params.head is not None or params.device.type != "cpu" or params.dtype != torch.float32:
        return params
    head = _transposed(params.tok_emb)
    return params.replace(head=head, config=params.config.replace(tie_head=False))


_LAST_HEAD: dict[str, Any] = {}


def _transposed(tok_emb: Tensor) -> Tensor:
    """`tok_emb.T` as a contiguous copy, remembered for the same (unmodified, still alive) tensor."""
    slot = _LAST_HEAD.get("slot")
    if slot is not None and slot[0]() is tok_emb and slot[1] == tok_emb._version:
        return slot[2]
    _LAST_HEAD.clear()  # free the previous copy before making a new one
    head = tok_emb.detach().T.contiguous()
    _LAST_HEAD["slot"] = (weakref.ref(tok_emb, lambda _: _LAST_HEAD.clear()), tok_emb._version, head)
    return head


# ---------------------------------------------------------------------------------------------------------------
# Token level


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int = 0, device: torch.device | str | None = None
             ) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths as `(ids [batch, longest], mask)`, padded on the left (mask False there)."""
    if not rows:
        raise ValueError("no prompts given: pass at least one")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, longest - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, longest - len(r):] = True
    return ids.to(device), mask.to(device)


@dataclasses.dataclass(frozen=True)
class _Request:
    max_new_tokens: int
    options: SamplingOptions
    eos_id: int | None


def _request(params: GPTParams, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
             repetition_penalty: float | None, eos: bool | int | None) -> _Request:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty)
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
    return _Request(max_new_tokens, options, eos_id)


def _check_prompt_ids(ids: Tensor, mask: Tensor | None, n_tokens: int) -> None:
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor [batch, seq]; got {ids.dtype} of shape {list(ids.shape)}. "
                         "For one sequence pass ids[None].")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"ids of shape {list(ids.shape)} hold no prompt; pass at least one token per row")
    if mask is not None:
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be a bool tensor of the ids' shape {list(ids.shape)}; got "
                             f"{mask.dtype} {list(mask.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("pad_mask must be True on each row's last position: pad on the left, not the right")
    real = ids if mask is None else ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= n_tokens):
        raise ValueError(f"prompt token ids must be in [0, {n_tokens}) for this model; got ids from {int(real.min())}"
                         f" to {int(real.max())}. Was the model trained with a different tokenizer?")


def _crop_to_window(ids: Tensor, mask: Tensor | None, ctx: int) -> tuple[Tensor, Tensor | None]:
    if ids.shape[1] <= ctx:
        return ids, mask
    longest = ids.shape[1] if mask is None else int(mask.sum(1).max())
    if longest > ctx:
        warnings.warn(f"prompt of {longest} tokens is longer than the context window of {ctx}; keeping the last "
                      f"{ctx} tokens", stacklevel=4)
    return ids[:, -ctx:], None if mask is None else mask[:, -ctx:]


def _token_steps(params: GPTParams, ids: Tensor, mask: Tensor | None, request: _Request,
                 generators: list[torch.Generator] | None) -> Iterator[Tensor]:
    """Yield the next token of every row (`[batch]`), step by step; finished rows (EOS) repeat the EOS id."""
    cfg, opts = params.config, request.options
    (batch, prompt_len), ctx = ids.shape, cfg.context_length
    keep = ctx - max(1, ctx // 8)  # tokens kept when the window slides
    if mask is not None and bool(mask.all()):
        mask = None  # nothing is padded: the unmasked path is faster
    cache = init_cache(cfg, batch, min(ctx, prompt_len + request.max_new_tokens), device=ids.device,
                       dtype=params.dtype, padded=mask is not None)
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

    logits, cache = forward(params, ids, cache=cache, pad_mask=mask, last_only=True)
    positions = None if mask is None else mask.sum(1, keepdim=True)
    checking = checks_enabled()  # the caller's setting for the prefill and the first step; then off (speed)
    for step in range(request.max_new_tokens):
        with shape_checks(checking):
            tok = next_token(logits[:, -1], opts, n_tokens=cfg.n_tokens, generators=generators, seen=seen,
                             allowed=allowed)
        if request.eos_id is not None:
            tok = tok.masked_fill(done, request.eos_id)
            done = done | (tok == request.eos_id)
        yield tok
        end = prompt_len + step + 1
        if step == request.max_new_tokens - 1 or (request.eos_id is not None and bool(done.all())):
            return
        history[:, end - 1] = tok
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if cache.length == cache.capacity:  # the window slides: prefill the last `keep` tokens again
            window_mask = None if real is None else real[:, end - keep:end]
            logits, cache = forward(params, history[:, end - keep:end], cache=dataclasses.replace(cache, length=0),
                                    pad_mask=window_mask, last_only=True)
            positions = None if window_mask is None else window_mask.sum(1, keepdim=True)
            continue
        with shape_checks(checking):
            logits, cache = forward(params, tok[:, None], cache=cache, positions=positions, last_only=True)
        checking = False
        if positions is not None:
            positions = positions + 1


def _prepare(params: GPTParams, device: torch.device | str | None) -> GPTParams:
    if not isinstance(params, GPTParams):
        raise TypeError(f"params must be a GPTParams tree (from gpt2fn.load or init_params), got "
                        f"{type(params).__name__}")
    if device is not None:
        from .checkpoints import CheckpointError, parse_device

        try:
            device = parse_device(device)
        except CheckpointError as exc:  # the same check as load's, reported as a bad argument here
            raise ValueError(str(exc)) from None
        if device != params.device:
            params = tree_to(params, device=device)
    return params


@torch.no_grad()
def generate_tokens(params: GPTParams, ids: Tensor, *, max_new_tokens: int = 20, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                    seed: Seed = None, eos: bool | int | None = None, pad_mask: Tensor | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Continue each row of `ids` `[batch, seq]`: returns `[batch, seq + new]` (the prompt, then the new ids).

    `new` is `max_new_tokens`, or fewer when every row has produced `eos` (an id; True means `<|endoftext|>`);
    after its EOS a row is filled with the EOS id. `pad_mask` (False on left padding) lets rows differ in length.
    Options as in :func:`generate`.
    """
    params = decode_params(_prepare(params, device))
    request = _request(params, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos)
    ids = ids.to(params.device)
    pad_mask = None if pad_mask is None else pad_mask.to(params.device)
    _check_prompt_ids(ids, pad_mask, params.config.n_tokens)
    if request.max_new_tokens == 0:
        return ids
    window, mask = _crop_to_window(ids, pad_mask, params.config.context_length)
    gens = None if request.options.greedy else row_generators(seed, ids.shape[0], params.device)
    new = list(_token_steps(params, window, mask, request, gens))
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1)


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


def _text_steps(params: GPTParams, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, repetition_penalty: float | None, seed: Seed,
                stop: str | Sequence[str] | None, eos: bool | int | None, device: torch.device | str | None
                ) -> Iterator[tuple[int, str]]:
    """Yield `(row, text piece)` as pieces become final, for every row of a batch of prompts."""
    params = decode_params(_prepare(params, device))
    request = _request(params, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos)
    stops = _check_stop(stop)
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    ids, mask = left_pad(_encode_prompts(prompts, params.config.n_tokens), device=params.device)
    _check_prompt_ids(ids, mask, params.config.n_tokens)
    rows = [TextStream(stops) for _ in prompts]
    if request.max_new_tokens > 0:
        window, mask = _crop_to_window(ids, mask, params.config.context_length)
        gens = None if request.options.greedy else row_generators(seed, ids.shape[0], params.device)
        steps = _token_steps(params, window, mask, request, gens)
        try:
            for tok in steps:
                for i, t in enumerate(tok.tolist()):
                    if rows[i].done:
                        continue
                    if t == request.eos_id:
                        piece = rows[i].finish()
                    else:
                        piece = rows[i].push(t)
                    if piece:
                        yield i, piece
                if all(r.done for r in rows):
                    break
        finally:
            steps.close()
    for i, r in enumerate(rows):
        piece = r.finish()
        if piece:
            yield i, piece


def generate(params: GPTParams, prompt: str | Sequence[str], *, max_new_tokens: int = 20, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             seed: Seed = None, stop: str | Sequence[str] | None = None, eos: bool | int | None = True,
             device: torch.device | str | None = None) -> str | list[str]:
    """The model's continuation of `prompt` (without the prompt); a list of prompts gives a list of continuations.

    - `temperature=0` (default) is greedy; above 0 it samples, optionally from the `top_k` most likely ids
      and/or the nucleus of mass `top_p`. `repetition_penalty > 1` discourages ids already in the row.
    - `seed`: an int (row `i` draws with `seed + i`), a `torch.Generator` (one prompt), or one per row; None
      draws a fresh seed. The same seed gives the same text, whatever else is in the batch.
    - Each row stops at `<|endoftext|>` (`eos=True`; or an id; False: never), at the first `stop` string (not
      included in the text), or after `max_new_tokens`.
    - `device`: where to run (params are moved if elsewhere); None runs where the params are.
    """
    single = isinstance(prompt, str)
    if not single and (isinstance(prompt, (bytes, bytearray)) or not hasattr(prompt, "__iter__")):
        raise TypeError(f"prompt must be a string or a list of strings; got {type(prompt).__name__} "
                        f"{prompt!r:.40}" + (" (decode bytes first: prompt.decode('utf-8'))"
                                              if isinstance(prompt, (bytes, bytearray)) else ""))
    _check_seed(seed)
    prompts = [prompt] if single else list(prompt)
    texts = [""] * len(prompts)
    with torch.no_grad():
        for i, piece in _text_steps(params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                    stop=stop, eos=eos, device=device):
            texts[i] += piece
    return texts[0] if single else texts


def stream(params: GPTParams, prompt: str, *, max_new_tokens: int = 20, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
           seed: Seed = None, stop: str | Sequence[str] | None = None, eos: bool | int | None = True,
           device: torch.device | str | None = None) -> Iterator[str]:
    """Like :func:`generate` for one prompt, yielding text pieces as soon as they are final. The pieces
    concatenate to `generate`'s text; a multi-byte UTF-8 character is never split between two pieces."""
    _check_seed(seed)
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}; use generate for a batch")
    with torch.no_grad():
        for _, piece in _text_steps(params, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                    stop=stop, eos=eos, device=device):
            yield piece

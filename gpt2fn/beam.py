"""Beam search over the pure cache: `beam_search(params, ids, num_beams=k, ...) -> ids`, the hypotheses of
`transformers`' `generate(num_beams=k, do_sample=False)`.

    prompt [batch, seq] --prefill once--> cache of `batch` rows --select_rows--> `batch * k` rows (one per beam)
    each step: log_softmax -> + beam score -> top 2k of (k beams x vocab) -> candidates ending in EOS (among the
    first k) join the finished hypotheses (score / generated_length ** length_penalty, the best k kept); the best k
    others are the next beams -> `select_rows` reorders the cache to them -> one `decode_step` for their tokens

- The search is transformers' (v4.50+ vectorised `_beam_search`), step for step: the same candidate count (2k),
  the same length (new tokens only, EOS included), the same early-stopping heuristic (`early_stopping=False`: stop
  once the best running beam, scored at the current length, cannot beat the worst of k finished ones; `True`: stop
  once k hypotheses are finished; `"never"`: with `length_penalty > 0` score the best running beam at
  `max_new_tokens`) and the same sentinel arithmetic (-1e9), so ties and float rounding follow the same path.
- Beams are rows of the cache. `select_rows` copies, so the reordered cache is owned here and donated to the step.
- `num_beams=1` is a beam search with one beam (an EOS candidate finishes a hypothesis while the search goes on
  with the next best token); transformers runs greedy decoding for `num_beams=1` instead.
"""

import math

import torch
from torch import Tensor

from .cache import check_cache_dtype, init_cache, select_rows
from .checks import check_prompt_ids
from .model import trained_vocab_index
from .params import GPTParams, check_params
from .sampling import mask_vocab
from .shapes import checks_enabled, shape_checks
from .step import decode_step

__all__ = ["beam_search"]

_NEG = -1.0e9  # transformers' sentinel for "not a candidate here"


def check_beam_options(num_beams: int, num_return_sequences: int, length_penalty: float,
                        early_stopping: bool | str, max_new_tokens: int) -> None:
    """Raise a ValueError naming the first beam-search option outside its range (`generate` checks with it too)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if (isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int)
            or not 1 <= num_return_sequences <= num_beams):
        raise ValueError(f"num_return_sequences must be an integer in [1, num_beams={num_beams}], got "
                         f"{num_return_sequences!r}; raise num_beams to return more hypotheses")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, int | float) or not math.isfinite(
            length_penalty):
        raise ValueError(f"length_penalty must be a finite number (the exponent of the generated length; 1.0 is "
                         f"the average log-probability, 0 the plain sum), got {length_penalty!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """Rows `index` `[batch, n]` of `t` `[batch, beams, ...]` along the beam axis (transformers' `_gather_beams`)."""
    while index.ndim < t.ndim:
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(params: GPTParams, ids: Tensor, *, pad_mask: Tensor | None = None, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, eos_id: int | None = None, n_tokens: int | None = None,
                allowed: Tensor | None = None, cache_dtype: torch.dtype | str | None = None) -> Tensor:
    """The `num_return_sequences` best hypotheses of a beam search with `num_beams` beams, for every row of `ids`
    `[batch, seq]` (left padded where `pad_mask` is False): `[batch * num_return_sequences, seq + new]`, rows
    `i * num_return_sequences + j` for prompt `i`, best first.

    - A hypothesis's score is its summed log-probability divided by `new_length ** length_penalty`, where
      `new_length` counts its generated tokens (EOS included): `length_penalty > 0` favours longer ones.
    - `eos_id`: the token that finishes a hypothesis (None: every hypothesis runs `max_new_tokens`). `new` is the
      longest returned hypothesis; shorter ones are filled with `eos_id` after their EOS (what transformers
      returns with `pad_token_id=eos_token_id`).
    - `early_stopping`: False (transformers' default heuristic), True (stop once `num_beams` hypotheses are
      finished) or "never" (see the module docstring).
    - `n_tokens`: ids `>= n_tokens` are never produced (default `params.config.n_tokens`); `allowed` `[vocab]`
      bool, when given, restricts the ids further (default: a corpus-trained model's own vocabulary).
    - The prompt plus `max_new_tokens` must fit in the context window (no sliding window for beams).
    """
    check_params(params)
    check_beam_options(num_beams, num_return_sequences, length_penalty, early_stopping, max_new_tokens)
    cfg = params.config
    n_tokens = cfg.n_tokens if n_tokens is None else n_tokens
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < n_tokens):
        raise ValueError(f"eos_id must be None or a token id in [0, {n_tokens}), got {eos_id!r}")
    ids = ids.to(params.device)
    pad_mask = None if pad_mask is None else pad_mask.to(params.device)
    check_prompt_ids(ids, pad_mask, n_tokens)
    (batch, prompt), k = ids.shape, num_beams
    if max_new_tokens == 0:
        return ids.repeat_interleave(num_return_sequences, dim=0)
    if prompt + max_new_tokens > cfg.context_length:
        raise ValueError(f"beam search needs prompt ({prompt}) + max_new_tokens ({max_new_tokens}) <= context_length "
                         f"({cfg.context_length}); shorten the prompt or ask for fewer tokens")
    if allowed is None and cfg.trained_vocab is not None:
        allowed = trained_vocab_index(cfg, ids.device)[1] >= 0
    if pad_mask is not None and bool(pad_mask.all()):
        pad_mask = None
    dev, total = ids.device, prompt + max_new_tokens
    fill = 0 if eos_id is None else eos_id  # after EOS; without EOS every hypothesis has the full length

    # transformers' static-shaped state: running beams, finished hypotheses (best first), per-prompt flags
    to_keep = 2 * k  # one EOS id: at least k candidates of the 2k are not finished
    first_k = torch.arange(to_keep, device=dev) < k
    running = torch.full((batch, k, total), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt] = ids[:, None]
    running_scores = torch.zeros(batch, k, device=dev)
    running_scores[:, 1:] = _NEG  # only the first beam's candidates at the first step: no duplicate beams
    done_seqs, done_scores = running.clone(), torch.full((batch, k), _NEG, device=dev)
    done_lens = torch.zeros(batch, k, dtype=torch.long, device=dev)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=dev)
    offsets = torch.arange(batch, device=dev)[:, None] * k

    checking = checks_enabled()
    cache = init_cache(cfg, batch, max(1, total - 1), device=dev,
                       dtype=check_cache_dtype(cache_dtype) or params.compute_dtype)
    logits, cache = decode_step(params, cache, ids, pad_mask=pad_mask, donate=True, last_only=True)
    cache = select_rows(cache, torch.arange(batch, device=dev).repeat_interleave(k))
    logits = logits[:, -1].repeat_interleave(k, dim=0)
    for step in range(max_new_tokens):
        cur = prompt + step  # where this step's token goes
        logp = torch.log_softmax(mask_vocab(logits.float(), n_tokens, allowed), dim=-1)
        vocab = logp.shape[-1]
        scores = (logp.view(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        top_scores, top_index = torch.topk(scores, k=to_keep)
        src, tok = top_index // vocab, top_index % vocab
        top_seqs = _gather(running, src)
        top_seqs[:, :, cur] = tok
        if cur + 1 >= total:
            hits = torch.ones_like(tok, dtype=torch.bool)
        elif eos_id is None:
            hits = torch.zeros_like(tok, dtype=torch.bool)
        else:
            hits = tok == eos_id

        # the next beams: the best k candidates that did not finish
        live_scores = top_scores + hits.to(torch.float32) * _NEG
        pick = torch.topk(live_scores, k=k)[1]
        running, running_scores, running_src = _gather(top_seqs, pick), _gather(live_scores, pick), _gather(src, pick)

        # finished hypotheses: merge those among the first k candidates, keep the best k
        just = hits & first_k[None, :]
        new_scores = top_scores / ((cur + 1 - prompt) ** length_penalty)
        new_scores = new_scores + (finished.all(-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * _NEG
        new_scores = new_scores + (~improvable).to(torch.float32) * _NEG
        new_scores = new_scores + (~just) * _NEG
        merged_scores = torch.cat([done_scores, new_scores], dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        done_seqs = _gather(torch.cat([done_seqs, top_seqs], dim=1), best)
        done_scores = _gather(merged_scores, best)
        done_lens = _gather(torch.cat([done_lens, torch.full_like(top_index, step + 1)], dim=1), best)
        finished = _gather(torch.cat([finished, just], dim=1), best)

        # can any prompt still improve? (transformers' `_check_early_stop_heuristic`)
        length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else step + 1
        best_running = running_scores[:, :1] / (length ** length_penalty)
        worst_done = torch.where(finished, done_scores.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(finished.all()) and early_stopping is True)
                and not bool(hits.all())):
            break

        rows = (running_src + offsets).flatten()
        if not torch.equal(rows, torch.arange(batch * k, device=dev)):
            cache = select_rows(cache, rows)  # a copy: ours to donate
        with shape_checks(checking):
            logits, cache = decode_step(params, cache, running[:, :, cur].reshape(batch * k, 1), donate=True,
                                        last_only=True)
        logits = logits[:, -1]
        checking = False

    returned = done_seqs[:, :num_return_sequences].reshape(batch * num_return_sequences, total)
    new = int(done_lens[:, :num_return_sequences].max())
    return returned[:, :prompt + new]

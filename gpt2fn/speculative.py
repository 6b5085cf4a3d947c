"""Speculative decoding: a cheap proposer guesses `k` tokens, the target checks them all in one multi-token step.

    round:  the draft proposes d1..dk (k one-token steps of a draft model, or an n-gram match: PromptLookup)
            the target runs [t0, d1..dk] in ONE decode_step -> its distributions p0..pk at those positions
            accept d1..dn (greedy: while d_j is the target's argmax; sampling: the rejection rule below),
            then one token of the target's own at position n (the correction, or a bonus when all k passed)
            both caches roll back past the first rejection (`gpt2fn.cache.rollback` with one count per row)

References: Leviathan, Kalman & Matias 2023 ("Fast Inference from Transformers via Speculative Decoding"), Chen et
al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"); prompt lookup: Saxena 2023 (`transformers`'
`prompt_lookup_num_tokens`).

- Greedy output is the target's own greedy output: every emitted token is the target's argmax after the same
  tokens (filters such as `repetition_penalty`, `no_repeat_ngram_size` and `suppress` included: they see each
  position's own history, drafted tokens included).
- Sampling keeps the target's distribution: `d ~ q` is kept with probability `min(1, p(d) / q(d))`; on rejection
  the token is drawn from `max(p - q, 0)` normalised; when every proposal passes, a bonus token is drawn from `p`.
  `p` and `q` are the filtered distributions (temperature, top_k, top_p, min_p, ... on both models' logits). A
  point-mass proposer (PromptLookup) is the case `q = one-hot`. Row `i` draws with its own generator and only as
  many times as its own proposals ask, so a row's tokens do not depend on the rest of the batch; they are not the
  same sample as plain sampling with that seed (the draws are used differently), only the same distribution.
- Batched rows accept different counts. The cache's slots are shared by the rows, so a row that accepts fewer
  tokens than another forgets its rejected slots by marking them invisible (`rollback(cache, n_per_row)`: the same
  mechanism as left padding); when the gaps fill a cache, it is rebuilt from the tokens by one prefill. Rows that
  end (EOS, or `max_new_tokens`) stop advancing and draw nothing more.
- `max_new_tokens` is exact: a row never proposes more tokens than it has left (k shrinks near the end).
- The window does not slide here: the prompt plus `max_new_tokens` must fit the context of both models, else a
  ValueError says so (plain decoding, without `draft=`, slides the window).
- Log-probabilities (`return_logprobs=True`) are the target's, as in plain decoding; after a row's EOS (where the
  row repeats EOS) they are 0.
- The draft predicts the same token ids (`config.n_tokens`); padded vocabularies may differ (only the first
  `n_tokens` ids are compared). Refused with a ValueError naming the fix: `num_beams > 1`, `edit=`,
  `compile=True` (the multi-token verification steps would each need their own graph).
"""

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .cache import KVCache, init_cache, rollback
from .model import trained_vocab_index
from .params import GPTParams, tree_to
from .sampling import SamplingOptions, filter_logits
from .shapes import checks_enabled, shape_checks
from .step import decode_step

__all__ = ["PromptLookup", "DEFAULT_DRAFT_TOKENS", "check_draft", "lookup_proposals", "speculative_steps"]

DEFAULT_DRAFT_TOKENS = 4
"""Tokens proposed per round when `draft_tokens` is not given: a small draft at a few times the target's speed
pays off at 3-5 (Leviathan et al., table 3); prompt lookup proposes as many as matched, up to this."""


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup decoding (Saxena 2023): the proposal is what followed the most recent earlier occurrence of
    the row's last n tokens (n from `max_ngram` down to `min_ngram`), in the prompt or the tokens generated so far.
    No second model; it pays off where the output copies its input (summaries, code edits, retrieval).
    `draft="prompt_lookup"` is `PromptLookup()`. transformers searches the earliest match instead of the latest."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PromptLookup {name} must be an integer >= 1, got {v!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"PromptLookup min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}")


Draft = GPTParams | PromptLookup


def check_draft(params: GPTParams, draft: Any, draft_tokens: Any, *, edit: bool = False, compile: bool = False
                ) -> tuple[Draft | None, int]:
    """`(draft, draft_tokens)` checked for the target `params`: None (plain decoding), a PromptLookup (the string
    "prompt_lookup" too), or a draft model's GPTParams with the target's token ids, moved to the target's device.
    A ValueError (TypeError for a wrong kind of draft) names the problem and the fix."""
    if draft is None:
        if draft_tokens is not None:
            raise ValueError("draft_tokens applies to speculative decoding: pass draft=draft_params (a small model "
                             "with the same vocabulary) or draft='prompt_lookup', or drop draft_tokens")
        return None, 0
    k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1 (tokens the draft proposes per target step), got "
                         f"{draft_tokens!r}")
    if edit:
        raise ValueError("edit= applies edits at every one-token step; speculative decoding checks several tokens "
                         "per step: drop edit= or draft=")
    if compile:
        raise ValueError("compile=True traces the one-token decode step; speculative decoding runs multi-token "
                         "verification steps of varying width: drop compile= or draft=")
    if isinstance(draft, str):
        if draft != "prompt_lookup":
            raise ValueError(f"draft must be a draft model's GPTParams, 'prompt_lookup' or a "
                             f"gpt2fn.speculative.PromptLookup(); got the string {draft!r}")
        return PromptLookup(), k
    if isinstance(draft, PromptLookup):
        return draft, k
    if not isinstance(draft, GPTParams):
        raise TypeError(f"draft must be a draft model's GPTParams (same vocabulary), 'prompt_lookup' or a "
                        f"gpt2fn.speculative.PromptLookup(); got {type(draft).__name__}")
    if draft.config.n_tokens != params.config.n_tokens:
        raise ValueError(f"the draft predicts {draft.config.n_tokens} token ids and the target "
                         f"{params.config.n_tokens}: speculative decoding needs one vocabulary (the same "
                         "tokenizer); use a draft trained on the target's tokens, or draft='prompt_lookup'")
    if draft.device != params.device:
        draft = tree_to(draft, device=params.device)
    return draft, k


def lookup_proposals(rows: Sequence[Tensor], k: int, lookup: PromptLookup) -> list[list[int]]:
    """For each row (its real tokens so far, 1-D), up to `k` tokens that followed the most recent earlier
    occurrence of its last n tokens (longest n first); an empty list where nothing matches."""
    out = []
    for row in rows:
        found: list[int] = []
        size = row.shape[0]
        for n in range(min(lookup.max_ngram, size - 1), lookup.min_ngram - 1, -1):
            windows = row[:size - 1].unfold(0, n, 1)  # every n-gram that starts before the tail itself
            hits = (windows == row[size - n:]).all(-1).nonzero()
            if hits.numel():
                start = int(hits[-1, 0]) + n
                found = row[start:start + k].tolist()
                break
        out.append(found)
    return out


def _span(seq: Tensor, real: Tensor, start: Tensor, end: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Each row's tokens `seq[i, start[i]:end[i]]`, right-aligned in `width` columns: `(ids, mask)`, the mask
    False on the filler to their left and on left padding."""
    idx = end[:, None] - width + torch.arange(width, device=seq.device)
    inside = idx >= start[:, None]
    idx = idx.clamp(min=0)
    return seq.gather(1, idx), inside & real.gather(1, idx)


def _refill(params: GPTParams, cache: KVCache, seq: Tensor, real: Tensor, end: Tensor, active: Tensor) -> KVCache:
    """The cache emptied and refilled with each active row's tokens `seq[i, :end[i]]` by one prefill (closing the
    gaps that rejected proposals left); inactive rows get padding only."""
    cache = rollback(cache, 0)
    end = torch.where(active, end, 0)
    width = int(end.max())
    if width == 0:
        return cache
    ids, mask = _span(seq, real, torch.zeros_like(end), end, width)
    return decode_step(params, cache, ids, pad_mask=mask, donate=True, last_only=True)[1]


@dataclasses.dataclass
class _Scores:
    """The filtered scores (`gpt2fn.sampling.filter_logits`, over the first `n_tokens` ids) of rows whose
    histories end at different places: row `i`'s history is `seq[i, :end[i]]`, right-aligned for the filters
    that read it."""

    seq: Tensor
    real: Tensor
    options: SamplingOptions
    n_tokens: int
    allowed: Tensor | None

    def __call__(self, logits: Tensor, end: Tensor) -> Tensor:
        opts, n = self.options, self.n_tokens
        hist = mask = seen = None
        if opts.repetition_penalty is not None or opts.no_repeat_ngram_size is not None:
            hist, mask = _span(self.seq, self.real, torch.zeros_like(end), end, int(end.max()))
            if opts.repetition_penalty is not None:
                spare = torch.zeros(hist.shape[0], n + 1, dtype=torch.bool, device=hist.device)
                seen = spare.scatter(1, torch.where(mask, hist, n), True)[:, :n]
        return filter_logits(logits[:, :n], opts, n_tokens=n, seen=seen, allowed=self.allowed, history=hist,
                             history_mask=mask)


def _draw(scores: Tensor, options: SamplingOptions, generators: list[torch.Generator] | None, rows: list[bool]
          ) -> tuple[Tensor, Tensor | None]:
    """`(token [batch], probabilities or None)`: the argmax, or (sampling) one draw for each row in `rows` with
    its own generator (the other rows take the argmax and draw nothing)."""
    tok = scores.argmax(-1)
    if options.greedy:
        return tok, None
    assert generators is not None
    probs = torch.softmax(scores, -1)
    for i, draw in enumerate(rows):
        if draw:
            tok[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tok, probs


def _accept(drafted: Tensor, p_scores: list[Tensor], q: list[Tensor] | None, limit: list[int], active: list[bool],
            options: SamplingOptions, generators: list[torch.Generator] | None) -> tuple[list[int], list[int]]:
    """Per row: how many of its proposals `drafted [batch, kr]` pass (at most `limit[i]`), and the target's token
    at the first position not passed. `q` is None for a point-mass proposer (or greedy decoding)."""
    batch, kr = drafted.shape
    if options.greedy:
        best = torch.stack([s.argmax(-1) for s in p_scores], 1)  # [batch, kr + 1]
        allowed = torch.arange(kr, device=drafted.device)[None] < torch.tensor(limit, device=drafted.device)[:, None]
        n = ((best[:, :kr] == drafted) & allowed).long().cumprod(1).sum(1)
        return n.tolist(), best.gather(1, n[:, None])[:, 0].tolist()
    assert generators is not None
    p = [torch.softmax(s, -1) for s in p_scores]
    p_d = torch.stack([p[j].gather(1, drafted[:, j:j + 1])[:, 0] for j in range(kr)], 1) if kr else None
    q_d = torch.stack([q[j].gather(1, drafted[:, j:j + 1])[:, 0] for j in range(kr)], 1) if kr and q else None
    counts, fixes = [0] * batch, [0] * batch
    for i, g in enumerate(generators):
        if not active[i]:
            continue
        n = limit[i]
        if n:
            assert p_d is not None
            u = torch.rand(n, generator=g, device=g.device)
            ratio_ok = u * (1.0 if q_d is None else q_d[i, :n]) < p_d[i, :n]  # u < p/q, without dividing
            rejected = (~ratio_ok).nonzero()
            n = int(rejected[0, 0]) if rejected.numel() else n
        if n < limit[i]:  # rejected at n: draw from max(p - q, 0), normalised
            if q is None:
                resid = p[n][i].clone()
                resid[int(drafted[i, n])] = 0.0
            else:
                resid = (p[n][i] - q[n][i]).clamp(min=0.0)
            if float(resid.sum()) <= 0.0:  # p == q up to rounding: the rejection had probability ~0
                resid = p[n][i]
        else:  # every proposal passed: the bonus token from p
            resid = p[n][i]
        counts[i], fixes[i] = n, int(torch.multinomial(resid, 1, generator=g)[0])
    return counts, fixes


def _check_window(context: int, width: int, new: int, whose: str) -> None:
    if width + new > context:
        raise ValueError(f"speculative decoding keeps the whole sequence in the caches (the window does not slide): "
                         f"the prompt ({width} tokens) + max_new_tokens ({new}) must fit the {whose}'s context of "
                         f"{context}; ask for at most {max(0, context - width)} new tokens, or decode without draft= "
                         "(plain decoding slides the window)")


def speculative_steps(params: GPTParams, draft: Draft, ids: Tensor, mask: Tensor | None,
                      generators: list[torch.Generator] | None, *, options: SamplingOptions, eos_id: int | None,
                      max_new_tokens: int, draft_tokens: int, logprobs: bool = False,
                      stats: dict[str, int] | None = None, cache_dtype: torch.dtype | None = None
                      ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield `(next token [batch], its log-probability [batch] or None)` column by column, as
    `gpt2fn.generate`'s loop does (rows finished at EOS repeat it), decoding speculatively with `draft`.

    `ids` `[batch, width]` are left-padded prompts (`mask` False on padding), `max_new_tokens >= 1`. `stats`, when
    given, receives the counts `rounds` (target steps after the prefill), `proposed` and `accepted` (proposals
    checked and kept, over the rows): the acceptance rate is `accepted / proposed`. `cache_dtype` (checked by the
    caller, `gpt2fn.cache.check_cache_dtype`): the keys and values of both models' caches, None for each model's
    compute dtype."""
    if stats is not None:
        stats.update(rounds=0, proposed=0, accepted=0)
    cfg, device = params.config, ids.device
    batch, width = ids.shape
    new, k = max_new_tokens, draft_tokens
    _check_window(cfg.context_length, width, new, "target")
    if isinstance(draft, GPTParams):
        _check_window(draft.config.context_length, width, new, "draft")
    # every row's tokens (index space: padding included), with room for one round's proposals past the end
    seq = torch.zeros(batch, width + new + k + 1, dtype=torch.long, device=device)
    seq[:, :width] = ids
    real = torch.ones(seq.shape, dtype=torch.bool, device=device)
    if mask is not None:
        real[:, :width] = mask
    allowed = None
    if cfg.trained_vocab is not None:
        allowed = (trained_vocab_index(cfg, device)[1] >= 0)[:cfg.n_tokens]
    score = _Scores(seq, real, options, cfg.n_tokens, allowed)
    count = torch.full((batch,), width, dtype=torch.long, device=device)  # the last token is not yet in the cache
    active_t = torch.ones(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    out_lp: list[list[float]] = [[] for _ in range(batch)]
    room = width + 2 * (new + k + 1)  # the generation, one round, and as much again for gaps between rebuilds
    tcache = init_cache(cfg, batch, min(cfg.context_length, room), device=device,
                        dtype=cache_dtype or params.compute_dtype)
    dcache, dfed = None, torch.zeros(batch, dtype=torch.long, device=device)  # draft: tokens of each row it holds
    if isinstance(draft, GPTParams):
        dcache = init_cache(draft.config, batch, min(draft.config.context_length, room), device=device,
                            dtype=cache_dtype or draft.compute_dtype)
    checking = checks_enabled()  # the caller's setting for the first round; then off, as plain decoding does
    with shape_checks(checking):
        tcache = _refill(params, tcache, seq, real, count - 1, active_t)
    column = 0
    while True:
        active = active_t.tolist()
        with shape_checks(checking):
            if any(active):
                tcache, dcache, dfed = _round(params, draft, tcache, dcache, dfed, seq, real, count, active,
                                              score, options, generators, eos_id, new, k, logprobs, out, out_lp,
                                              stats)
        checking = False
        made = [len(o) for o in out]
        done = [len(o) == new or (eos_id is not None and bool(o) and o[-1] == eos_id) for o in out]
        active_t = torch.tensor([not d for d in done], device=device)
        count = torch.tensor([width + m for m in made], dtype=torch.long, device=device)
        ready = min(new if d else m for d, m in zip(done, made, strict=False))
        last = new if not all(done) else max(made)
        while column < min(ready, last):
            tok = [o[column] if column < len(o) else eos_id for o in out]
            lp = [lps[column] if column < len(lps) else 0.0 for lps in out_lp]
            yield (torch.tensor(tok, dtype=torch.long, device=device),
                   torch.tensor(lp, device=device) if logprobs else None)
            column += 1
        if all(done):
            return


def _round(params: GPTParams, draft: Draft, tcache: KVCache, dcache: KVCache | None, dfed: Tensor, seq: Tensor,
           real: Tensor, count: Tensor, active: list[bool], score: _Scores, options: SamplingOptions,
           generators: list[torch.Generator] | None, eos_id: int | None, new: int, k: int, logprobs: bool,
           out: list[list[int]], out_lp: list[list[float]], stats: dict[str, int] | None
           ) -> tuple[KVCache, KVCache | None, Tensor]:
    """One round for the active rows: propose, verify, accept, emit into `out`, roll both caches back. Returns
    the caches and the draft's per-row token count."""
    device = seq.device
    active_t = torch.tensor(active, device=device)
    # proposals each row may keep
    limit = [min(k, new - len(o) - 1) if a else 0 for a, o in zip(active, out, strict=False)]
    kr = max(limit)
    if int(tcache.length) + 1 + kr > tcache.capacity:  # no room for this round: close the gaps
        tcache = _refill(params, tcache, seq, real, count - 1, active_t)
        kr = min(kr, tcache.capacity - int(tcache.length) - 1)
    if dcache is not None and kr > 0:
        pending = int(torch.where(active_t, count - dfed, 0).max())
        if int(dcache.length) + pending + kr - 1 > dcache.capacity:  # refill from nothing: the whole row pends
            dcache, dfed = rollback(dcache, 0), torch.zeros_like(dfed)
            kr = min(kr, dcache.capacity - int(torch.where(active_t, count, 0).max()) + 1)
    ar = torch.arange(k + 1, device=device)
    q: list[Tensor] | None = None
    d_start = d_width = 0
    if kr > 0 and isinstance(draft, PromptLookup):
        rows = [seq[i, :int(count[i])][real[i, :int(count[i])]] if a else seq[i, :0] for i, a in enumerate(active)]
        found = lookup_proposals(rows, kr, draft)
        limit = [min(n, len(f)) for n, f in zip(limit, found, strict=False)]  # a row proposes only what it matched
        kr = max(limit)  # 0 when nothing matched: a plain step
        if kr > 0:  # filler past a row's own proposals is never accepted (its limit stops there)
            props = [(f + [0] * kr)[:kr] for f in found]
            seq.scatter_(1, count[:, None] + ar[None, :kr], torch.tensor(props, dtype=torch.long, device=device))
    elif kr > 0:
        assert isinstance(draft, GPTParams) and dcache is not None
        d_width = int(torch.where(active_t, count - dfed, 0).max())
        feed, pad = _span(seq, real, torch.where(active_t, dfed, count), count, d_width)
        d_start = int(dcache.length)
        d_logits, dcache = decode_step(draft, dcache, feed, pad_mask=pad, donate=True, last_only=True)
        q = []
        for j in range(kr):
            tok, qj = _draw(score(d_logits[:, -1], count + j), options, generators, [j < n for n in limit])
            seq.scatter_(1, (count + j)[:, None], tok[:, None])
            if qj is not None:
                q.append(qj)
            if j < kr - 1:
                d_logits, dcache = decode_step(draft, dcache, tok[:, None], donate=True, last_only=True)
        q = q or None
    limit = [min(n, kr) for n in limit]
    drafted = seq.gather(1, count[:, None] + ar[None, :kr])
    # the target checks [last token, d1..d_kr] in one step (inactive rows: padding only)
    feed = seq.gather(1, (count - 1)[:, None] + ar[None, :kr + 1])
    t_start = int(tcache.length)
    t_logits, tcache = decode_step(params, tcache, feed, donate=True,
                                   pad_mask=None if all(active) else active_t[:, None].expand(-1, kr + 1))
    p_scores = [score(t_logits[:, j], count + j) for j in range(kr + 1)]
    counts, fixes = _accept(drafted, p_scores, q, limit, active, options, generators)
    if stats is not None:
        stats["rounds"] += 1
        stats["proposed"] += sum(limit)
        stats["accepted"] += sum(counts)
    lps = torch.log_softmax(t_logits.float(), -1) if logprobs else None
    drafted_rows = drafted.tolist()
    for i, a in enumerate(active):
        if not a:
            continue
        for j, t in enumerate(drafted_rows[i][:counts[i]] + [fixes[i]]):
            out[i].append(t)
            if lps is not None:
                out_lp[i].append(float(lps[i, j, t]))
            if (eos_id is not None and t == eos_id) or len(out[i]) == new:
                break
    n = torch.tensor(counts, dtype=torch.long, device=device)
    fix = torch.tensor(fixes, dtype=torch.long, device=device)
    at = (count + n)[:, None]
    seq.scatter_(1, at, torch.where(active_t[:, None], fix[:, None], seq.gather(1, at)))
    # each row keeps [last token, its accepted proposals]; the others' slots of this round become gaps
    tcache = rollback(tcache, torch.where(active_t, t_start + n + 1, t_start))
    if dcache is not None and kr > 0:
        kept = n.clamp(max=kr - 1)  # the draft was fed d1..d_{kr-1}; d_kr (when accepted) is still pending
        dcache = rollback(dcache, torch.where(active_t, d_start + d_width + kept, d_start))
        dfed = torch.where(active_t, count + kept, dfed)
    return tcache, dcache, dfed

"""Scoring: the log-likelihood, mean loss and perplexity a model gives to texts (or to a continuation given a prompt).

    s = gpt2fn.score(params, "The cat sat on the mat.")          # one text -> one Score
    s.perplexity, s.mean_loss, s.logprobs                        # exp(mean loss), nats per token, one per token
    gpt2fn.score(params, ["a text", "another"], batch_size=8)    # several -> a list of Score, batched
    gpt2fn.score(params, "Q: 2+2? A:", continuation=" 4")        # log p(continuation | prompt) only

What is scored: token t of a sequence is scored with `log p(ids[t] | ids[:t])` from one `forward`. The first token
of a text has nothing to be predicted from, so it is never scored (as in the `transformers` perplexity guide): a
text of n tokens scores n - 1 of them. With `continuation=`, only the continuation's tokens are scored.

Texts longer than the window use the sliding window of the `transformers` perplexity guide
(https://huggingface.co/docs/transformers/perplexity): windows of `context` tokens start every `stride` tokens
(default `context // 2`), and each window scores only the tokens the previous windows did not, so every scored
token sees at least `context - stride` tokens of context. As in the guide, the first token of a window cannot be
scored inside it: with `stride == context` the first token of every window is left unscored; `stride < context`
scores every token after the first.

Windows of every text are batched together (longest first, left-padded, positions counted from the pad mask),
so one long text is scored `batch_size` windows at a time. Log-probabilities are computed in fp32; with
`config.trained_vocab` the softmax runs over the trained ids, as `gpt2fn.loss` does.
"""

import dataclasses
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from . import html
from .checks import check_token_range
from .losses import perplexity
from .model import forward, left_pad, trained_vocab_index
from .params import GPTParams, check_params

__all__ = ["Score", "score"]

Ids = str | Sequence[int] | Tensor


@dataclasses.dataclass(frozen=True, eq=False)  # a tensor field: compare .logprobs with torch.equal
class Score:
    """How likely a model finds one token sequence.

    - `ids`: the whole sequence (prompt then continuation, when one was given).
    - `positions`: the indices into `ids` of the scored tokens; `logprobs[i] = log p(ids[positions[i]] | context)`
      in nats (fp32, on the CPU).
    - `log_likelihood`: their sum; `n_tokens`: how many were scored; `mean_loss = -log_likelihood / n_tokens`;
      `perplexity = exp(mean_loss)`.
    """

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    logprobs: Tensor
    log_likelihood: float
    n_tokens: int

    @property
    def mean_loss(self) -> float:
        return -self.log_likelihood / self.n_tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.mean_loss)

    def view(self, *, tokens: Sequence[str] | None = None) -> html.View:
        """The tokens coloured by their log-probabilities (white at 0, blue at the lowest; the unscored first token
        grey), with the totals; a notebook shows this for a `Score`. `tokens`: labels (default: GPT-2 BPE)."""
        from .tokenizer import token_strings

        values: list[float | None] = [None] * len(self.ids)
        for p, lp in zip(self.positions, self.logprobs.tolist(), strict=True):
            values[p] = lp
        labels = token_strings(self.ids) if tokens is None else list(tokens)
        low = min((v for v in values if v is not None), default=-1.0)
        note = (f"{self.n_tokens} tokens scored: log-likelihood {self.log_likelihood:.4g}, mean loss "
                f"{self.mean_loss:.4g} nats, perplexity {self.perplexity:.4g}; colour: log p(token | the tokens "
                "before it), darker is less likely.")
        return html.tokens_view(labels, {"-log p (nats)": [None if v is None else -v for v in values]},
                                title="log-probabilities", signed=False, vmin=0.0, vmax=max(-low, 1e-9), note=note)

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()


def score(params: GPTParams, texts_or_ids: Ids | Sequence[Ids], *, continuation: Ids | Sequence[Ids] | None = None,
          context: int | None = None, stride: int | None = None, batch_size: int = 8,
          progress: bool = False) -> Score | list[Score]:
    """Per-token log-probabilities, log-likelihood, mean loss and perplexity of texts under `params`.

    `texts_or_ids`: a text (str, tokenized with `gpt2fn.tokenizer.encode`), a list or 1-D tensor of token ids,
    or a list of those; one gives a `Score`, a list gives a list of `Score` in the same order.
    `continuation`: the same shape as `texts_or_ids`; the texts are then prompts and only the continuation's
    tokens are scored, each given the prompt and the continuation before it.
    `context`: window length (default and maximum `config.context_length`); `stride`: tokens between window
    starts, in [1, context] (default `context // 2`). `batch_size`: windows per `forward`. `progress`: a tqdm
    bar on stderr. Runs without gradients (`torch.no_grad`).

    Raises ValueError for a text with nothing to score (fewer than two tokens, or an empty continuation), ids
    outside `[0, vocab_size)`, a scored id outside `config.trained_vocab`, or options out of range."""
    cfg = check_params(params).config
    single = _is_single(texts_or_ids)
    prompts = [texts_or_ids] if single else list(texts_or_ids)
    if not prompts:
        raise ValueError("texts_or_ids is empty: pass a text, a list of token ids, or a list of those")
    if continuation is None:
        seqs = [_as_ids(p, f"texts_or_ids[{i}]") for i, p in enumerate(prompts)]
        firsts = [1] * len(seqs)
    else:
        conts = [continuation] if single else list(continuation) if not _is_single(continuation) else None
        if conts is None or len(conts) != len(prompts):
            raise ValueError("continuation must match texts_or_ids: one continuation for one text, or a list of "
                             f"{len(prompts)} for a list of {len(prompts)}")
        heads = [_as_ids(p, f"texts_or_ids[{i}]") for i, p in enumerate(prompts)]
        tails = [_as_ids(c, f"continuation[{i}]") for i, c in enumerate(conts)]
        for i, t in enumerate(tails):
            if not t:
                raise ValueError(f"continuation[{i}] is empty: give at least one token to score")
        seqs = [h + t for h, t in zip(heads, tails, strict=True)]
        firsts = [max(len(h), 1) for h in heads]  # an empty prompt: the continuation's first token has no context
    window = cfg.context_length if context is None else context
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= cfg.context_length:
        raise ValueError(f"context must be an integer in [2, context_length={cfg.context_length}], got {context!r}")
    step = window // 2 if stride is None else stride
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= window:
        raise ValueError(f"stride must be an integer in [1, context={window}], got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for i, (ids, first) in enumerate(zip(seqs, firsts, strict=True)):
        check_token_range(ids, cfg.vocab_size, what=f"texts_or_ids[{i}]")
        if len(ids) <= first:
            raise ValueError(f"texts_or_ids[{i}] has {len(ids)} token(s) and nothing to score; the first token has "
                             "no prediction, so a text needs at least 2 tokens")

    jobs, positions = [], []  # jobs: (text, begin, end, lo, offset of its first score in the text's result)
    for i, ids in enumerate(seqs):
        scored: list[int] = []
        for b, e, lo in _windows(len(ids), firsts[i], window, step):
            jobs.append((i, b, e, lo, len(scored)))
            scored += range(lo, e)
        positions.append(tuple(scored))
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths share a batch: little padding
    out = [torch.empty(len(p), dtype=torch.float32) for p in positions]
    device = params.tok_emb.device
    rows = position = None
    if cfg.trained_vocab is not None:
        rows, position = trained_vocab_index(cfg, device)
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="scoring", unit="window", file=sys.stderr, disable=not progress)
    with torch.no_grad():
        for k in range(0, len(jobs), batch_size):
            chunk = jobs[k:k + batch_size]
            ids, mask = left_pad([seqs[i][b:e] for i, b, e, _, _ in chunk], device=device)
            logits = forward(params, ids, pad_mask=None if bool(mask.all()) else mask)
            r, c, tgt, dest = [], [], [], []
            for n, (i, b, e, lo, offset) in enumerate(chunk):
                pad = ids.shape[1] - (e - b)
                r += [n] * (e - lo)
                c += range(pad + lo - 1 - b, pad + e - 1 - b)  # the logits at t - 1 predict token t
                tgt += seqs[i][lo:e]
                dest.append((i, offset, offset + e - lo))
            sel = logits[torch.tensor(r, device=device), torch.tensor(c, device=device)].float()
            target = torch.tensor(tgt, device=device)
            if rows is not None:
                sel, target = sel.index_select(-1, rows), position[target]
                if bool((target < 0).any()):
                    bad = tgt[int((target < 0).nonzero()[0])]
                    raise ValueError(f"token id {bad} is scored but lies outside this model's trained_vocab "
                                     f"({len(rows)} ids): the model gives it probability 0")
            lp = torch.log_softmax(sel, dim=-1).gather(-1, target[:, None])[:, 0].cpu()
            at = 0
            for i, lo, hi in dest:
                out[i][lo:hi] = lp[at:at + hi - lo]
                at += hi - lo
            bar.update(len(chunk))
    bar.close()
    results = [Score(ids=tuple(ids), positions=pos, logprobs=lp, log_likelihood=float(lp.double().sum()),
                     n_tokens=len(lp))
               for ids, pos, lp in zip(seqs, positions, out, strict=True)]
    return results[0] if single else results


def _windows(n: int, first: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The guide's sliding windows over n tokens as `(begin, end, lo)`: the window is `ids[begin:end]` and it
    scores tokens `lo .. end-1` (those after the previous window's end, never the window's own first token,
    never before `first`). Windows that score nothing are left out."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        lo = max(prev_end, begin + 1, first)
        if lo < end:
            out.append((begin, end, lo))
        prev_end = end
        if end == n:
            break
    return out


def _is_single(x: object) -> bool:
    if isinstance(x, str):
        return True
    if isinstance(x, Tensor):
        return x.ndim <= 1
    return isinstance(x, Sequence) and (len(x) == 0 or isinstance(x[0], int))


def _as_ids(x: Ids, name: str) -> list[int]:
    if isinstance(x, str):
        from .tokenizer import encode

        return encode(x)
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of token ids; got {x.dtype} of shape "
                             f"{list(x.shape)}")
        return x.tolist()
    if isinstance(x, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        return list(x)
    raise ValueError(f"{name} must be a str, a list of int token ids or a 1-D integer tensor; got {type(x).__name__}")

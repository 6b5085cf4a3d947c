"""Head detectors: previous-token, duplicate-token and induction scores for every attention head.

The recipe (Olsson et al. 2022, "In-context learning and induction heads"; Elhage et al. 2021): run the model on
random tokens `r` of length `T` repeated once, `[prefix] r r`, and read the attention patterns
(`blocks.{i}.attn.pattern`). In the second copy, position `q` (with `q - T` its earlier occurrence):

| score            | attention from query `q` to key  | queries                                |
|------------------|----------------------------------|----------------------------------------|
| previous token   | `q - 1`                          | every position after the first         |
| duplicate token  | `q - T` (the same token before)  | the second copy                        |
| induction        | `q - T + 1` (the token after it) | the second copy                        |

Each score is the mean of those attention weights over the queries and the batch, so it lies in [0, 1]: 1 means
the head puts all its attention there. The per-pattern functions take any stack of patterns
`[*stack batch heads seq kv_seq]` (e.g. `[layer batch heads seq seq]`) and return `[*stack heads]`.

    scores = head_detector_scores(params, seq_len=20, batch=8, seed=0)   # HeadScores, each [layer heads]
    layer, head = divmod(int(scores.induction.argmax()), params.config.n_heads)
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import html
from ..params import GPTParams
from .run import forward_with

__all__ = ["HeadScores", "repeated_tokens", "offset_attention", "previous_token_score", "duplicate_token_score",
           "induction_score", "head_detector_scores"]


class HeadScores(NamedTuple):
    """The three detector scores of every head, each `[layer heads]` (or `[*stack heads]`), in [0, 1]."""

    previous_token: Tensor
    duplicate_token: Tensor
    induction: Tensor

    def view(self) -> html.View:
        """The three scores as `layer x head` heat maps on one scale [0, 1] (leading axes beyond two are
        averaged); a notebook shows this for a `HeadScores`."""
        maps = []
        for name in self._fields:
            t = getattr(self, name).detach().float()
            t = t.reshape(-1, t.shape[-1]) if t.ndim != 1 else t[None]
            maps.append(html.heatmap(t, rows=[f"layer {i}" for i in range(t.shape[0])],
                                     cols=[f"h{h}" for h in range(t.shape[1])], title=name.replace("_", "-"),
                                     signed=False, vmin=0.0, vmax=1.0, row_axis="layer", col_axis="head"))
        return html.concat(maps, title="head detector scores")

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()


def repeated_tokens(vocab: int | Tensor, *, seq_len: int, batch: int, seed: int | torch.Generator = 0,
                    prefix: Int[Tensor, " prefix"] | None = None, device: torch.device | str | None = None
                    ) -> Int[Tensor, "batch seq"]:
    """`batch` sequences `[prefix] r r` of `seq_len` random tokens `r` repeated once: `[batch, P + 2 seq_len]`.

    `vocab`: the number of ids to draw from (`0..vocab-1`), or a 1-D tensor of the allowed ids. Within a copy the
    tokens are distinct when the vocabulary has at least `seq_len` ids (so each token of the second copy has exactly
    one earlier occurrence), else drawn with replacement. `prefix`: e.g. `torch.tensor([EOT])` as a BOS token.
    """
    pool = torch.arange(vocab) if isinstance(vocab, int) else vocab.flatten().cpu().long()
    if seq_len < 2 or batch < 1 or len(pool) < 2:
        raise ValueError(f"repeated_tokens needs seq_len >= 2, batch >= 1 and at least 2 ids; got seq_len={seq_len}, "
                         f"batch={batch}, {len(pool)} ids")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    if len(pool) >= seq_len:
        picks = torch.stack([torch.randperm(len(pool), generator=gen)[:seq_len] for _ in range(batch)])
    else:
        picks = torch.randint(0, len(pool), (batch, seq_len), generator=gen)
    r = pool[picks]
    parts = [r, r] if prefix is None else [prefix.cpu().long().expand(batch, -1), r, r]
    return torch.cat(parts, dim=1).to(device)


def offset_attention(pattern: Float[Tensor, "*stack batch heads seq kv_seq"], offset: int, *, start: int = 0,
                     stop: int | None = None) -> Float[Tensor, "*stack heads"]:
    """Mean attention from query `q` to key `q - offset`, over the queries `start <= q < stop` and the batch:
    the mean of one diagonal of each head's pattern. `offset >= 0`; every query must have that key (`start >=
    offset`)."""
    seq = pattern.shape[-2]
    stop = seq if stop is None else stop
    if not 0 <= offset <= start < stop <= seq:
        raise ValueError(f"offset_attention needs 0 <= offset ({offset}) <= start ({start}) < stop ({stop}) <= seq "
                         f"({seq}): each query q in start..stop-1 must have the key q - offset")
    diagonal = pattern.diagonal(offset=-offset, dim1=-2, dim2=-1)  # [..., heads, seq - offset]: key k, query k+off
    return diagonal[..., start - offset:stop - offset].mean(-1).mean(-2)


def _copies(pattern: Tensor, seq_len: int, prefix: int) -> None:
    if pattern.shape[-2] != prefix + 2 * seq_len or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"the pattern covers {pattern.shape[-2]} queries x {pattern.shape[-1]} keys; a repeated "
                         f"sequence of seq_len={seq_len} after {prefix} prefix tokens has {prefix + 2 * seq_len} of "
                         "each (see repeated_tokens)")


def previous_token_score(pattern: Float[Tensor, "*stack batch heads seq kv_seq"]) -> Float[Tensor, "*stack heads"]:
    """Mean attention from each position to the one before it (every query but the first)."""
    return offset_attention(pattern, 1, start=1)


def duplicate_token_score(pattern: Float[Tensor, "*stack batch heads seq kv_seq"], seq_len: int, *,
                          prefix: int = 0) -> Float[Tensor, "*stack heads"]:
    """Mean attention from each token of the second copy to its earlier occurrence (`q - seq_len`), on a pattern
    of `[prefix] r r` (`seq_len` tokens in `r`)."""
    _copies(pattern, seq_len, prefix)
    return offset_attention(pattern, seq_len, start=prefix + seq_len)


def induction_score(pattern: Float[Tensor, "*stack batch heads seq kv_seq"], seq_len: int, *,
                    prefix: int = 0) -> Float[Tensor, "*stack heads"]:
    """Mean attention from each token of the second copy to the token after its earlier occurrence
    (`q - seq_len + 1`), on a pattern of `[prefix] r r` (`seq_len` tokens in `r`)."""
    _copies(pattern, seq_len, prefix)
    return offset_attention(pattern, seq_len - 1, start=prefix + seq_len)


def head_detector_scores(params: GPTParams, *, seq_len: int = 20, batch: int = 8, seed: int | torch.Generator = 0,
                         prefix: Int[Tensor, " prefix"] | None = None, ids: Int[Tensor, "batch seq"] | None = None
                         ) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head, each `[layer heads]`, from the attention
    patterns on `repeated_tokens` (drawn from the ids the model predicts, with `seed`), or on your own `ids` of the
    form `[prefix] r r` with `len(r) == seq_len`."""
    cfg = params.config
    if ids is None:
        vocab = torch.tensor(cfg.trained_vocab) if cfg.trained_vocab is not None else cfg.n_tokens
        ids = repeated_tokens(vocab, seq_len=seq_len, batch=batch, seed=seed, prefix=prefix, device=params.device)
    n_prefix = 0 if prefix is None else len(prefix)
    if ids.ndim != 2 or ids.shape[1] != n_prefix + 2 * seq_len:
        raise ValueError(f"ids {list(ids.shape)} must be [batch, prefix + 2 * seq_len] = [batch, "
                         f"{n_prefix + 2 * seq_len}] (a sequence of seq_len={seq_len} tokens repeated once)")
    with torch.no_grad():
        _, acts = forward_with(params, ids, capture="blocks.*.attn.pattern")
    pattern = torch.stack([acts[f"blocks.{i}.attn.pattern"] for i in range(cfg.n_layers)])  # [layer b h s s]
    return HeadScores(previous_token_score(pattern), duplicate_token_score(pattern, seq_len, prefix=n_prefix),
                      induction_score(pattern, seq_len, prefix=n_prefix))

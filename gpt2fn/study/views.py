"""Views of a forward pass: logit lens, direct logit attribution per head, attention maps as PNG, and the HTML
views built on them (`view_attention`, `view_logit_lens`, `view_logprobs`, `view_dla`, `view_sweep`,
`view_report`; `save_html(view, path)` writes one atomically). The HTML itself is drawn by `gpt2fn.html` from
plain data; these functions run the model and hand it the data."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import html
from ..files import atomic_write, atomic_write_text
from ..model import readout
from ..params import GPTParams
from ..shapes import checked
from .run import forward_with

__all__ = ["logit_lens", "lens_labels", "LogitAttribution", "direct_logit_attribution",
           "attention_patterns", "token_labels", "save_attention_map", "token_strings", "save_html",
           "view_attention", "view_logit_lens", "view_logprobs", "view_score", "view_dla", "view_sweep",
           "view_report"]


def lens_labels(n_layers: int) -> list[str]:
    """Names of the rows of :func:`logit_lens`: `embed`, then `blocks.{i}` (the residual after block i)."""
    return ["embed", *(f"blocks.{i}" for i in range(n_layers))]


@checked
def logit_lens(params: GPTParams, ids: Int[Tensor, "batch seq"], *, positions: Sequence[int] | None = None,
               **forward_kwargs: Any) -> Float[Tensor, "layer batch pos vocab"]:
    """The logit lens (nostalgebraist 2020): the residual stream after the embedding and after each block, read
    through the final layer norm and the unembedding as if the model stopped there.

    Row `i` is `lens_labels(n_layers)[i]`; the last row is the model's logits. `positions` keeps only those
    positions (the full lens of a 124M model is `13 x seq x 50257` floats). Top tokens: `.topk(k, dim=-1)`.
    """
    cfg = params.config
    sites = ["embed", *(f"blocks.{i}.resid_post" for i in range(cfg.n_layers))]
    _, acts = forward_with(params, ids, capture=sites, **forward_kwargs)
    rows = []
    for site in sites:
        x = acts[site] if positions is None else acts[site][:, list(positions)]
        rows.append(readout(params, x))
    return torch.stack(rows)


@dataclasses.dataclass(frozen=True)
class LogitAttribution:
    """Direct logit attribution of one position: each component's share of a logit (difference), through the
    final layer norm with its scale frozen at the run's value. The shares sum to the logit (difference).

    Absent biases contribute zeros. Axes: `batch` examples, `layer` blocks, `heads` attention heads.
    """

    embed_tok: Float[Tensor, " batch"]
    embed_pos: Float[Tensor, " batch"]
    heads: Float[Tensor, "batch layer heads"]
    attn_bias: Float[Tensor, "batch layer"]
    mlp: Float[Tensor, "batch layer"]
    mlp_bias: Float[Tensor, "batch layer"]
    final_bias: Float[Tensor, " batch"]

    def total(self) -> Float[Tensor, " batch"]:
        """The sum of every share: the logit (difference) itself."""
        return (self.embed_tok + self.embed_pos + self.heads.sum((1, 2)) + self.attn_bias.sum(1)
                + self.mlp.sum(1) + self.mlp_bias.sum(1) + self.final_bias)

    def named(self) -> dict[str, Tensor]:
        """`{component name: [batch] share}`, with names such as `blocks.3.attn.head7` and `blocks.3.mlp`."""
        out = {"embed.tok": self.embed_tok, "embed.pos": self.embed_pos}
        for i in range(self.heads.shape[1]):
            out.update({f"blocks.{i}.attn.head{h}": self.heads[:, i, h] for h in range(self.heads.shape[2])})
            out[f"blocks.{i}.attn.bias"] = self.attn_bias[:, i]
            out[f"blocks.{i}.mlp"] = self.mlp[:, i]
            out[f"blocks.{i}.mlp.bias"] = self.mlp_bias[:, i]
        out["final_norm.shift"] = self.final_bias
        return out

    def _repr_html_(self) -> str:
        return view_dla(self)._repr_html_()


@checked
def direct_logit_attribution(params: GPTParams, ids: Int[Tensor, "batch seq"], good: int | Tensor,
                             bad: int | Tensor | None = None, *, position: int = -1, **forward_kwargs: Any
                             ) -> LogitAttribution:
    """Split `logit[good] - logit[bad]` (or `logit[good]` when `bad` is None) at `position` into the direct
    contributions of the embeddings, each attention head, each MLP, and the biases.

    The residual stream before the final norm is a sum of those components; the norm is linear in it once its
    scale `1/std(x)` is frozen, so each component c contributes `((c - mean c) / std(x) * gamma) . (W_U[good] -
    W_U[bad])` and the final norm's shift `beta . (W_U[good] - W_U[bad])`. Head h of layer l writes
    `z[h] @ w_out[h*head_dim:(h+1)*head_dim]` (the rows of `w_out` it reads). This is
    `gpt2fn.study.decompose_logit(..., heads=True, split_biases=True)` arranged by field; that function also
    splits by neuron and reads intermediate layers.
    """
    from .decompose import decompose_logit

    cfg = params.config
    sites = ["embed.tok", "embed.pos", "blocks.*.attn.z", "blocks.*.mlp.out", "final_norm.scale"]
    _, acts = forward_with(params, ids, capture=sites, **forward_kwargs)
    shares = decompose_logit(params, acts, good, bad, pos=position, heads=True, split_biases=True).stack
    # rows: embed.tok, embed.pos, per layer [head 0..H-1, attn.bias, mlp, mlp.bias], final_norm.shift
    h = cfg.n_heads
    per_layer = shares[2:-1].reshape(cfg.n_layers, h + 3, ids.shape[0])
    return LogitAttribution(
        embed_tok=shares[0], embed_pos=shares[1], heads=per_layer[:, :h].permute(2, 0, 1),
        attn_bias=per_layer[:, h].T, mlp=per_layer[:, h + 1].T, mlp_bias=per_layer[:, h + 2].T,
        final_bias=shares[-1],
    )


@checked
def attention_patterns(params: GPTParams, ids: Int[Tensor, "batch seq"], *, layers: Sequence[int] | None = None,
                       **forward_kwargs: Any) -> Float[Tensor, "layer batch heads seq kv_seq"]:
    """Every head's attention pattern (rows: queries, columns: keys; each row sums to 1 over the past)."""
    layers = range(params.config.n_layers) if layers is None else layers
    names = [f"blocks.{i}.attn.pattern" for i in layers]
    _, acts = forward_with(params, ids, capture=names, **forward_kwargs)
    return torch.stack([acts[n] for n in names])


def token_labels(ids: Sequence[int] | Tensor) -> list[str]:
    """One printable label per GPT-2 token (a leading space shown as '·', newlines and tabs escaped)."""
    from ..tokenizer import decode

    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [decode([i]).replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅" for i in ids]


def save_attention_map(pattern: Float[Tensor, "seq kv_seq"], labels: Sequence[str], path: str | Path, *,
                       title: str | None = None, key_labels: Sequence[str] | None = None) -> Path:
    """Write an attention heat map as PNG: queries down, keys across, token labels on both axes.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch). The labels are also stored in the
    PNG's text metadata (`Description`: JSON `{"queries": [...], "keys": [...]}`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key_labels = list(labels) if key_labels is None else list(key_labels)
    data = pattern.detach().float().cpu().numpy()
    if data.ndim != 2 or data.shape != (len(labels), len(key_labels)):
        raise ValueError(f"pattern has shape {list(data.shape)}; expected [{len(labels)}, {len(key_labels)}] "
                         "to match the query and key labels")
    side = max(3.0, 0.32 * max(data.shape) + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(key_labels)), key_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Title": title or "attention pattern",
            "Description": json.dumps({"queries": list(labels), "keys": key_labels}, ensure_ascii=False)}
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, metadata=meta))
    return path


# -- HTML views -------------------------------------------------------------------------------------------------


def token_strings(ids: Sequence[int] | Tensor) -> list[str]:
    """Each id's own text (`gpt2fn.tokenizer.token_strings`; `#id` where the tokenizer does not know it)."""
    from ..tokenizer import token_strings as strings

    return strings(ids.tolist() if isinstance(ids, Tensor) else ids)


def _one_row(ids: Tensor, example: int, fn: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.ndim not in (1, 2):
        what = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{fn}: ids must be an integer tensor [seq] or [batch, seq]; got {what}")
    ids = ids[None] if ids.ndim == 1 else ids
    if not -ids.shape[0] <= example < ids.shape[0]:
        raise ValueError(f"{fn}: example {example} is out of range for a batch of {ids.shape[0]}")
    return ids[example][None]


def save_html(view: html.View, path: str | Path) -> Path:
    """Write `view` as one self-contained HTML file (atomically, through `gpt2fn.files`); returns the path."""
    if not isinstance(view, html.View):
        raise TypeError(f"save_html takes a gpt2fn.html.View (from the view_* functions); got {type(view).__name__}")
    return atomic_write_text(path, view.page())


def view_attention(params: GPTParams, ids: Tensor, *, example: int = 0, layers: Sequence[int] | None = None,
                   top_k: int | None = None, budget: int = html.ATTENTION_BUDGET, tokens: Sequence[str] | None = None,
                   **forward_kwargs: Any) -> html.View:
    """Every head's attention pattern over `ids[example]` as an interactive view (`gpt2fn.html.attention_view`).

    One forward pass; each layer's pattern is reduced to its top keys per query as the walk produces it (an edit
    that returns the pattern unchanged), so memory holds one layer's pattern at a time, not all of them.
    """
    cfg = params.config
    row = _one_row(ids, example, "view_attention")
    chosen = list(range(cfg.n_layers)) if layers is None else [i + cfg.n_layers if i < 0 else i for i in layers]
    bad = [i for i in chosen if not 0 <= i < cfg.n_layers]
    if bad or not chosen:
        raise ValueError(f"layers {list(layers or [])} must be non-empty indices into the model's {cfg.n_layers} "
                         "layers")
    seq = row.shape[1]
    k = html.choose_k(len(chosen), cfg.n_heads, seq, seq, budget) if top_k is None else min(top_k, seq)
    reduced: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def keep(i: int):
        def edit(pattern: Tensor) -> Tensor:
            reduced[i] = html.attention_topk(pattern[0], k)
            return pattern
        return edit

    with torch.no_grad():
        forward_with(params, row, edit={f"blocks.{i}.attn.pattern": keep(i) for i in chosen}, **forward_kwargs)
    labels = token_strings(row[0]) if tokens is None else list(tokens)
    return html.attention_view(labels, [reduced[i] for i in chosen], layer_labels=[f"layer {i}" for i in chosen],
                               top_k=k, title="attention patterns")


def view_logit_lens(params: GPTParams, ids: Tensor, *, example: int = 0, k: int = 5,
                    positions: Sequence[int] | None = None, tokens: Sequence[str] | None = None,
                    chunk: int = 128, **forward_kwargs: Any) -> html.View:
    """The logit lens (see `logit_lens`) of `ids[example]` as a table of each layer's top-`k` next tokens per
    position. Reads the residual streams once and unembeds `chunk` positions at a time, so the full `layers x seq
    x vocab` lens is never held."""
    cfg = params.config
    row = _one_row(ids, example, "view_logit_lens")
    seq = row.shape[1]
    pos = list(range(seq)) if positions is None else [p + seq if p < 0 else p for p in positions]
    if not pos or any(not 0 <= p < seq for p in pos):
        raise ValueError(f"positions must be non-empty indices into the {seq} tokens")
    sites = ["embed", *(f"blocks.{i}.resid_post" for i in range(cfg.n_layers))]
    with torch.no_grad():
        _, acts = forward_with(params, row, capture=sites, **forward_kwargs)
        probs, top = [], []
        for site in sites:
            x = acts[site][0, pos]
            parts = [readout(params, x[j:j + chunk]).float().softmax(-1).topk(min(k, cfg.vocab_size), dim=-1)
                     for j in range(0, len(pos), chunk)]
            probs.append(torch.cat([p.values for p in parts]))
            top.append(torch.cat([p.indices for p in parts]))
    words = token_strings(torch.stack(top).flatten())
    kk = top[0].shape[-1]
    names = [[words[(li * len(pos) + j) * kk:(li * len(pos) + j + 1) * kk] for j in range(len(pos))]
             for li in range(len(sites))]
    labels = token_strings(row[0]) if tokens is None else list(tokens)
    return html.lens_table(names, torch.stack(probs), layers=lens_labels(cfg.n_layers),
                           tokens=[labels[p] for p in pos], title="logit lens",
                           note="each cell: the layer's most likely next token at that position (through the final "
                                "norm and unembedding), coloured by its probability; hover for the top "
                                f"{kk}.")


def view_score(s: Any, *, tokens: Sequence[str] | None = None) -> html.View:
    """A `Score` as tokens coloured by log-probability (`Score.view`; the first token, never scored, is grey)."""
    from ..scoring import Score

    if not isinstance(s, Score):
        raise TypeError(f"view_score takes a gpt2fn.Score; got {type(s).__name__}")
    return s.view(tokens=tokens)


def view_logprobs(params: GPTParams, ids: Tensor, *, example: int = 0, tokens: Sequence[str] | None = None
                  ) -> html.View:
    """`score(params, ids[example])` as tokens coloured by their log-probabilities (see `view_score`)."""
    from ..scoring import score

    row = _one_row(ids, example, "view_logprobs")
    return view_score(score(params, row[0]), tokens=tokens)


def view_dla(attribution: LogitAttribution, *, example: int = 0, top: int | None = 40) -> html.View:
    """Direct logit attribution as signed bars per component (the `top` largest by size), and the heads' shares
    as a layer x head heat map."""
    named = attribution.named()
    labels = list(named)
    values = [float(v[example]) for v in named.values()]
    total = float(attribution.total()[example])
    bars = html.bars(labels, values, title="direct logit attribution", sort=True, top=top,
                     note=f"shares of the logit (difference) {total:.4g}; they sum to it.")
    heads = attribution.heads[example]
    grid = html.heatmap(heads, rows=[f"layer {i}" for i in range(heads.shape[0])],
                        cols=[f"h{h}" for h in range(heads.shape[1])], title="per head", signed=True,
                        row_axis="layer", col_axis="head")
    return html.concat([bars, grid], title="direct logit attribution")


def view_sweep(result: Tensor, *, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None,
               row_axis: str = "layer", col_axis: str = "position", title: str = "patching sweep",
               signed: bool | None = True, note: str = "") -> html.View:
    """A sweep's result (`patching_sweep`: layer x position; `head_patching_sweep`, `path_patching_sweep`,
    `head_detector_scores`: layer x head) as a heat map; `rows`/`cols` label the axes (e.g. the tokens).

    The sweeps return plain tensors (so their results stay arithmetic); this is their picture. A result with a
    trailing metric axis must be reduced first (`result[..., 0]`)."""
    if not isinstance(result, Tensor):
        raise TypeError(f"view_sweep takes a tensor [rows, cols]; got {type(result).__name__}")
    rows = [f"{row_axis} {i}" for i in range(result.shape[0])] if rows is None and result.ndim == 2 else rows
    return html.heatmap(result, rows=rows, cols=cols, title=title, signed=signed, row_axis=row_axis,
                        col_axis=col_axis, note=note)


def view_report(params: GPTParams, ids: Tensor, *, example: int = 0, lens_k: int = 5,
                top_k: int | None = None) -> html.View:
    """What `gpt2fn view` writes: attention, per-token log-probabilities and the logit lens of one text."""
    row = _one_row(ids, example, "view_report")
    labels = token_strings(row[0])
    parts = [view_attention(params, row, top_k=top_k, tokens=labels)]
    if row.shape[1] > 1:
        parts.append(view_logprobs(params, row, tokens=labels))
    parts.append(view_logit_lens(params, row, k=lens_k, tokens=labels))
    return html.concat(parts, title=f"gpt2fn view: {row.shape[1]} tokens")

"""Views of a forward pass: logit lens, direct logit attribution per head, attention maps as PNG."""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..files import atomic_write
from ..model import readout
from ..params import GPTParams
from ..shapes import checked
from .run import forward_with

__all__ = ["logit_lens", "lens_labels", "LogitAttribution", "direct_logit_attribution",
           "attention_patterns", "token_labels", "save_attention_map"]


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

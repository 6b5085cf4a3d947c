"""Attribution patching: first-order (gradient) estimates of activation patching, for every site or every edge at
the cost of two forward passes and one backward pass.

Activation patching runs the corrupt prompt once per patched component; attribution patching (AtP; Nanda 2023,
Kramar et al. 2024) replaces each run by its Taylor expansion around the corrupt run,

    metric(corrupt with a := a_clean) - metric(corrupt)  ~=  (d metric / d a)|corrupt . (a_clean - a_corrupt)

so one backward pass on the corrupt run gives the estimate for every component at once. Edge attribution patching
(EAP; Syed et al. 2023) does the same for each edge sender -> receiver of the residual graph: the sender's change
`clean - corrupt` (what it writes into the residual stream) dotted with the gradient of the metric with respect to
what the receiver reads (its own copy of the stream: `attn.q_input/k_input/v_input` per head, the MLP's input, the
final norm's input). EAP-IG (Hanna et al. 2024) takes that gradient averaged over `steps` points of the straight
line from the corrupt to the clean input embeddings (a Riemann sum of integrated gradients, Sundararajan et al.
2017): the same cost in passes, with `steps` times the batch.

Functions:
- `attribution_patching(params, clean_ids, corrupt_ids, metric, sites)` -> `{site: attribution}`; the feature
  axis is summed (`d_model`, `head_dim`, a norm's `1`), other axes kept: `[batch seq]` for residual sites,
  `[batch heads seq]` for `attn.z/q/k/v` and the per-head inputs, `[batch seq heads]` for `attn.result`,
  `[batch seq d_mlp]` per neuron for `mlp.pre/post`, `[batch heads seq kv_seq]` per weight for `attn.pattern`.
- `edge_attribution_patching(params, clean_ids, corrupt_ids, metric, steps=None)` -> `EdgeScores`.

How good is first order? Pearson correlation of AtP with the exact sweeps over every cell, on random weights,
a 10-token prompt pair differing in one token, batch 2 (measured for issue 22; `mini` and `small` presets, seeds
0-2; tests/test_attribution.py pins the `mini` case):

| sites                               | against                    | correlation    |
|-------------------------------------|----------------------------|----------------|
| `attn.z` per head (summed over seq)  | `head_patching_sweep`      | 0.998 - 1.000  |
| `mlp.out` per layer x position       | `patching_sweep(site=...)` | 0.975 - 0.998  |
| `resid_pre` per layer x position     | `patching_sweep`           | 0.62 - 0.999   |
| `resid_pre`, `steps=5` / `steps=20`  | `patching_sweep`           | 0.993 / 0.999 (the 0.62 case) |

First order fails where the change is not small: the worst cells are `resid_pre` of layer 0 at the swapped token,
where the patch replaces a whole token embedding (AtP gave +0.015 for an exact -0.067: the wrong sign), and, to a
lesser degree, the residual stream at the metric's own position, read by the final norm. Integrated gradients
(`steps=`) repair both here. On trained models AtP is known to fail also where the metric saturates (a patch that
flips a confident prediction: a small gradient at the corrupt point, a large patched effect) and where attention
saturates (a near one-hot softmax has little gradient with respect to its queries and keys, so `attn.q/k`,
`attn.pattern` and the per-head inputs under-read; Kramar et al. 2024). Confirm the top-scored components with
an exact `patching_sweep` / `head_patching_sweep` / `path_patching_sweep`.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.func import vjp

from ..layers import layer_norm
from ..params import GPTParams
from .run import forward_with
from .sites import resolve_sites, site_dims
from .sweeps import Metric, _check_pair

__all__ = ["attribution_patching", "edge_attribution_patching", "EdgeScores", "attribution_dims"]

_SUMMED = ("d_model", "head_dim", "1")  # feature axes summed over; any other last axis is kept (neurons, keys)


def attribution_dims(site: str) -> str:
    """The axes of `attribution_patching`'s result at `site`: the site's axes less a summed feature axis."""
    axes = site_dims(site).split()
    return " ".join(axes[:-1] if axes[-1] in _SUMMED else axes)


def _grads_on_corrupt(params: GPTParams, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric,
                      grad_sites: Sequence[str], value_sites: Sequence[str], steps: int | None
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The passes every attribution shares: `(grads, clean, corrupt, along)`.

    - `clean`, `corrupt`: the values at `value_sites` on each prompt (the corrupt ones from the differentiated run).
    - `grads`: d metric / d value at each of `grad_sites` on the corrupt run (a zero added at the site, as in
      `site_grads`), `[points, batch, ...]`: one point, or with `steps` the inputs `embed_corrupt + k/steps
      (embed_clean - embed_corrupt)`, k = 0..steps-1, run as one batch of `steps x batch` rows, each point's
      gradient carrying its `1/steps` (so `.sum(0)` is the average). The metric is taken per block of `batch`
      rows, so per-example metrics keep their meaning.
    - `along`: the values at `grad_sites` on every row of that run, `[steps, batch, ...]` (`steps` 1 without IG).
    """
    batch = clean_ids.shape[0]
    k = 1 if steps is None else steps
    need_embed = steps is not None
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=[*value_sites, *(["embed"] if need_embed else [])])
    deltas: dict[str, Tensor] = {}

    def add_zero(site: str):  # d metric / d delta at delta = 0 is the gradient at the site, downstream recomputed
        def edit(x: Tensor) -> Tensor:
            deltas[site] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[site]
        return edit

    edits = {s: add_zero(s) for s in grad_sites}
    ids = corrupt_ids
    if need_embed:
        alpha = (torch.arange(k, device=clean_ids.device, dtype=clean["embed"].dtype) / k).repeat_interleave(batch)
        target = clean["embed"].repeat(k, 1, 1)
        inner = edits.get("embed")

        def interpolate(x: Tensor) -> Tensor:
            y = x + alpha[:, None, None] * (target - x)
            return y if inner is None else inner(y)
        edits["embed"] = interpolate
        ids = corrupt_ids.repeat(k, 1)
    with torch.enable_grad():
        logits, acts = forward_with(params, ids, capture=[*value_sites, *grad_sites], edit=edits)
        total = sum(metric(logits[i * batch:(i + 1) * batch]) for i in range(k)) / k
        if not isinstance(total, Tensor) or total.numel() != 1:
            raise ValueError("metric must map logits [batch, seq, vocab] to a scalar (e.g. logit_diff(...).mean()); "
                             f"got {type(total).__name__} of shape {list(getattr(total, 'shape', []))}")
        got = torch.autograd.grad(total.reshape(()), [deltas[s] for s in grad_sites], allow_unused=True)
    grads = {}
    for s, g in zip(grad_sites, got, strict=True):
        g = torch.zeros_like(deltas[s]) if g is None else g  # a site the metric does not read (e.g. after it)
        grads[s] = g.reshape(k, batch, *g.shape[1:]) if _batched(s, g) else g[None]
    along = {s: (v.reshape(k, batch, *v.shape[1:]) if _batched(s, v) else v[None])
             for s, v in ((s, acts[s].detach()) for s in grad_sites)}
    corrupt = {s: (v[:batch] if _batched(s, v) else v) for s, v in ((s, acts[s].detach()) for s in value_sites)}
    return grads, dict(clean), corrupt, along


def _batched(site: str, value: Tensor) -> bool:
    """Whether `value` has the batch axis (every site but `embed.pos` without explicit positions)."""
    return site != "embed.pos" or value.ndim == 3


def attribution_patching(params: GPTParams, clean_ids: Int[Tensor, "batch seq"],
                         corrupt_ids: Int[Tensor, "batch seq"], metric: Metric, sites: str | Iterable[str], *,
                         steps: int | None = None) -> dict[str, Tensor]:
    """AtP: the first-order estimate of patching each component of `sites` (names or glob patterns) from the
    clean run into the corrupt one, `grad_corrupt(metric) * (clean - corrupt)` summed over the feature axis.

    Returns `{site: attribution}` with the axes of `attribution_dims(site)` (e.g. `[batch, seq]` for
    `blocks.3.resid_pre`, `[batch, heads, seq]` for `blocks.3.attn.z`); summing a result over `batch` estimates
    `metric(patched) - metric(corrupt)` for a metric that averages (or sums) over the batch, the quantity
    `patching_sweep(...) - metric(corrupt)` measures. One clean forward, one corrupt forward and one backward,
    whatever the number of sites. `steps`: integrated gradients along the input embeddings (see
    `edge_attribution_patching`), `steps` times the batch in the one differentiated run.
    """
    names = resolve_sites(params.config, sites, what="attribution_patching")
    _check_pair(clean_ids, corrupt_ids)
    _check_steps(steps)
    grads, clean, corrupt, _ = _grads_on_corrupt(params, clean_ids, corrupt_ids, metric, names, names, steps)
    out = {}
    for s in names:
        product = grads[s].sum(0) * (clean[s] - corrupt[s])
        out[s] = product.sum(-1) if site_dims(s).split()[-1] in _SUMMED else product
    return out


def _check_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None (plain gradients) or an int >= 1 (integrated-gradient points); "
                         f"got {steps!r}")


class EdgeScores(NamedTuple):
    """Edge attributions: `scores[b, i, j]` estimates the change of the metric when the edge `senders[i] ->
    receivers[j]` alone carries the clean value on example `b` (the corrupt run otherwise).

    Names follow the EAP-IG library: senders `input` (the embeddings), `a{L}.h{H}` (head H of layer L, its
    `attn.result`), `m{L}` (MLP L's output); receivers `a{L}.h{H}<q>` / `<k>` / `<v>` (that head's query, key,
    value input), `m{L}` (MLP L's input) and `logits` (the final norm's input). `valid[i, j]`: the sender writes
    to the stream before the receiver reads it; scores of other pairs are 0."""

    scores: Float[Tensor, "batch senders receivers"]
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    valid: Bool[Tensor, "senders receivers"]

    def total(self) -> Float[Tensor, "senders receivers"]:
        """The scores summed over the batch."""
        return self.scores.sum(0)

    def top(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The `k` edges of largest |total score|, as `(sender, receiver, score)`, largest first."""
        total = self.total().masked_fill(~self.valid, 0)
        flat = total.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices.tolist()
        n = total.shape[1]
        return [(self.senders[i // n], self.receivers[i % n], float(flat[i])) for i in idx]


def _graph(n_layers: int, n_heads: int) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Senders and receivers as `(name, layer, order)`: a sender with order `w` reaches receivers with order
    `r > w` (stream points: 0 embeddings, 2L+1 after attention L, 2L+2 after MLP L; a head reads 2L, an MLP 2L+1)."""
    senders = [("input", -1, 0)]
    receivers = []
    for layer in range(n_layers):
        senders += [(f"a{layer}.h{h}", layer, 2 * layer + 1) for h in range(n_heads)]
        senders.append((f"m{layer}", layer, 2 * layer + 2))
        receivers += [(f"a{layer}.h{h}<{n}>", layer, 2 * layer + 1) for n in "qkv" for h in range(n_heads)]
        receivers.append((f"m{layer}", layer, 2 * layer + 2))
    receivers.append(("logits", n_layers, 2 * n_layers + 1))
    return senders, receivers


def edge_attribution_patching(params: GPTParams, clean_ids: Int[Tensor, "batch seq"],
                              corrupt_ids: Int[Tensor, "batch seq"], metric: Metric, *, steps: int | None = None
                              ) -> EdgeScores:
    """EAP: for every edge of the residual graph (`EdgeScores` names them), the sender's change `clean -
    corrupt` dotted with the gradient, on the corrupt run, of the metric with respect to the receiver's input,
    summed over positions and `d_model`. `steps` (EAP-IG): that gradient averaged over `steps` inputs on the line
    from the corrupt to the clean embeddings (`k/steps`, k = 0..steps-1; `steps=1` is plain EAP).

    The receivers' gradients come from the per-head input sites `attn.q_input/k_input/v_input`, the MLP's
    (`ln2`'s gradient through the layer norm at `resid_mid`) and the last residual stream: one clean forward,
    one (batched) corrupt forward and one backward for all edges.
    """
    cfg = params.config
    _check_pair(clean_ids, corrupt_ids)
    _check_steps(steps)
    n, heads = cfg.n_layers, cfg.n_heads
    outputs = ["embed", *(f"blocks.{i}.{s}" for i in range(n) for s in ("attn.result", "mlp.out"))]
    inputs = [*(f"blocks.{i}.attn.{q}_input" for i in range(n) for q in "qkv"),
              *(f"blocks.{i}.ln2" for i in range(n)), f"blocks.{n - 1}.resid_post"]
    mids = [f"blocks.{i}.resid_mid" for i in range(n)]
    grads, clean, corrupt, along = _grads_on_corrupt(params, clean_ids, corrupt_ids, metric, [*inputs, *mids],
                                                     outputs, steps)
    # what each sender writes: [batch seq senders d_model]
    change = [clean["embed"] - corrupt["embed"]]
    for i in range(n):
        change += list((clean[f"blocks.{i}.attn.result"] - corrupt[f"blocks.{i}.attn.result"]).unbind(2))
        change.append(clean[f"blocks.{i}.mlp.out"] - corrupt[f"blocks.{i}.mlp.out"])
    sent = torch.stack(change, 2)
    # what each receiver's input gradient is: [batch seq receivers d_model]
    read = []
    for i in range(n):
        for q in "qkv":
            read += list(grads[f"blocks.{i}.attn.{q}_input"].sum(0).unbind(1))
        read.append(_mlp_input_grad(params, i, grads, along))
    read.append(grads[f"blocks.{n - 1}.resid_post"].sum(0))
    received = torch.stack(read, 2)
    scores = torch.einsum("bsnd,bsrd->bnr", sent, received)
    senders, receivers = _graph(n, heads)
    order_s = torch.tensor([o for _, _, o in senders], device=scores.device)
    order_r = torch.tensor([o for _, _, o in receivers], device=scores.device)
    valid = order_s[:, None] < order_r[None, :]
    return EdgeScores(scores.masked_fill(~valid, 0), tuple(s for s, _, _ in senders),
                      tuple(r for r, _, _ in receivers), valid)


def _mlp_input_grad(params: GPTParams, layer: int, grads: dict[str, Tensor], along: dict[str, Tensor]) -> Tensor:
    """d metric / d (MLP `layer`'s input, the residual stream its norm reads): ln2's gradient pulled back through
    the layer norm at each point's `resid_mid`, summed over the points (each carries its 1/steps)."""
    norm, eps = params.blocks[layer].norm2, params.config.ln_eps
    mid, g = along[f"blocks.{layer}.resid_mid"], grads[f"blocks.{layer}.ln2"]  # [points, batch, seq, d_model]
    _, pull = vjp(lambda x: layer_norm(norm, x, eps=eps), mid)
    return pull(g)[0].sum(0)

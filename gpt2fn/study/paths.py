"""Path patching (Wang et al. 2022, the IOI circuit; Goldowsky-Dill et al. 2023): the effect of one component
(the sender: an attention head or an MLP) on some later components (the receivers) through the residual stream
directly, not through anything in between.

The recipe, for each sender:
1. run `clean_ids` and `corrupt_ids`;
2. run `clean_ids` with the sender's output taken from the corrupt run and every other head and MLP frozen to its
   clean output; record what each receiver reads from the residual stream there;
3. run `clean_ids` with the receivers' inputs replaced by what they read in step 2 (everything after them computed
   as usual) and record `metric(logits)`.

With everything else frozen, step 2's residual stream is the clean one plus the sender's change `corrupt output -
clean output`, so a receiver reads `f(clean stream + change)`; the batched sweep computes that directly and runs
step 3 for all senders as rows of one batch (`batched_runs`). `vectorize=False` runs steps 2 and 3 as written, with
`forward_with` edits, one sender at a time.

Receivers, by the site whose value is replaced (layer `i`):

| receiver                        | what receives the sender's change                                      |
|---------------------------------|------------------------------------------------------------------------|
| `blocks.{i}.attn.q` / `k` / `v` | the queries / keys / values of `heads` of layer i (`ln1` then `W_Q`..) |
| `blocks.{i}.ln1`                | all of layer i's attention input (every head's q, k and v)             |
| `blocks.{i}.ln2`                | MLP i's input                                                          |
| `blocks.{i}.resid_pre`, `resid_mid`, `resid_post` | the whole residual stream there (and so everything after) |

A head at layer L reaches receivers reading the stream after it (`resid_mid` of L and everything from `ln2` of L
on); an MLP at L those from `resid_post` of L (`resid_pre` of L + 1) on. A receiver the sender cannot reach reads its
clean value. A `resid_*` receiver replaces the whole stream there, so it overrides whatever earlier receivers
changed in it. Per-head receivers are recomputed as `ln1(resid_pre + change) @ W_Q[h] + b_Q[h]` and patched through
the `attn.q/k/v` sites, one head at a time (per-head residual-input sites, `attn.q_input` etc., would express the
same edit before `ln1`; these are not sites of this model yet).
"""

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from ..layers import _qkv, layer_norm
from ..params import GPTParams
from .run import forward_with
from .sweeps import Metric, RowEdit, _check_pair, _positions, _row_bytes, batched_runs, chunk_limit

__all__ = ["Sender", "Receiver", "path_patch", "path_patching_sweep", "RECEIVER_SITES"]

Sender = tuple[int, int] | tuple[int, Literal["mlp"]]
"""`(layer, head)` for an attention head, `(layer, "mlp")` for an MLP."""

RECEIVER_SITES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "ln1", "ln2", "resid_pre", "resid_mid",
                                   "resid_post")
"""The per-layer sites a path-patching receiver can name."""

# where each receiver reads the residual stream: stream point 2i (resid_pre of i), 2i + 1 (resid_mid), 2i + 2
_READS = {"attn.q": 0, "attn.k": 0, "attn.v": 0, "ln1": 0, "resid_pre": 0, "ln2": 1, "resid_mid": 1, "resid_post": 2}
_STREAM = {0: "resid_pre", 1: "resid_mid", 2: "resid_post"}


class Receiver(NamedTuple):
    """A path-patching receiver: the site `blocks.{i}.<one of RECEIVER_SITES>` whose input gets the sender's change;
    for `attn.q/k/v`, only `heads` (default: all heads of the layer)."""

    site: str
    heads: int | Sequence[int] | None = None


class _Target(NamedTuple):
    site: str
    layer: int
    kind: str
    point: int  # the stream point it reads
    heads: list[int] | None


def _targets(params: GPTParams, receivers: str | Receiver | Sequence[str | Receiver]) -> list[_Target]:
    cfg = params.config
    items = [receivers] if isinstance(receivers, (str, Receiver)) else list(receivers)
    if not items:
        raise ValueError("receivers is empty; name at least one, e.g. Receiver('blocks.1.attn.k', heads=[0])")
    out: list[_Target] = []
    for item in items:
        r = Receiver(item) if isinstance(item, str) else item
        parts = r.site.split(".")
        kind = ".".join(parts[2:])
        if (len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or kind not in _READS
                or int(parts[1]) >= cfg.n_layers):
            raise ValueError(f"receiver {r.site!r}: a receiver is blocks.{{i}}.<{', '.join(RECEIVER_SITES)}> with "
                             f"i in 0..{cfg.n_layers - 1}")
        heads = None
        if r.heads is not None:
            if kind not in ("attn.q", "attn.k", "attn.v"):
                raise ValueError(f"receiver {r.site!r} has heads={r.heads!r}; only attn.q/k/v receivers take heads")
            heads = [r.heads] if isinstance(r.heads, int) else list(r.heads)
            bad = [h for h in heads if not isinstance(h, int) or not 0 <= h < cfg.n_heads]
            if bad or not heads:
                raise ValueError(f"receiver {r.site!r}: heads {heads} must be ints in 0..{cfg.n_heads - 1}")
        layer = int(parts[1])
        same = next((i for i, t in enumerate(out) if t.site == r.site), None)
        if same is not None:  # one site named twice: its heads together (None: all of them)
            before = out[same].heads
            heads = None if heads is None or before is None else sorted({*before, *heads})
            out[same] = out[same]._replace(heads=heads)
        else:
            out.append(_Target(r.site, layer, kind, 2 * layer + _READS[kind], heads))
    return out


def _sender(params: GPTParams, sender: Sender) -> tuple[int, int | None]:
    """`(layer, head)`, head None for an MLP; or a ValueError naming the sender."""
    cfg = params.config
    ok = isinstance(sender, tuple) and len(sender) == 2 and isinstance(sender[0], int) and (
        0 <= sender[0] < cfg.n_layers) and (sender[1] == "mlp" or (
            isinstance(sender[1], int) and not isinstance(sender[1], bool) and 0 <= sender[1] < cfg.n_heads))
    if not ok:
        raise ValueError(f"sender {sender!r} must be (layer, head) with layer in 0..{cfg.n_layers - 1} and head in "
                         f"0..{cfg.n_heads - 1}, or (layer, 'mlp')")
    layer, head = sender
    return layer, None if head == "mlp" else head


def _writes(layer: int, head: int | None) -> int:
    """The first stream point that holds the sender's output."""
    return 2 * layer + (1 if head is not None else 2)


def path_patching_sweep(params: GPTParams, clean_ids: Int[Tensor, "batch seq"],
                        corrupt_ids: Int[Tensor, "batch seq"], metric: Metric, *,
                        receivers: str | Receiver | Sequence[str | Receiver], senders: Sequence[Sender] | None = None,
                        positions: Sequence[int] | None = None, vectorize: bool = True, chunk_size: int | None = None,
                        memory_limit: int | None = None) -> Tensor:
    """Path patching (see the module docstring) from each sender to `receivers`: `metric(logits)` of the clean
    run with only the path sender -> receivers carrying the sender's corrupt output.

    `senders`: `(layer, head)` / `(layer, "mlp")` pairs -> `[len(senders), *metric]`; default every head ->
    `[layer, head, *metric]` (a head that reaches no receiver gives the clean metric). `positions`: the sender's
    output is changed only there (default everywhere). `vectorize=False`: the recipe's two forwards per sender.
    `chunk_size` / `memory_limit` bound the senders run together (each holds its receivers' patched inputs).
    """
    cfg = params.config
    seq = _check_pair(clean_ids, corrupt_ids)
    targets = _targets(params, receivers)
    grid = senders is None
    chosen = [(i, h) for i in range(cfg.n_layers) for h in range(cfg.n_heads)] if grid else [
        _sender(params, s) for s in senders]  # type: ignore[union-attr]
    if not chosen:
        raise ValueError("senders is empty; pass (layer, head) or (layer, 'mlp') pairs, or None for every head")
    where = torch.zeros(seq, 1, dtype=torch.bool, device=clean_ids.device)
    where[_positions(positions, seq)] = True
    if vectorize:
        out = _batched(params, clean_ids, corrupt_ids, metric, targets, chosen, where, chunk_size, memory_limit)
    else:
        out = torch.stack([_two_step(params, clean_ids, corrupt_ids, metric, targets, s, where) for s in chosen])
    return out.reshape(cfg.n_layers, cfg.n_heads, *out.shape[1:]) if grid else out


def path_patch(params: GPTParams, clean_ids: Int[Tensor, "batch seq"], corrupt_ids: Int[Tensor, "batch seq"],
               metric: Metric, *, sender: Sender, receivers: str | Receiver | Sequence[str | Receiver],
               positions: Sequence[int] | None = None, vectorize: bool = True) -> Tensor:
    """`metric(logits)` of one path-patched run: `sender`'s corrupt output reaching only `receivers` (see
    `path_patching_sweep`). A sender that reaches none of the receivers raises a ValueError."""
    layer, head = _sender(params, sender)
    if all(t.point < _writes(layer, head) for t in _targets(params, receivers)):
        raise ValueError(f"sender {sender!r} writes to the residual stream after every receiver reads it; a "
                         "receiver must sit after the sender (a later layer, or ln2/resid_mid of a head's layer)")
    return path_patching_sweep(params, clean_ids, corrupt_ids, metric, senders=[sender], receivers=receivers,
                               positions=positions, vectorize=vectorize)[0]


def _output_sites(layer: int, head: int | None) -> str:
    return f"blocks.{layer}.attn.result" if head is not None else f"blocks.{layer}.mlp.out"


def _change(clean: dict[str, Tensor], corrupt: dict[str, Tensor], layer: int, head: int | None,
            where: Tensor) -> Tensor:
    """The sender's corrupt output minus its clean output, `[batch seq d_model]`, zero outside `where`."""
    site = _output_sites(layer, head)
    c, d = clean[site], corrupt[site]
    if head is not None:
        c, d = c[:, :, head], d[:, :, head]
    return torch.where(where, d - c, torch.zeros((), dtype=c.dtype, device=c.device))


def _received(params: GPTParams, t: _Target, stream: Tensor) -> Tensor:
    """What receiver `t` computes from the residual stream `stream` it reads: the value at its site."""
    cfg = params.config
    bp = params.blocks[t.layer]
    if t.kind.startswith("resid"):
        return stream
    if t.kind == "ln2":
        return layer_norm(bp.norm2, stream, eps=cfg.ln_eps)
    h = layer_norm(bp.norm1, stream, eps=cfg.ln_eps)
    if t.kind == "ln1":
        return h
    q, k, v = _qkv(bp.attn, h, cfg.n_heads)
    return {"attn.q": q, "attn.k": k, "attn.v": v}[t.kind]


def _mask(params: GPTParams, t: _Target, device: torch.device) -> Tensor:
    if t.kind.startswith("attn."):  # [heads, 1, 1] against [batch heads seq head_dim]
        m = torch.zeros(params.config.n_heads, 1, 1, dtype=torch.bool, device=device)
        m[t.heads if t.heads is not None else slice(None)] = True
        return m
    return torch.ones(1, dtype=torch.bool, device=device)


def _stream_site(t: _Target) -> str:
    """The residual-stream site holding what receiver `t` reads."""
    return f"blocks.{t.layer}.{_STREAM[_READS[t.kind]]}"


def _batched(params: GPTParams, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric, targets: list[_Target],
             senders: list[tuple[int, int | None]], where: Tensor, chunk_size: int | None,
             memory_limit: int | None) -> Tensor:
    cfg = params.config
    outputs = sorted({_output_sites(i, h) for i, h in senders})
    streams = sorted({_stream_site(t) for t in targets})
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=[*outputs, *streams])
        _, corrupt = forward_with(params, corrupt_ids, capture=outputs)
    batch, seq = clean_ids.shape
    # each row holds its receivers' patched values (one [batch seq d_model] each) besides the run itself
    per_row = _row_bytes(params, batch, seq, False) + len(targets) * batch * seq * cfg.emb_dim * \
        params.compute_dtype.itemsize
    limit = chunk_limit(len(senders), per_row, chunk_size, memory_limit, unit="sender",
                        shape=f"batch {batch} x seq {seq}, {len(targets)} receivers",
                        fewer="fewer tokens or receivers")
    masks = [_mask(params, t, clean_ids.device) for t in targets]
    out = []
    with torch.no_grad():
        for c in range(0, len(senders), limit):
            rows = []
            for layer, head in senders[c:c + limit]:
                change = _change(clean, corrupt, layer, head, where)
                reach = _writes(layer, head)
                rows.append([RowEdit(t.site, m, _received(params, t, clean[_stream_site(t)] + change))
                             for t, m in zip(targets, masks, strict=True) if t.point >= reach])
            out.append(batched_runs(params, clean_ids, rows, metric, chunk_size=len(rows)))
    return torch.cat(out)


def _two_step(params: GPTParams, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric, targets: list[_Target],
              sender: tuple[int, int | None], where: Tensor) -> Tensor:
    """Steps 2 and 3 of the recipe as written: a forward with everything frozen but the sender, then one with the
    receivers' inputs patched."""
    cfg = params.config
    layer, head = sender
    frozen = [f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ("attn.z", "mlp.out")]
    with torch.no_grad():
        _, clean = forward_with(params, clean_ids, capture=frozen)
        _, corrupt = forward_with(params, corrupt_ids, capture=frozen)
        heads = torch.zeros(cfg.n_heads, 1, 1, dtype=torch.bool, device=clean_ids.device)
        edits = {}
        for site in frozen:  # every head and MLP at its clean output, the sender at its corrupt one (at `where`)
            if site == f"blocks.{layer}.attn.z" and head is not None:
                sel = heads.index_fill(0, torch.tensor([head], device=heads.device), True) & where
            elif site == f"blocks.{layer}.mlp.out" and head is None:
                sel = where
            else:
                sel = torch.zeros((), dtype=torch.bool, device=clean_ids.device)
            edits[site] = (lambda x, s=site, m=sel: torch.where(m, corrupt[s], clean[s]))
        _, step2 = forward_with(params, clean_ids, capture=[t.site for t in targets], edit=edits)
        patched = {t.site: (lambda x, t=t: torch.where(_mask(params, t, x.device), step2[t.site], x))
                   for t in targets}
        return metric(forward_with(params, clean_ids, edit=patched)[0])


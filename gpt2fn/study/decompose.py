"""The residual stream taken apart: pure functions over the parameters and captured `Activations`, after
TransformerLens's `ActivationCache.accumulated_resid`, `decompose_resid`, `stack_head_results`,
`stack_neuron_results`, `apply_ln_to_stack` and `logit_attrs`.

    _, acts = run_for_decompose(params, ids)          # = run_with_capture(params, ids, DECOMPOSE_SITES)
    parts = decompose_resid(params, acts)             # embed.tok, embed.pos, each attn.out and mlp.out
    parts.total()                                     # == acts["blocks.{n-1}.resid_post"]: they sum to the stream
    normed = apply_ln_to_stack(params, parts, acts)   # frozen final-norm scale: sums to acts["final_norm.normalized"]
    dla = logit_attribution(params, normed, good, bad)                  # [component, batch, pos]
    dla = decompose_logit(params, acts, good, bad, neurons=True)        # per neuron, chunked, + final_norm.shift

A *point* of the residual stream is where a layer norm reads it: `layer` L in 0..n_layers is the stream entering
block L (`blocks.{L}.resid_pre`, read by its `ln1`); L = n_layers (or -1, or None, the default) is the stream after
the last block (read by `final_norm`); with `mlp_input=True` it is the stream entering block L's MLP
(`blocks.{L}.resid_mid`, read by its `ln2`). A decomposition at a point holds what was written before it: the
embeddings, the attention outputs of blocks < L (<= L with `mlp_input`) and the MLP outputs of blocks < L.

Component labels are site names (`embed.tok`, `blocks.3.attn.out`, `blocks.3.resid_pre`) or parts of one:
`blocks.3.attn.head7` (head 7's write, `attn.result[:, :, 7]`), `blocks.3.attn.bias` (`b_out`), `blocks.3.mlp`
(`mlp.out - b_proj`), `blocks.3.mlp.neuron42` (`mlp.post[..., 42] * w_proj[42]`), `blocks.3.mlp.rest` (the
neurons not selected), `blocks.3.mlp.bias` (`b_proj`), `remainder` (the stream minus the stack) and
`final_norm.shift` (the final norm's bias through the unembedding). An absent bias is a component of zeros, so a
stack's layout depends on the options, never on the checkpoint.

The decompositions assume an unedited run without dropout (an edit or dropout breaks the sums they are tested on).
Which sites each function reads is in its docstring; a missing one is a ValueError naming it.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..model import _out_of_range
from ..params import GPTParams, _Record, head_matrix, record, static
from ..quantize import refuse_quantized
from ..shapes import checked
from .run import forward_with
from .sites import site_dims

__all__ = ["Components", "DECOMPOSE_SITES", "run_for_decompose", "accumulated_resid", "decompose_resid",
           "stack_head_results", "stack_neuron_results", "apply_ln_to_stack", "logit_attribution",
           "decompose_logit"]

DECOMPOSE_SITES: tuple[str, ...] = (
    "embed.tok", "embed.pos", "blocks.*.resid_pre", "blocks.*.ln1.scale", "blocks.*.attn.z", "blocks.*.attn.out",
    "blocks.*.resid_mid", "blocks.*.ln2.scale", "blocks.*.mlp.post", "blocks.*.mlp.out", "blocks.*.resid_post",
    "final_norm.scale",
)
"""Every site the functions of this module read (head writes come from `attn.z` and `w_out`, so the larger
`attn.result` is not needed; a captured `attn.result` is used where present)."""

MODES = ("all", "attn", "mlp")
Pos = int | Sequence[int] | slice | None
Neurons = bool | Sequence[int] | Tensor | Mapping[int, Sequence[int] | Tensor] | None
Tokens = int | Int[Tensor, "*token_shape"]  # one id, [batch] or [batch, pos]: checked against the stack


@record
class Components(_Record):
    """Parts of the residual stream (or their logit attributions) stacked on a leading `component` axis.

    - `stack`: `[component, batch, *pos, d_model]`; `[component, batch, *pos]` for logit attributions. `*pos` is
      the positions kept: all (`pos=None`), some (a list), or none when one position was chosen (`pos=-1`).
    - `labels`: one name per component (see the module docstring).
    - `norm`: the layer norm that reads the point (`final_norm`, `blocks.{i}.ln1`, `blocks.{i}.ln2`), whose
      captured scale `apply_ln_to_stack` divides by.
    - `pos`: the positions kept, normalised: None (all), an int (one; its axis dropped) or a tuple of ints.
    - `space`: `"resid"` (as written into the stream), `"normalized"` (centred and divided by the frozen scale:
      the layer norm's input side of its affine map) or `"logit"` (attributions to a logit or logit difference).

    Only `stack` is a pytree child; the rest is metadata, so `tree_map` moves or casts the stack alone.
    """

    stack: Tensor
    labels: tuple[str, ...] = static()
    norm: str = static()
    pos: int | tuple[int, ...] | None = static()
    space: str = static()

    def __len__(self) -> int:
        return len(self.labels)

    def total(self) -> Tensor:
        """The sum over components: the residual stream at the point (`"resid"`), the norm's normalised value
        (`"normalized"`) or the logit (difference) (`"logit"`), when the stack is a full decomposition."""
        return self.stack.sum(0)

    def named(self) -> dict[str, Tensor]:
        """`{label: component}` in stack order."""
        return dict(zip(self.labels, self.stack.unbind(0), strict=True))

    def _repr_html_(self) -> str:
        """Logit attributions of one position as signed bars (example 0 of the batch); other stacks as the tree."""
        if self.space == "logit" and self.stack.ndim == 2 and self.stack.device.type != "meta":
            from ..html import bars

            return bars(self.labels, self.stack[:, 0], title=f"logit attribution (read by {self.norm})", sort=True,
                        top=40, note=f"{len(self.labels)} components, example 0 of {self.stack.shape[1]}; total "
                                     f"{float(self.stack[:, 0].sum()):.4g}")._repr_html_()
        return super()._repr_html_()

    def __repr__(self) -> str:
        shown = ", ".join(self.labels[:4]) + (f", ... ({len(self.labels)})" if len(self.labels) > 4 else "")
        return (f"Components({self.space}, {list(self.stack.shape)}, read by {self.norm}, pos={self.pos}, "
                f"labels=[{shown}])")


def run_for_decompose(params: GPTParams, ids: Int[Tensor, "batch seq"], **forward_kwargs: Any
                      ) -> tuple[Any, Mapping[str, Tensor]]:
    """`(logits, acts)` with every site this module reads captured: `run_with_capture(params, ids,
    DECOMPOSE_SITES)`. Capturing them changes no logits (they stay on fused attention)."""
    return forward_with(params, ids, capture=DECOMPOSE_SITES, **forward_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Points, positions, sites


class _Point:
    """A point of the stream: what was written before it and which norm reads it."""

    def __init__(self, params: GPTParams, layer: int | None, mlp_input: bool, fn: str) -> None:
        n = params.config.n_layers
        if layer is None:
            layer = n
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(n + 1) <= layer <= n:
            raise ValueError(f"{fn}: layer must be None or an int in 0..{n} (the stream entering that block; {n}, "
                             f"-1 or None: after the last block, read by the final norm); got {layer!r}")
        layer = layer + n + 1 if layer < 0 else layer
        if mlp_input and layer == n:
            raise ValueError(f"{fn}: mlp_input=True is the stream entering a block's MLP, so layer must be in "
                             f"0..{n - 1}; got {layer} (after the last block there is no MLP)")
        self.layer, self.mlp_input = layer, mlp_input
        self.attn_layers = layer + 1 if mlp_input else layer  # attention outputs written before the point
        self.mlp_layers = layer
        if mlp_input:
            self.norm, self.resid = f"blocks.{layer}.ln2", (f"blocks.{layer}.resid_mid",)
        elif layer == n:
            self.norm, self.resid = "final_norm", (f"blocks.{n - 1}.resid_post",)
        else:
            self.norm = f"blocks.{layer}.ln1"
            self.resid = (f"blocks.{layer}.resid_pre", "embed" if layer == 0 else f"blocks.{layer - 1}.resid_post")

    @classmethod
    def of_norm(cls, params: GPTParams, norm: str, fn: str) -> "_Point":
        if norm == "final_norm":
            return cls(params, None, False, fn)
        _, layer, which = norm.split(".")
        return cls(params, int(layer), which == "ln2", fn)


def _get(acts: Mapping[str, Tensor], names: str | Sequence[str], fn: str) -> Tensor:
    """`acts[name]` for the first of `names` held, or a ValueError naming the site and how to capture it."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name in acts:
            return acts[name]
    alt = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    held = list(acts)
    shown = ", ".join(held[:6]) + (f", ... ({len(held)} sites)" if len(held) > 6 else "") if held else "nothing"
    raise ValueError(f"{fn} needs site {names[0]!r}{alt}, which acts does not hold (it holds {shown}). Capture it: "
                     f"run_with_capture(params, ids, [{names[0]!r}, ...]), or run_for_decompose(params, ids) for "
                     "every site gpt2fn.study.decompose reads")


def _check_acts(acts: Any, fn: str) -> None:
    if not isinstance(acts, Mapping):
        raise TypeError(f"{fn}: acts must be the Activations of a run (run_for_decompose(params, ids)[1]) or a "
                        f"mapping site -> tensor; got {type(acts).__name__}")


def _batch_seq(acts: Mapping[str, Tensor], fn: str) -> tuple[int, int]:
    """The batch size and sequence length of a capture, read from any site that has both axes."""
    for site, value in acts.items():
        try:
            dims = site_dims(site).split()
        except ValueError:
            continue
        if dims[0] == "batch" and "seq" in dims:
            return value.shape[0], value.shape[dims.index("seq")]
    raise ValueError(f"{fn}: acts holds no site with batch and seq axes; capture with run_for_decompose(params, ids)")


def _positions(pos: Pos, seq: int, fn: str) -> int | tuple[int, ...] | None:
    if pos is None:
        return None
    if isinstance(pos, slice):
        return tuple(range(seq)[pos])
    if isinstance(pos, Tensor):
        pos = pos.flatten().tolist() if pos.ndim else int(pos)
    index = [pos] if isinstance(pos, int) else list(pos)
    bad = [p for p in index if not isinstance(p, int) or isinstance(p, bool) or not -seq <= p < seq]
    if bad:
        raise ValueError(f"{fn}: pos {bad} out of range for seq = {seq} (valid -{seq}..{seq - 1}; an int keeps one "
                         "position and drops its axis, a list or slice keeps several)")
    return pos % seq if isinstance(pos, int) else tuple(p % seq for p in index)


def _at(value: Tensor, pos: int | tuple[int, ...] | None, axis: int = -2) -> Tensor:
    """`value` at the kept positions along its positions axis (`axis`)."""
    if pos is None:
        return value
    if isinstance(pos, int):
        return value.select(axis, pos)
    return value.index_select(axis % value.ndim, torch.tensor(pos, dtype=torch.long, device=value.device))


def _scale(params: GPTParams, acts: Mapping[str, Tensor], point: _Point, pos: Any, fn: str) -> Tensor:
    """The frozen scale sqrt(var + eps) `[batch, *pos, 1]` of the norm at `point`: the captured `{norm}.scale`,
    else computed from the captured stream at the point (the same number for an unedited run)."""
    site = f"{point.norm}.scale"
    if site in acts:
        return _at(acts[site], pos)
    x = _get(acts, (site, *point.resid), fn)  # the stream at the point; the error names the scale first
    centred = x - x.mean(-1, keepdim=True)
    return _at((centred.pow(2).mean(-1, keepdim=True) + params.config.ln_eps).sqrt(), pos)


# ---------------------------------------------------------------------------------------------------------------
# Parts: (labels, make) pairs; `make()` gives `[len(labels), batch, *pos, d_model]`. Built lazily so that
# `decompose_logit` holds one part (at most `chunk_size` neurons) at a time.

Part = tuple[list[str], Callable[[], Tensor]]


def _neuron_index(params: GPTParams, neurons: Neurons, layer: int, fn: str) -> list[int] | None:
    """The neurons of `layer` to split out: None for no split, else a list without repeats (all for `True`)."""
    m = params.config.d_mlp
    if neurons is None or neurons is False:
        return None
    if neurons is True:
        return list(range(m))
    if isinstance(neurons, Mapping):
        bad = [k for k in neurons if not isinstance(k, int) or not 0 <= k < params.config.n_layers]
        if bad:
            raise ValueError(f"{fn}: neurons maps layers {bad}; layers are 0..{params.config.n_layers - 1}")
        chosen = neurons.get(layer, [])
    else:
        chosen = neurons
    index = chosen.flatten().tolist() if isinstance(chosen, Tensor) else list(chosen)
    bad = [n for n in index if not isinstance(n, int) or isinstance(n, bool) or not -m <= n < m]
    if bad:
        raise ValueError(f"{fn}: neurons {bad} out of range: each MLP has d_mlp = {m} neurons (0..{m - 1})")
    return list(dict.fromkeys(n % m for n in index))  # each neuron once, in the order given


def _parts(params: GPTParams, acts: Mapping[str, Tensor], point: _Point, pos: Any, fn: str, *, mode: str = "all",
           incl_embeds: bool = True, heads: bool = False, neurons: Neurons = False, split_biases: bool = False,
           biases: bool = True, rest: bool = True, chunk_size: int | None = None) -> Iterator[Part]:
    """The components written before `point`, lazily. `heads`/`neurons` split attention/MLP outputs (their biases
    then separate); `biases=False` leaves the bias parts out and `rest=False` the unselected neurons (stacks that
    need not sum to the stream)."""
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    cfg = params.config
    batch, seq = _batch_seq(acts, fn)
    shape = (batch, *(() if isinstance(pos, int) else (seq if pos is None else len(pos),)), cfg.emb_dim)

    def bias(b: Tensor | None) -> Tensor:
        if b is None:
            return torch.zeros(1, *shape, dtype=params.dtype, device=params.device)
        return b.expand(1, *shape)

    def site(name: str | Sequence[str]) -> Callable[[], Tensor]:
        return lambda: _at(_get(acts, name, fn), pos).expand(shape)[None]

    if incl_embeds:
        yield ["embed.tok"], site("embed.tok")
        yield ["embed.pos"], site("embed.pos")  # [seq d_model] without a batch axis: expanded
    for i in range(max(point.attn_layers, point.mlp_layers)):
        bp, pre = params.blocks[i], f"blocks.{i}"
        if mode != "mlp" and i < point.attn_layers:
            b_out = bp.attn.b_out
            if heads:
                yield [f"{pre}.attn.head{h}" for h in range(cfg.n_heads)], lambda i=i: _head_writes(params, acts, i,
                                                                                                    pos, fn)
            elif split_biases:
                yield [f"{pre}.attn"], lambda i=i, b=b_out: site(f"blocks.{i}.attn.out")() - (0 if b is None else b)
            else:
                yield [f"{pre}.attn.out"], site(f"{pre}.attn.out")
            if (heads or split_biases) and biases:
                yield [f"{pre}.attn.bias"], lambda b=b_out: bias(b)
        if mode != "attn" and i < point.mlp_layers:
            b_proj = bp.mlp.b_proj
            index = _neuron_index(params, neurons, i, fn)
            if index is not None:
                step = chunk_size or max(len(index), 1)
                for lo in range(0, len(index), step):
                    chunk = index[lo:lo + step]
                    yield ([f"{pre}.mlp.neuron{n}" for n in chunk],
                           lambda i=i, chunk=chunk: _neuron_writes(params, acts, i, chunk, pos, fn))
                others = sorted(set(range(cfg.d_mlp)) - set(index))
                if rest and others:
                    yield [f"{pre}.mlp.rest"], lambda i=i, others=others: _neuron_writes(
                        params, acts, i, others, pos, fn, summed=True)
            elif split_biases:
                yield [f"{pre}.mlp"], lambda i=i, b=b_proj: site(f"blocks.{i}.mlp.out")() - (0 if b is None else b)
            else:
                yield [f"{pre}.mlp.out"], site(f"{pre}.mlp.out")
            if (index is not None or split_biases) and biases:
                yield [f"{pre}.mlp.bias"], lambda b=b_proj: bias(b)


def _head_writes(params: GPTParams, acts: Mapping[str, Tensor], layer: int, pos: Any, fn: str) -> Tensor:
    """Each head's write into the stream, `[heads, batch, *pos, d_model]`: the captured `attn.result`, else
    `z[:, h] @ w_out[h*head_dim:(h+1)*head_dim]` from the captured `attn.z`."""
    cfg = params.config
    result = f"blocks.{layer}.attn.result"
    if result in acts:
        return _at(acts[result], pos, axis=1).movedim(-2, 0)  # [batch seq heads d] -> [heads batch *pos d]
    z = _at(_get(acts, (f"blocks.{layer}.attn.z", result), fn), pos)  # [batch heads *pos head_dim]
    refuse_quantized(params, "the decomposition of head writes")
    w_o = params.blocks[layer].attn.w_out.view(cfg.n_heads, cfg.head_dim, cfg.emb_dim).to(z.dtype)
    return torch.einsum("bh...e,hed->hb...d", z, w_o)


def _neuron_writes(params: GPTParams, acts: Mapping[str, Tensor], layer: int, index: list[int], pos: Any, fn: str,
                   *, summed: bool = False) -> Tensor:
    """Neuron n's write `mlp.post[..., n] * w_proj[n]` for each n in `index`, `[len(index), batch, *pos,
    d_model]` (`summed`: their sum, `[1, batch, *pos, d_model]`)."""
    post = _at(_get(acts, f"blocks.{layer}.mlp.post", fn), pos)  # [batch *pos d_mlp]
    rows = torch.tensor(index, dtype=torch.long, device=post.device)
    refuse_quantized(params, "the decomposition of neuron writes")
    post, w = post.index_select(-1, rows), params.blocks[layer].mlp.w_proj.index_select(0, rows).to(post.dtype)
    if summed:
        return (post @ w)[None]
    return torch.einsum("...k,kd->k...d", post, w)


def _build(parts: Iterator[Part]) -> tuple[Tensor, tuple[str, ...]]:
    labels: list[str] = []
    values: list[Tensor] = []
    for names, make in parts:
        labels += names
        values.append(make())
    if not values:
        raise ValueError("nothing to stack: these options select no component (e.g. layer=0 with "
                         "incl_embeds=False has nothing written before it)")
    return torch.cat(values), tuple(labels)


def _finish(params: GPTParams, acts: Mapping[str, Tensor], stack: Tensor, labels: tuple[str, ...], point: _Point,
            pos: Any, *, incl_remainder: bool, apply_ln: bool, fn: str) -> "Components":
    if incl_remainder:
        resid = _at(_get(acts, point.resid, fn), pos)
        stack = torch.cat([stack, (resid - stack.sum(0))[None]])
        labels = (*labels, "remainder")
    out = Components(stack, labels, point.norm, pos, "resid")
    return apply_ln_to_stack(params, out, acts) if apply_ln else out


# ---------------------------------------------------------------------------------------------------------------
# The decompositions


def accumulated_resid(params: GPTParams, acts: Mapping[str, Tensor], layer: int | None = None, *,
                      incl_mid: bool = False, mlp_input: bool = False, apply_ln: bool = False, pos: Pos = None
                      ) -> Components:
    """The residual stream at each block boundary up to the point `layer`: `blocks.{l}.resid_pre` for l = 0..layer
    (the last one after the final block, `blocks.{n-1}.resid_post`, when layer is n_layers/-1/None), with
    `incl_mid` also each `blocks.{l}.resid_mid` for l < layer, with `mlp_input` also layer's own `resid_mid`.
    Labels are those site names. `[component, batch, *pos, d_model]`.

    `apply_ln` normalises each row with its own scale, the one its own norm used in the run (`ln1`, `ln2` or
    `final_norm`'s `.scale`, else computed from the row): each row becomes that norm's `normalized` value, and
    `logit_attribution` of it is the logit lens without the final shift. Each row is a whole stream, so its own
    scale is the meaningful one. (TransformerLens 4.3 applies `ln_final` with its gain and shift to each row when
    `layer` is the last point and the point's frozen scale otherwise; for the frozen scale of one point on every
    row use `apply_ln_to_stack(params, accumulated_resid(...), acts)`.) Reads `resid_pre`/`resid_mid`/
    `resid_post` (`embed` or the previous `resid_post` stand in for a `resid_pre`).
    """
    fn = "accumulated_resid"
    _check_acts(acts, fn)
    point = _Point(params, layer, mlp_input, fn)
    pos = _positions(pos, _batch_seq(acts, fn)[1], fn)
    rows: list[_Point] = []
    for i in range(point.layer + 1):
        rows.append(_Point(params, i, False, fn))
        if (incl_mid and i < point.layer) or (mlp_input and i == point.layer):
            rows.append(_Point(params, i, True, fn))
    labels = tuple(r.resid[0] for r in rows)
    values = [_at(_get(acts, r.resid, fn), pos) for r in rows]
    if not apply_ln:
        return Components(torch.stack(values), labels, point.norm, pos, "resid")
    values = [_normalize(v, _scale(params, acts, r, pos, fn)) for v, r in zip(values, rows, strict=True)]
    return Components(torch.stack(values), labels, point.norm, pos, "normalized")


def decompose_resid(params: GPTParams, acts: Mapping[str, Tensor], layer: int | None = None, *, mode: str = "all",
                    mlp_input: bool = False, incl_embeds: bool = True, heads: bool = False, neurons: Neurons = False,
                    split_biases: bool = False, apply_ln: bool = False, pos: Pos = None) -> Components:
    """The residual stream at the point `layer` split into what wrote it: `embed.tok`, `embed.pos` (unless
    `incl_embeds=False`), then per block each `attn.out` and `mlp.out` written before the point (`mode="attn"` or
    `"mlp"`: only those). With `mode="all"` and the embeddings the components sum to the stream there
    (`blocks.{layer}.resid_pre`). `[component, batch, *pos, d_model]`.

    Finer splits, still summing to the stream: `heads=True` splits each attention output into its heads'
    writes plus `attn.bias`; `neurons=True` (or neuron indices for every layer, or `{layer: indices}`) splits each
    MLP output into neurons (`mlp.post[..., n] * w_proj[n]`), `mlp.rest` (the others, if any) and `mlp.bias`; a neuron
    stack is `[layers * d_mlp, batch, *pos, d_model]` -- restrict `neurons`/`pos`, or let `decompose_logit` reduce
    it chunk by chunk. `split_biases=True` separates the biases of unsplit outputs (`blocks.{i}.attn`,
    `.attn.bias`, `.mlp`, `.mlp.bias`). `apply_ln` applies the point's norm with its frozen scale.

    Reads `embed.tok`, `embed.pos`, `attn.out`, `mlp.out`; with `heads` `attn.z` (or `attn.result`), with
    `neurons` `mlp.post`.
    """
    fn = "decompose_resid"
    _check_acts(acts, fn)
    point = _Point(params, layer, mlp_input, fn)
    pos = _positions(pos, _batch_seq(acts, fn)[1], fn)
    stack, labels = _build(_parts(params, acts, point, pos, fn, mode=mode, incl_embeds=incl_embeds, heads=heads,
                                  neurons=neurons, split_biases=split_biases))
    return _finish(params, acts, stack, labels, point, pos, incl_remainder=False, apply_ln=apply_ln, fn=fn)


def stack_head_results(params: GPTParams, acts: Mapping[str, Tensor], layer: int | None = None, *,
                       mlp_input: bool = False, incl_biases: bool = False, incl_remainder: bool = False,
                       apply_ln: bool = False, pos: Pos = None) -> Components:
    """Every head's write into the stream before the point `layer` (blocks < layer; <= layer with `mlp_input`),
    `[layers * heads, batch, *pos, d_model]`, labelled `blocks.{i}.attn.head{h}`. `incl_biases` adds each block's
    `attn.bias` (`b_out`: heads plus it sum to `attn.out`); `incl_remainder` adds the stream minus the stack, so
    the components sum to the stream at the point. Reads `attn.z` (or `attn.result`).
    """
    fn = "stack_head_results"
    _check_acts(acts, fn)
    point = _Point(params, layer, mlp_input, fn)
    pos = _positions(pos, _batch_seq(acts, fn)[1], fn)
    stack, labels = _build(_parts(params, acts, point, pos, fn, mode="attn", incl_embeds=False, heads=True,
                                  biases=incl_biases))
    return _finish(params, acts, stack, labels, point, pos, incl_remainder=incl_remainder, apply_ln=apply_ln, fn=fn)


def stack_neuron_results(params: GPTParams, acts: Mapping[str, Tensor], layer: int | None = None, *,
                         neurons: Neurons = None, mlp_input: bool = False, incl_biases: bool = False,
                         incl_remainder: bool = False, apply_ln: bool = False, pos: Pos = None) -> Components:
    """Every neuron's write `mlp.post[..., n] * w_proj[n]` in the blocks before the point `layer`, labelled
    `blocks.{i}.mlp.neuron{n}`: `[layers * d_mlp, batch, *pos, d_model]`, or fewer with `neurons` (indices for
    every layer, or `{layer: indices}`). That is `batch * seq * d_model` floats per neuron (113 MB a token for
    GPT-2 124M): restrict `neurons`/`pos`, or reduce chunk by chunk with `decompose_logit(neurons=True)`.

    `incl_biases` adds each block's `mlp.bias` (`b_proj`: all neurons plus it sum to `mlp.out`); `incl_remainder`
    adds the stream minus the stack (the stack then sums to the stream). Reads `mlp.post`.
    """
    fn = "stack_neuron_results"
    _check_acts(acts, fn)
    point = _Point(params, layer, mlp_input, fn)
    pos = _positions(pos, _batch_seq(acts, fn)[1], fn)
    stack, labels = _build(_parts(params, acts, point, pos, fn, mode="mlp", incl_embeds=False,
                                  neurons=True if neurons is None else neurons, biases=incl_biases, rest=False))
    return _finish(params, acts, stack, labels, point, pos, incl_remainder=incl_remainder, apply_ln=apply_ln, fn=fn)


# ---------------------------------------------------------------------------------------------------------------
# Through the layer norm and the unembedding


def _normalize(stack: Tensor, scale: Tensor) -> Tensor:
    return (stack - stack.mean(-1, keepdim=True)) / scale


@checked
def apply_ln_to_stack(params: GPTParams, stack: Components | Float[Tensor, "component batch *pos d_model"],
                      acts: Mapping[str, Tensor], layer: int | None = None, *, mlp_input: bool = False,
                      pos: Pos = None) -> Components | Float[Tensor, "component batch *pos d_model"]:
    """A layer norm applied to each component with its scale frozen at the run's value: centre each component
    (subtract its mean over d_model), divide by the captured `{norm}.scale` (sqrt(var + eps) of the whole stream).
    The norm is linear once its scale is frozen, so the results sum to the norm's `normalized` value when the
    stack sums to the stream; the affine map (`* scale + shift` of the norm's parameters) is left to the caller,
    as in TransformerLens (`logit_attribution` applies the final norm's).

    - `stack`: `Components` (from this module; its own norm and positions are used, `layer` overrides the norm)
      or a tensor `[component, batch, *pos, d_model]` with `layer`/`mlp_input` naming the point (default: the final
      norm) and `pos` the positions it holds (as given to the function that made it).
    - Reads `{norm}.scale` (e.g. `final_norm.scale`, `blocks.3.ln1.scale`), else the stream at the point.
    """
    fn = "apply_ln_to_stack"
    _check_acts(acts, fn)
    if isinstance(stack, Components):
        if stack.space != "resid":
            raise ValueError(f"{fn}: the stack is already {stack.space!r}; apply the norm once, to a 'resid' stack")
        if pos is not None:
            raise ValueError(f"{fn}: a Components stack carries its positions (pos={stack.pos}); drop pos=")
        point = _Point(params, layer, mlp_input, fn) if layer is not None or mlp_input else _Point.of_norm(
            params, stack.norm, fn)
        values = _normalize(stack.stack, _scale(params, acts, point, stack.pos, fn))
        return Components(values, stack.labels, point.norm, stack.pos, "normalized")
    point = _Point(params, layer, mlp_input, fn)
    return _normalize(stack, _scale(params, acts, point, _positions(pos, _batch_seq(acts, fn)[1], fn), fn))


def _directions(params: GPTParams, tokens: Tokens, incorrect: Tokens | None, fn: str) -> tuple[Tensor, Tensor]:
    """`(W_U[:, tokens] - W_U[:, incorrect])` and the same through the final norm's gain, each `[*token_shape,
    d_model]`."""
    unembed = head_matrix(params)  # [d_model vocab]
    vocab = unembed.shape[-1]

    def column(t: Tokens, name: str) -> Tensor:
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < vocab:
                raise ValueError(f"{fn}: {name} {t} outside the vocabulary [0, {vocab})")
            return unembed[:, t]
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be a token id (int) or an integer tensor [batch] / [batch, pos]; "
                            f"got {type(t).__name__}{'' if not isinstance(t, Tensor) else ' ' + str(t.dtype)}")
        bad = _out_of_range(t, 0, vocab)
        if bad is not None:
            raise ValueError(f"{fn}: {name} hold {bad[1]} at {bad[0]}, outside the vocabulary [0, {vocab})")
        return unembed.T[t.to(unembed.device)]

    raw = column(tokens, "tokens") if incorrect is None else column(tokens, "tokens") - column(incorrect,
                                                                                            "incorrect_tokens")
    return raw, raw * params.final_norm.scale


def _along(direction: Tensor, lead: torch.Size, fn: str) -> Tensor:
    """A `[*token_shape, d_model]` direction shaped to broadcast against `[*lead, d_model]` (`lead` = batch,
    *pos): one token for all, one per example, or one per example and position."""
    if direction.ndim == 2 and len(lead) == 2:  # [batch d] against [batch pos d]: the same token at every position
        direction = direction[:, None]
    try:
        return direction.expand(*lead, direction.shape[-1])
    except RuntimeError:
        raise ValueError(f"{fn}: tokens of shape {list(direction.shape[:-1])} do not match the stack's [batch, "
                         f"*pos] = {list(lead)}; give one id, one per example [batch], or [batch, pos]") from None


@checked
def logit_attribution(params: GPTParams, stack: Components | Float[Tensor, "component batch *pos d_model"],
                      tokens: Tokens, incorrect_tokens: Tokens | None = None
                      ) -> Components | Float[Tensor, "component batch *pos"]:
    """Direct logit attribution of a normalised stack: `(component * gamma) . W_U[:, tokens]` (minus the same for
    `incorrect_tokens`), `gamma` the final norm's gain: each component's direct share of the logit (difference).
    `[component, batch, *pos]`.

    The stack must be normalised with a frozen scale (`apply_ln_to_stack`; a `Components` is checked). The shares
    of a full decomposition at the final point sum to the logit (difference) minus the final norm's shift term
    `shift . (W_U[:, tokens] - W_U[:, incorrect])`, which `decompose_logit` adds as the component
    `final_norm.shift`. At an earlier point they are the logit lens's shares (the stream read through the final
    norm and the unembedding). `tokens`: one id, `[batch]` (one per example) or `[batch, pos]`.
    """
    fn = "logit_attribution"
    values = stack.stack if isinstance(stack, Components) else stack
    if isinstance(stack, Components) and stack.space != "normalized":
        raise ValueError(f"{fn}: the stack is {stack.space!r}; normalise it first with apply_ln_to_stack(params, "
                         "stack, acts) (or build it with apply_ln=True)")
    _, direction = _directions(params, tokens, incorrect_tokens, fn)
    shares = torch.einsum("c...d,...d->c...", values, _along(direction, values.shape[1:-1], fn))
    if isinstance(stack, Components):
        return Components(shares, stack.labels, stack.norm, stack.pos, "logit")
    return shares


def decompose_logit(params: GPTParams, acts: Mapping[str, Tensor], tokens: Tokens,
                    incorrect_tokens: Tokens | None = None, *, layer: int | None = None, mlp_input: bool = False,
                    mode: str = "all", incl_embeds: bool = True, heads: bool = False, neurons: Neurons = False,
                    split_biases: bool = False, pos: Pos = -1, chunk_size: int = 512) -> Components:
    """The logit (difference) of `tokens` (minus `incorrect_tokens`) split into the direct contributions of the
    components of `decompose_resid(..., layer, heads=, neurons=, split_biases=)`, plus `final_norm.shift`:
    `[component, batch, *pos]`. At the final point with `mode="all"` they sum to the model's logit (difference);
    at an earlier point to the logit lens's value there.

    The same as `logit_attribution(params, decompose_resid(..., apply_ln=True), tokens, incorrect_tokens)` plus the
    shift term, computed part by part: no more than `chunk_size` neurons' writes (`[chunk, batch, *pos, d_model]`)
    exist at once, so per-neuron attribution of a whole model fits where its stack would not. `pos` defaults to
    the last position. Reads what `decompose_resid` reads plus the point's norm scale.
    """
    fn = "decompose_logit"
    _check_acts(acts, fn)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1 (neurons per chunk); got {chunk_size!r}")
    point = _Point(params, layer, mlp_input, fn)
    pos = _positions(pos, _batch_seq(acts, fn)[1], fn)
    scale = _scale(params, acts, point, pos, fn)
    raw, direction = _directions(params, tokens, incorrect_tokens, fn)
    labels: list[str] = []
    shares: list[Tensor] = []
    along = None
    for names, make in _parts(params, acts, point, pos, fn, mode=mode, incl_embeds=incl_embeds, heads=heads,
                              neurons=neurons, split_biases=split_biases, chunk_size=chunk_size):
        values = _normalize(make(), scale)
        along = _along(direction, values.shape[1:-1], fn) if along is None else along
        shares.append(torch.einsum("c...d,...d->c...", values, along))
        labels += names
    if along is None:
        raise ValueError(f"{fn}: these options select no component")
    beta = params.final_norm.shift
    shift = _along(raw, along.shape[:-1], fn) @ beta if beta is not None else torch.zeros_like(shares[0][0])
    return Components(torch.cat([*shares, shift[None]]), (*labels, "final_norm.shift"), point.norm, pos, "logit")

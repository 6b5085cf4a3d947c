"""The whole model: token ids -> embeddings -> blocks -> final layer norm -> logits, and the language-model loss.

Site names passed to a `tap` (see `gpt2fn.layers`): `embed.tok`, `embed.pos`, `embed`, then per layer `blocks.{i}.*`
(`resid_pre, attn.q_input/k_input/v_input, ln1, attn.q, attn.k, attn.v, attn.scores, attn.pattern, attn.z,
attn.out, resid_mid, ln2, mlp.pre, mlp.post, mlp.out, resid_post`, and the norms' `.scale`/`.normalized`), then
`final_norm.scale`, `final_norm.normalized`, `final_norm` and `logits` (full table: `gpt2fn.study`).

`forward(..., start_at_layer=L, stop_at_layer=M)` runs part of the model, as TransformerLens's `forward` does: the
input is then the residual stream entering block L (`blocks.{L}.resid_pre`) instead of ids, and the output the
residual stream entering block M (after block M-1, before the final norm) instead of logits. Keywords of `forward`
rather than a separate function because it is the same computation (the same loop, the same tap) and because
`forward_with`, `run_with_capture` and `site_grads` pass `forward`'s keywords on: captures, edits and gradients
work on a partial run with no second entry point.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .cache import KVCache
from .checks import check_ids, check_layer, first_out_of_range
from .config import GPTConfig
from .kernels import affine, affine_t
from .layers import Tap, block, dropout, key_visibility, layer_norm_sites, tap_site
from .losses import head_cross_entropy
from .params import GPTParams, Int8Matrix, head_matrix
from .quantize import refuse_quantized
from .shapes import check_record, checked

__all__ = ["forward", "walk", "embed", "readout", "unembed", "loss", "positions_from_mask", "left_pad", "as_generator",
           "trained_vocab_index"]


def as_generator(seed: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    """An explicit generator from a seed (None stays None: no randomness)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(int(seed))


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int = 0, device: torch.device | str | None = None
             ) -> tuple[Int[Tensor, "batch seq"], Bool[Tensor, "batch seq"]]:
    """Token lists of different lengths as `(ids [batch, longest], mask)`, padded on the left (mask False there):
    the `pad_mask` that `forward`, `decode_step`, `generate_tokens` and `score` take."""
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


def positions_from_mask(mask: Bool[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Position ids that count only real tokens, so left padding shifts nothing: [0,0,1,1,..] -> [0,0,0,1,..]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_targets(params: GPTParams, ids: Tensor, targets: Tensor, ignore_index: int) -> None:
    """`loss`'s targets: a tensor of the ids' shape, integer, each in `[0, vocab_size)` or `ignore_index` (the
    range check is skipped where values cannot be read, see `gpt2fn.checks`)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids [batch, seq]; got {type(targets).__name__}")
    if isinstance(ids, Tensor) and targets.shape != ids.shape:
        raise ValueError(f"targets must have the shape of ids {list(ids.shape)}; got {list(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids; got dtype {targets.dtype}. "
                         "Use targets.long().")
    cfg = params.config
    bad = first_out_of_range(targets, 0, cfg.vocab_size, allowed=ignore_index)
    if bad is not None:
        raise ValueError(f"targets hold {bad[1]} at {bad[0]}, neither a token id in [0, {cfg.vocab_size}) nor "
                         f"ignore_index={ignore_index}; mark positions to skip with ignore_index")
    if cfg.trained_vocab is not None:  # the softmax covers the trained ids only
        position = trained_vocab_index(cfg, targets.device)[1]
        skip = targets == ignore_index
        rank = torch.where(skip, 0, position[torch.where(skip, 0, targets).clamp(0, cfg.vocab_size - 1)])
        bad = first_out_of_range(rank, 0, len(cfg.trained_vocab))
        if bad is not None:
            raise ValueError(f"targets hold {int(targets[tuple(bad[0])])} at {bad[0]}, an id outside the "
                             f"{len(cfg.trained_vocab)} ids this model was trained on (config.trained_vocab)")


@checked
def forward(params: GPTParams, ids: Int[Tensor, "batch seq"] | Float[Tensor, "batch seq d_model"], *,
            cache: KVCache | None = None, positions: Int[Tensor, "batch seq"] | None = None,
            pad_mask: Bool[Tensor, "batch seq"] | None = None, generator: torch.Generator | int | None = None,
            tap: Tap | None = None, last_only: bool = False, start_at_layer: int | None = None,
            stop_at_layer: int | None = None
            ) -> (Float[Tensor, "batch _seq vocab"] | tuple[Float[Tensor, "batch _seq vocab"], KVCache]
                  | Float[Tensor, "batch seq d_model"]):
    """GPT-2: logits[b, t] = unembed(ln_f(blocks(tok_emb[ids] + pos_emb[positions])))[b, t].

    - `cache`: decode incrementally; returns `(logits, cache')` instead of logits, as `gpt2fn.decode_step` does
      (the cache passed in is unchanged; see `gpt2fn.cache`). Dropout does not apply there.
    - `positions`: position ids (default `start, start+1, ...`); `pad_mask`: False on left-padding tokens; when
      given without `positions`, positions are counted from the mask (cache included).
    - `generator` (or an int seed): turns dropout on with `config.drop_rate`. None: deterministic inference.
    - `last_only`: compute logits for the last position only (`[batch, 1, vocab]`), as generation needs.
    - `start_at_layer=L` (0..n_layers, or -n_layers..-1): the input is not ids but the residual stream entering
      block L, `[batch, seq, d_model]` (what `stop_at_layer=L` returns, or a captured `blocks.{L}.resid_pre`);
      the embedding and the blocks before L are skipped. `pad_mask` still hides padded keys.
    - `stop_at_layer=M` (0..n_layers, or -n_layers..-1; M >= L): return the residual stream entering block M,
      `[batch, seq, d_model]`, i.e. `blocks.{M}.resid_pre` (the residual after the last block when M = n_layers),
      without the final norm and the unembedding. TransformerLens's semantics: exclusive, negative counts from
      the end. Splitting a forward at L and feeding the first part's output to the second gives its logits.

    The part run still threads `tap`, so `forward_with(params, x, start_at_layer=L, capture=..., edit=...)`
    captures and edits the sites inside it. Partial runs do not decode: with `cache` both must be None.
    """
    if cache is not None:
        if start_at_layer is not None or stop_at_layer is not None:
            raise ValueError("start_at_layer/stop_at_layer run part of a full forward; they do not combine with "
                             "cache= (decoding runs every layer)")
        if generator is not None:
            raise ValueError("dropout (generator=) does not apply while decoding with cache=; drop generator=")
        cache.check_room(ids.shape[0], ids.shape[1])
    start, stop = _layer_span(params.config, start_at_layer, stop_at_layer)
    if start is None:
        check_ids(params.config, ids)
    else:
        _check_resid(params, ids, start_at_layer, positions)
    if stop is not None and last_only:
        raise ValueError("last_only selects the last position's logits; with stop_at_layer no logits are made. "
                         "Slice the returned residual stream instead: forward(...)[:, -1:]")
    check_record(params, "params")
    out, new = walk(params, ids, cache=cache, positions=positions, pad_mask=pad_mask,
                    generator=as_generator(generator, ids.device), tap=tap, last_only=last_only, start=start,
                    stop=stop)
    return out if cache is None else (out, new)


def unembed(params: GPTParams, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
    """The logits of final-norm features: `x @ head`, or `x @ tok_emb.T` for a tied head, both read in place
    (`gpt2fn.kernels`)."""
    if params.head is None:
        return affine_t(x, params.tok_emb)
    return affine(x, params.head, None)


def readout(params: GPTParams, x: Float[Tensor, "*batch d_model"], tap: Tap | None = None
            ) -> Float[Tensor, "*batch vocab"]:
    """The model's last step: final layer norm, then the unembedding (sites `final_norm*` and `logits`). The logit
    lens reads every layer's residual stream through it."""
    x = tap_site(tap, "final_norm", layer_norm_sites(params.final_norm, x, params.config.ln_eps, tap, "final_norm"))
    return tap_site(tap, "logits", unembed(params, x))


def embed(params: GPTParams, ids: Int[Tensor, "batch seq"], positions: Int[Tensor, "batch seq"] | None = None, *,
          generator: torch.Generator | None = None, tap: Tap | None = None) -> Float[Tensor, "batch seq d_model"]:
    """Token plus position embedding (sites `embed.tok`, `embed.pos`, `embed`); positions default to 0..seq-1.

    `F.embedding`, not `tok_emb[ids]`: the backward of advanced indexing (index_put_ with accumulate) adds repeated
    ids with parallel atomic float adds on CPU, so with 2+ threads the gradient's rounding varied run to run.
    The result is in `params.compute_dtype` (fp32 for 16-bit or int8 weights on CPU), the dtype of the whole run."""
    dtype = params.compute_dtype
    table = params.tok_emb
    if isinstance(table, Int8Matrix):  # the looked-up rows times their scales (a scale per token)
        tok = F.embedding(ids, table.q).to(dtype) * F.embedding(ids, table.scale[:, None]).to(dtype)
    else:
        tok = F.embedding(ids, table).to(dtype)
    tok = tap_site(tap, "embed.tok", tok)
    pos = params.pos_emb[:ids.shape[1]] if positions is None else F.embedding(positions, params.pos_emb)
    pos = tap_site(tap, "embed.pos", pos.to(dtype))
    return tap_site(tap, "embed", dropout(tok + pos, params.config.drop_rate, generator))


def walk(params: GPTParams, inputs: Tensor, *, cache: KVCache | None = None, positions: Tensor | None = None,
         pad_mask: Tensor | None = None, donate: bool = False, generator: torch.Generator | None = None,
         tap: Tap | None = None, last_only: bool = False, start: int | None = None, stop: int | None = None,
         logits: bool = True) -> tuple[Tensor, KVCache | None]:
    """The one pass through the model: embed -> blocks `start..stop-1` -> final norm -> unembed. `forward`,
    `decode_step`, `loss`, the study engine and the logit lens all run it; only its arguments differ.

    - Without `cache` (a forward): queries see the keys before them in the same sequence; `pad_mask` hides
      left-padding keys and, without `positions`, counts positions from the mask.
    - With `cache` (decoding): `inputs` are written into the cache's slots `length .. length+seq`, positions
      continue each row's count, and queries see every valid slot up to their own (`layers.key_visibility`, the
      rule a forward uses too). `donate` writes into the cache's buffers in place. Returns the new cache.
      Attention spans the whole capacity (static shapes, one compiled graph for every step), except in eager
      CPU decoding without a tap, where the mask and the keys it covers stop at the last slot written: the slots
      after it are invisible anyway, and reading them is not free (GPT-2 124M at batch 8 over a 144-slot capacity:
      85 MB of fp32 keys and values per step, a third of its bf16 weights).
    - `start` (`inputs` is then the residual stream entering that block), `stop` (return the residual stream
      entering that block), `logits=False` (return the final-norm features): parts of the same walk.
    Returns `(logits or features or residual stream, new cache or None)`. Input checks belong to the callers."""
    cfg = params.config
    seq = inputs.shape[1]
    mask = slots = valid = real = None
    if cache is not None:  # decoding: where the new keys go, which slots each query sees, positions from the count
        real = torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device) if pad_mask is None else pad_mask
        slots = cache.length + torch.arange(seq, device=inputs.device)
        if positions is None:
            positions = (cache.positions[:, None] + real.long().cumsum(-1) - 1).clamp(min=0)
        valid = cache.valid.index_copy_(1, slots, real) if donate else cache.valid.index_copy(1, slots, real)
        width = cache.capacity
        if (tap is None and inputs.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(cache.length)):  # a readable count
            width = int(cache.length) + seq  # eager CPU decoding attends over the slots written so far only
        mask = key_visibility(slots, valid[:, :width], width)
        pad_mask = None
    elif pad_mask is not None and positions is None and start is None:
        positions = positions_from_mask(pad_mask)
    x = embed(params, inputs, positions, generator=generator, tap=tap) if start is None else inputs
    keys, values = [], []
    for i in range(start or 0, cfg.n_layers if stop is None else stop):
        kv = None if cache is None else (cache.keys[i], cache.values[i])
        x = block(params.blocks[i], x, config=cfg, layer=i, key_mask=pad_mask, generator=generator, tap=tap,
                  kv=kv, slots=slots, mask=mask, donate=donate)
        if cache is not None:
            x, (k, v) = x
            keys.append(k)
            values.append(v)
    new = None
    if cache is not None:
        assert real is not None and valid is not None
        new = KVCache(tuple(keys), tuple(values), valid, cache.length + seq, cache.positions + real.sum(-1))
    if stop is not None:
        return x, new
    if last_only:
        x = x[:, -1:]
    if not logits:
        return tap_site(tap, "final_norm", layer_norm_sites(params.final_norm, x, cfg.ln_eps, tap, "final_norm")), new
    return readout(params, x, tap), new


def _layer_span(cfg: GPTConfig, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
    """`start_at_layer`/`stop_at_layer` as block indices in 0..n_layers (negative ones counted from the end), or a
    ValueError naming the argument and the valid range."""
    span = [check_layer(cfg, start, name="start_at_layer", kind="boundary", allow_none=True),
            check_layer(cfg, stop, name="stop_at_layer", kind="boundary", allow_none=True)]
    if span[0] is not None and span[1] is not None and span[0] > span[1]:
        raise ValueError(f"start_at_layer={start} (block {span[0]}) comes after stop_at_layer={stop} (block "
                         f"{span[1]}); the part run is blocks start..stop-1, so start_at_layer <= stop_at_layer")
    return span[0], span[1]


def _check_resid(params: GPTParams, x: Tensor, start_at_layer: int, positions: Tensor | None) -> None:
    """The input of a forward with `start_at_layer`: a float residual stream `[batch, seq, d_model]`."""
    d = params.config.emb_dim
    what = f"with start_at_layer={start_at_layer} the input is the residual stream entering that block"
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}, a torch.Tensor [batch, seq, {d}]; got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{what}, a float tensor [batch, seq, {d}]; got {x.dtype} of shape {list(x.shape)} "
                         f"(token ids?). Make it with forward(params, ids, stop_at_layer={start_at_layer}), or drop "
                         "start_at_layer to run from ids")
    if x.ndim != 3 or x.shape[-1] != d or x.shape[1] == 0:
        raise ValueError(f"{what}, [batch, seq, d_model={d}] with seq >= 1; got shape {list(x.shape)}. For a "
                         "single sequence pass x[None]")
    if positions is not None:
        raise ValueError("positions place the embedding; with start_at_layer the residual stream already holds "
                         "them: drop positions=")


@checked
def loss(params: GPTParams, ids: Int[Tensor, "batch seq"], targets: Int[Tensor, "batch seq"], *,
         generator: torch.Generator | int | None = None, ignore_index: int = -100,
         fused_head: bool = False) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of `targets` under `forward(params, ids)` (targets equal to ignore_index
    are skipped). Computed in fp32 whatever the parameter dtype.

    With `config.trained_vocab` (a model trained on a corpus's own vocabulary) the softmax runs over those ids
    only; a target outside them is a ValueError (where values can be read, see `gpt2fn.checks`).

    `fused_head=True` computes the unembedding and the cross-entropy together, chunk by chunk, with the
    gradient formed in the same pass (`gpt2fn.losses.head_cross_entropy`): the same values without ever holding
    the `[batch x seq, vocab]` logits -- faster and much smaller for training (`gpt2fn.train` uses it). It is
    differentiable once (`grad`, `vjp`, `jacrev`, `vmap` of them, `backward`); second derivatives raise. The
    default composes with every `torch.func` transform, `hessian` included."""
    refuse_quantized(params, "loss")
    _check_targets(params, ids, targets, ignore_index)
    targets = targets.flatten()
    rows = None
    if params.config.trained_vocab is not None:  # the softmax runs over the trained rows only
        rows, position = trained_vocab_index(params.config, ids.device)
        skip = targets == ignore_index
        # positions among the trained ids (an id outside them becomes -1: an index error below); skipped targets
        # get -100, which no position can equal, whatever ignore_index was
        targets = torch.where(skip, -100, position[targets.clamp(min=0)])
        ignore_index = -100
    if not fused_head:
        logits = forward(params, ids, generator=generator).flatten(0, 1)
        if rows is not None:
            logits = logits.index_select(-1, rows)
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    check_ids(params.config, ids)
    check_record(params, "params")
    x, _ = walk(params, ids, generator=as_generator(generator, ids.device), logits=False)
    w = head_matrix(params).T  # [vocab, d_model]: the tied token embedding itself, or the untied head's view
    if rows is not None:
        w = w.index_select(0, rows)
    return head_cross_entropy(x.flatten(0, 1), w, targets, ignore_index=ignore_index)


def trained_vocab_index(config: GPTConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a config with `trained_vocab`: `(rows, position)`, the trained ids as a tensor and, for every id, its
    position among them (-1 for an id outside it). Built per call (a vocabulary-sized index, cheap next to a
    forward); a caller that needs it often keeps the value."""
    if config.trained_vocab is None:
        raise ValueError("this config has no trained_vocab")
    rows = torch.tensor(config.trained_vocab, dtype=torch.long, device=device)
    position = torch.full((config.vocab_size,), -1, dtype=torch.long, device=device)
    position[rows] = torch.arange(len(rows), device=device)
    return rows, position

"""The seed's from-scratch `GPTModel` (`gpt2_model.pth`): separate query/key/value `nn.Linear`s stored
`[out, in]`, layer norms with `scale`/`shift`, an untied `out_head`, a causal-mask buffer per block.

    tok_emb.weight, pos_emb.weight                       [vocab, d], [ctx, d]   (ctx may be shorter than 1024)
    trf_blocks.{i}.norm1.scale/.shift, norm2.*           [d]
    trf_blocks.{i}.att.W_query/W_key/W_value.weight      [d, d]  (+ .bias only when trained with qkv_bias=True)
    trf_blocks.{i}.att.out_proj.weight/.bias             [d, d], [d]
    trf_blocks.{i}.att.mask                              [ctx, ctx] buffer, ignored
    trf_blocks.{i}.ff.layers.0/.2.weight/.bias           [4d, d], [d, 4d]
    final_norm.scale/.shift, out_head.weight             [d], [vocab, d]

The seed computes GELU with the tanh approximation and layer norm with eps 1e-5 and the biased variance.
"""

import re

import torch

from ..config import GPTConfig
from .common import (
    Raw,
    Rule,
    assemble,
    check_stated,
    config_errors,
    config_float,
    count_layers,
    heads_for,
    matrix_dim,
    mlp_dim_for,
    need,
    rule,
)

__all__ = ["LAYOUT", "matches", "infer_config", "convert"]

LAYOUT = "seed GPTModel (.pth)"

_B = "trf_blocks.{i}."
RULES: dict[str, Rule] = {
    "tok_emb": rule("tok_emb.weight"),
    "pos_emb": rule("pos_emb.weight"),
    "blocks.{i}.norm1.scale": rule(_B + "norm1.scale"),
    "blocks.{i}.norm1.shift": rule(_B + "norm1.shift"),
    "blocks.{i}.attn.w_qkv": rule(*(_B + f"att.W_{n}.weight" for n in ("query", "key", "value")), transpose=True),
    "blocks.{i}.attn.b_qkv": rule(*(_B + f"att.W_{n}.bias" for n in ("query", "key", "value"))),
    "blocks.{i}.attn.w_out": rule(_B + "att.out_proj.weight", transpose=True),
    "blocks.{i}.attn.b_out": rule(_B + "att.out_proj.bias"),
    "blocks.{i}.norm2.scale": rule(_B + "norm2.scale"),
    "blocks.{i}.norm2.shift": rule(_B + "norm2.shift"),
    "blocks.{i}.mlp.w_fc": rule(_B + "ff.layers.0.weight", transpose=True),
    "blocks.{i}.mlp.b_fc": rule(_B + "ff.layers.0.bias"),
    "blocks.{i}.mlp.w_proj": rule(_B + "ff.layers.2.weight", transpose=True),
    "blocks.{i}.mlp.b_proj": rule(_B + "ff.layers.2.bias"),
    "final_norm.scale": rule("final_norm.scale"),
    "final_norm.shift": rule("final_norm.shift"),
    "head": rule("out_head.weight", transpose=True),
}
_MASK = re.compile(r"trf_blocks\.\d+\.att\.mask")


def matches(raw: Raw) -> bool:
    return "tok_emb.weight" in raw.tensors or any(k.startswith("trf_blocks.") for k in raw.tensors)


def infer_config(raw: Raw, *, n_heads: int | None = None) -> tuple[GPTConfig, list[str]]:
    """The config from the tensor shapes (plus a `config` dict saved next to the weights, if any)."""
    vocab, d = need(raw, "tok_emb.weight", LAYOUT).shape
    ctx = need(raw, "pos_emb.weight", LAYOUT).shape[0]
    t = raw.tensors
    saved = raw.meta.get("config") or {}
    where = "the saved config"
    hidden = matrix_dim(raw, "trf_blocks.0.ff.layers.0.weight", 0) or 4 * d
    n_layers = count_layers(raw, "trf_blocks.")
    check_stated({"vocab_size": vocab, "emb_dim": d, "n_layers": n_layers}, saved, where, raw.source)
    notes = []
    if saved.get("n_heads") is not None:
        notes.append("n_heads from the checkpoint's config")
    drop = config_float(saved.get("drop_rate"), "drop_rate", where, raw.source, 0.1)
    with config_errors(raw.source):
        config = GPTConfig(
            vocab_size=vocab, context_length=ctx, emb_dim=d, n_layers=n_layers,
            n_heads=heads_for(d, saved.get("n_heads"), raw.source, where, n_heads),
            drop_rate=drop, qkv_bias="trf_blocks.0.att.W_query.bias" in t,
            bias="trf_blocks.0.att.out_proj.bias" in t, tie_head="out_head.weight" not in t,
            ln_eps=1e-5, gelu="tanh", mlp_dim=mlp_dim_for(d, hidden),
        )
    return config, notes


def convert(raw: Raw, *, n_heads: int | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor], list[str], list[str]]:
    config, notes = infer_config(raw, n_heads=n_heads)
    tensors, ignored = assemble(raw, config, RULES, layout=LAYOUT, device=device, dtype=dtype,
                                ignore=lambda k: "causal-mask buffer" if _MASK.fullmatch(k) else None)
    return config, tensors, ignored, notes

"""nanoGPT's `ckpt.pt`: `{"model": state_dict, "model_args": {...}, "optimizer": ..., "iter_num": ...}`.

GPT-2's names under `transformer.` (plus `_orig_mod.` from `torch.compile`, stripped on reading), but the
matrices are `nn.Linear`, stored `[out, in]` (`c_attn.weight` is `[3d, d]`) and transposed once here.
`lm_head.weight` is tied to `wte` (the state dict may hold it too). `bias=False` checkpoints have no bias keys at
all; `attn.bias` is a causal-mask buffer when present. The MLP uses the exact erf GELU (`nn.GELU()`). The
vocabulary is padded to a multiple of 64 (50304): the padding ids are marked never to be generated
(`token_vocab_size=50257`).
"""

import re

import torch

from ..config import GPTConfig
from .common import (
    Raw,
    assemble,
    check_stated,
    config_errors,
    config_float,
    count_layers,
    heads_for,
    matrix_dim,
    mlp_dim_for,
    need,
)
from .hf import gpt2_family, gpt2_rules, tied

__all__ = ["LAYOUT", "matches", "infer_config", "convert", "GPT2_VOCAB"]

LAYOUT = "nanoGPT (ckpt.pt)"
GPT2_VOCAB = 50257
_P = "transformer."
_MASK = re.compile(r"transformer\.h\.\d+\.attn\.bias")


def matches(raw: Raw) -> bool:
    return "model_args" in raw.meta and f"{_P}wte.weight" in raw.tensors or gpt2_family(raw) == "linear"


def token_vocab(vocab: int) -> int | None:
    """GPT-2's 50257 ids when the table was padded up to the next multiple of 64 (nanoGPT's 50304)."""
    return GPT2_VOCAB if GPT2_VOCAB < vocab < GPT2_VOCAB + 64 and vocab % 64 == 0 else None


def infer_config(raw: Raw, *, n_heads: int | None = None) -> tuple[GPTConfig, list[str]]:
    args = raw.meta.get("model_args") or {}
    vocab, d = need(raw, _P + "wte.weight", LAYOUT).shape
    ctx = need(raw, _P + "wpe.weight", LAYOUT).shape[0]
    n_layers = count_layers(raw, _P + "h.")
    check_stated({"vocab_size": vocab, "block_size": ctx, "n_embd": d, "n_layer": n_layers}, args, "model_args",
                 raw.source)
    fc = matrix_dim(raw, _P + "h.0.mlp.c_fc.weight", 0)
    drop = config_float(args.get("dropout"), "dropout", "model_args", raw.source, 0.0)
    notes = []
    if args.get("n_head") is not None and n_heads is None:
        notes.append(f"n_heads={args['n_head']} from model_args")
    padded = token_vocab(vocab)
    if padded:
        notes.append(f"vocabulary padded to {vocab}: ids >= {padded} are never generated (token_vocab_size)")
    with config_errors(raw.source):
        config = GPTConfig(
            vocab_size=vocab, context_length=ctx, emb_dim=d, n_layers=n_layers,
            n_heads=heads_for(d, args.get("n_head"), raw.source, "model_args", n_heads),
            drop_rate=drop,
            qkv_bias=_P + "h.0.attn.c_attn.bias" in raw.tensors, bias=_P + "h.0.attn.c_proj.bias" in raw.tensors,
            tie_head=tied(raw, _P + "wte.weight", None), ln_eps=1e-5, gelu="erf",
            mlp_dim=mlp_dim_for(d, fc) if fc is not None else None, token_vocab_size=padded,
        )
    return config, notes


def convert(raw: Raw, *, n_heads: int | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor], list[str], list[str]]:
    config, notes = infer_config(raw, n_heads=n_heads)

    def ignore(key: str) -> str | None:
        if _MASK.fullmatch(key):
            return "causal-mask buffer"
        if key == "lm_head.weight" and config.tie_head:
            return "tied: the head reads the token embedding"
        return None

    tensors, ignored = assemble(raw, config, gpt2_rules(_P, linear=True), layout=LAYOUT, ignore=ignore,
                                device=device, dtype=dtype)
    return config, tensors, ignored, notes

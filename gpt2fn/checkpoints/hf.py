"""Hugging Face GPT-2 (`GPT2LMHeadModel` / `GPT2Model`): a directory with `config.json` and `model.safetensors`,
`pytorch_model.bin` or a sharded index, or a bare `.safetensors` file.

    [transformer.]wte.weight, wpe.weight                  [vocab, d], [ctx, d]
    [transformer.]h.{i}.ln_1.weight/.bias, ln_2.*         [d]
    [transformer.]h.{i}.attn.c_attn.weight/.bias          [d, 3d] Conv1D, already `[in, out]`: q|k|v columns
    [transformer.]h.{i}.attn.c_proj.weight/.bias          [d, d]
    [transformer.]h.{i}.mlp.c_fc.weight/.bias, c_proj.*   [d, 4d], [4d, d]
    [transformer.]ln_f.weight/.bias
    lm_head.weight                                        [vocab, d] nn.Linear; absent (or equal to wte) when tied
    h.{i}.attn.bias, h.{i}.attn.masked_bias               legacy mask buffers, ignored

Conv1D already stores `[in, out]`, so a safetensors file loads with no copy at all. The head count and the GELU
flavour come from `config.json` (`n_head`, `activation_function`); shapes come from the tensors.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import GPTConfig
from ..files import atomic_write_path, atomic_write_text
from ..params import GPTParams, expected_shapes, params_to_dict, validate
from .common import (
    CheckpointError,
    Raw,
    Rule,
    assemble,
    check_stated,
    config_errors,
    config_flag,
    config_float,
    count_layers,
    heads_for,
    matrix_dim,
    mlp_dim_for,
    need,
    rule,
)

__all__ = ["LAYOUT", "matches", "infer_config", "convert", "gpt2_rules", "save_hf"]

LAYOUT = "Hugging Face GPT-2"

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf"}
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def gpt2_rules(prefix: str, *, linear: bool) -> dict[str, Rule]:
    """GPT-2's names (shared with nanoGPT); `linear`: matrices stored `[out, in]` (nn.Linear, nanoGPT)."""
    h = prefix + "h.{i}."
    return {
        "tok_emb": rule(prefix + "wte.weight"),
        "pos_emb": rule(prefix + "wpe.weight"),
        "blocks.{i}.norm1.scale": rule(h + "ln_1.weight"),
        "blocks.{i}.norm1.shift": rule(h + "ln_1.bias"),
        "blocks.{i}.attn.w_qkv": rule(h + "attn.c_attn.weight", transpose=linear),
        "blocks.{i}.attn.b_qkv": rule(h + "attn.c_attn.bias"),
        "blocks.{i}.attn.w_out": rule(h + "attn.c_proj.weight", transpose=linear),
        "blocks.{i}.attn.b_out": rule(h + "attn.c_proj.bias"),
        "blocks.{i}.norm2.scale": rule(h + "ln_2.weight"),
        "blocks.{i}.norm2.shift": rule(h + "ln_2.bias"),
        "blocks.{i}.mlp.w_fc": rule(h + "mlp.c_fc.weight", transpose=linear),
        "blocks.{i}.mlp.b_fc": rule(h + "mlp.c_fc.bias"),
        "blocks.{i}.mlp.w_proj": rule(h + "mlp.c_proj.weight", transpose=linear),
        "blocks.{i}.mlp.b_proj": rule(h + "mlp.c_proj.bias"),
        "final_norm.scale": rule(prefix + "ln_f.weight"),
        "final_norm.shift": rule(prefix + "ln_f.bias"),
        "head": rule("lm_head.weight", transpose=True),  # nn.Linear in both
    }


def prefix_of(raw: Raw) -> str:
    return "transformer." if "transformer.wte.weight" in raw.tensors else ""


def gpt2_family(raw: Raw) -> str | None:
    """'conv1d' (Hugging Face), 'linear' (nanoGPT) or None, from the orientation of the fused q/k/v matrix."""
    p = prefix_of(raw)
    wte, qkv = raw.tensors.get(p + "wte.weight"), raw.tensors.get(p + "h.0.attn.c_attn.weight")
    if wte is None or qkv is None or wte.ndim != 2:
        return None
    d = wte.shape[-1]
    if tuple(qkv.shape) == (d, 3 * d):
        return "conv1d"
    if tuple(qkv.shape) == (3 * d, d):
        return "linear"
    return None


def matches(raw: Raw) -> bool:
    family = gpt2_family(raw)
    # with a config.json, GPT-2 names in neither orientation are still ours: assemble reports the bad shapes
    return family == "conv1d" or (family is None and "config.json" in raw.meta
                                  and prefix_of(raw) + "wte.weight" in raw.tensors)


def tied(raw: Raw, wte_key: str, tie_flag: Any) -> bool:
    """Whether the head reads the token embedding. No `lm_head.weight`: tied unless the config says otherwise.
    With one: tied when the config says so (as transformers ties it on loading) or when it equals `wte`."""
    head = raw.tensors.get("lm_head.weight")
    if head is None:
        return tie_flag is not False
    if tie_flag is True:
        return True
    wte = raw.tensors[wte_key]
    return bool(head.shape == wte.shape and (head.data_ptr() == wte.data_ptr() or torch.equal(head, wte)))


def infer_config(raw: Raw, *, n_heads: int | None = None) -> tuple[GPTConfig, list[str]]:
    p = prefix_of(raw)
    cfg: dict[str, Any] = raw.meta.get("config.json") or {}
    where = "config.json"
    vocab, d = need(raw, p + "wte.weight", LAYOUT).shape
    ctx = need(raw, p + "wpe.weight", LAYOUT).shape[0]
    n_layers = count_layers(raw, p + "h.")
    fc = matrix_dim(raw, p + "h.0.mlp.c_fc.weight", 1)
    check_stated({"vocab_size": vocab, "n_positions": ctx, "n_embd": d, "n_layer": n_layers}, cfg, where, raw.source)
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{raw.source} is a {cfg['model_type']!r} model ({where}); gpt2fn loads GPT-2 only")
    act = cfg.get("activation_function", "gelu_new")
    unsupported = [f"activation_function={act!r}"] if not isinstance(act, str) or act not in _GELU else []
    # truthiness as transformers reads these switches (`if config.scale_attn_weights:`): 0 and "" are off
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        unsupported.append(f"scale_attn_by_inverse_layer_idx={cfg['scale_attn_by_inverse_layer_idx']!r}")
    if "scale_attn_weights" in cfg and not cfg["scale_attn_weights"]:
        unsupported.append(f"scale_attn_weights={cfg['scale_attn_weights']!r}")
    if unsupported:
        raise CheckpointError(f"{where} of {raw.source} asks for {', '.join(unsupported)}, which gpt2fn does not "
                              "implement; refusing to load it as a different model")
    drop = config_float(cfg.get("resid_pdrop"), "resid_pdrop", where, raw.source, 0.1)
    eps = config_float(cfg.get("layer_norm_epsilon"), "layer_norm_epsilon", where, raw.source, 1e-5)
    tie = config_flag(cfg.get("tie_word_embeddings"), "tie_word_embeddings", where, raw.source)
    notes = [f"n_heads={cfg['n_head']} from {where}"] if cfg.get("n_head") is not None and n_heads is None else []
    with config_errors(raw.source):
        config = GPTConfig(
            vocab_size=vocab, context_length=ctx, emb_dim=d, n_layers=n_layers,
            n_heads=heads_for(d, cfg.get("n_head"), raw.source, where, n_heads),
            drop_rate=drop,
            qkv_bias=p + "h.0.attn.c_attn.bias" in raw.tensors, bias=p + "h.0.attn.c_proj.bias" in raw.tensors,
            tie_head=tied(raw, p + "wte.weight", tie), ln_eps=eps, gelu=_GELU[act],
            mlp_dim=mlp_dim_for(d, fc) if fc is not None else None,
        )
    return config, notes


def ignore_buffers(config: GPTConfig):
    def ignore(key: str) -> str | None:
        if _BUFFER.fullmatch(key):
            return "legacy attention-mask buffer"
        if key == "lm_head.weight" and config.tie_head:
            return "tied: the head reads the token embedding"
        return None
    return ignore


def convert(raw: Raw, *, n_heads: int | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor], list[str], list[str]]:
    config, notes = infer_config(raw, n_heads=n_heads)
    tensors, ignored = assemble(raw, config, gpt2_rules(prefix_of(raw), linear=False), layout=LAYOUT,
                                ignore=ignore_buffers(config), device=device, dtype=dtype)
    return config, tensors, ignored, notes


# ---------------------------------------------------------------------------------------------------------------
# Writing a Hugging Face directory


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """`config.json` for `GPT2LMHeadModel`."""
    eot = {"bos_token_id": 50256, "eos_token_id": 50256} if config.vocab_size > 50256 else {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_ctx": config.context_length,
        "n_embd": config.emb_dim, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": config.mlp_dim, "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": config.ln_eps, "resid_pdrop": config.drop_rate, "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate, "tie_word_embeddings": config.tie_head, **eot,
    }


def save_hf(params: GPTParams, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained` reads.

    GPT-2 always has q/k/v and other biases: absent ones (`qkv_bias=False`, `bias=False`) are written as zeros,
    which computes the same function. `token_vocab_size` has no Hugging Face field and is dropped. A model
    trained on a corpus's own vocabulary (`config.trained_vocab`) gets a `generation_config.json` whose
    `suppress_tokens` lists every other id, so `transformers`' `generate` keeps to the trained ids as gpt2fn does.
    """
    validate(params, source="params to save")
    cfg = params.config
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; save_hf writes a directory (config.json + model.safetensors): "
                              "give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"could not create the directory {out}: {exc.strerror or exc}") from exc
    ours = params_to_dict(params)
    rules = gpt2_rules("transformer.", linear=False)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg.replace(qkv_bias=True, bias=True)).items():
        if name == "head":
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        key = rules[f"blocks.{{i}}.{m.group(2)}" if m else name].theirs[0].format(i=m.group(1) if m else None)
        t = ours.get(name)
        tensors[key] = t if t is not None else torch.zeros(shape, dtype=params.dtype)
    if params.head is not None:
        tensors["lm_head.weight"] = params.head.T  # nn.Linear: [vocab, d]
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    try:  # each file atomically (gpt2fn.files); config.json last, so a directory with one has its weights
        atomic_write_path(out / "model.safetensors",
                          lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        atomic_write_text(out / "config.json", json.dumps(hf_config(cfg), indent=2) + "\n")
        generation = out / "generation_config.json"
        if cfg.trained_vocab is not None:
            trained = set(cfg.trained_vocab)
            suppress = [i for i in range(cfg.vocab_size) if i not in trained]
            ends = {"bos_token_id": 50256, "eos_token_id": 50256} if cfg.vocab_size > 50256 else {}
            atomic_write_text(generation, json.dumps({**ends, "suppress_tokens": suppress}) + "\n")
        else:
            generation.unlink(missing_ok=True)  # a stale one from an earlier export would mask ids
    except OSError as exc:
        raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from exc
    return out

"""gpt2fn's own files: safetensors whose keys are the pytree's names (`tok_emb`, `blocks.0.attn.w_qkv`, ...) and
whose metadata carries the config (`gpt2fn.config`, JSON; the tie is `tie_head`). Loading one back is exact.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import GPTConfig
from ..files import atomic_write_path
from ..params import GPTParams, is_quantized, named_leaves, validate
from ..quantize import quantized_from_dict
from .common import CheckpointError, Raw, assemble, check_layers, config_int, count_layers

__all__ = ["LAYOUT", "FORMAT_VERSION", "matches", "convert", "save"]

LAYOUT = "gpt2fn safetensors"
FORMAT_VERSION = "1"
_CONFIG_KEY = "gpt2fn.config"
_QUANT_KEY = "gpt2fn.quantized"  # "int8" in a file of an int8 tree (gpt2fn.quantize)
_MAX_SIZE = 2**31 - 1


def matches(raw: Raw) -> bool:
    return _CONFIG_KEY in (raw.meta.get("safetensors") or {})


def convert(raw: Raw, *, n_heads: int | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[GPTConfig, dict[str, Tensor], list[str], list[str]]:
    config = convert_config(raw)
    if n_heads is not None and n_heads != config.n_heads:
        raise CheckpointError(f"n_heads={n_heads} was passed but {raw.source} says n_heads={config.n_heads}")
    # the stored layer count must match the blocks present before `assemble` walks that many names
    check_layers(count_layers(raw, "blocks."), config.n_layers, "n_layers", "the gpt2fn config", raw.source)
    tensors, ignored = assemble(raw, config, None, layout=LAYOUT, device=device, dtype=dtype)
    return config, tensors, ignored, []


def convert_config(raw: Raw) -> GPTConfig:
    """The config in a gpt2fn file's metadata, checked."""
    text = raw.meta["safetensors"][_CONFIG_KEY]
    try:
        config = GPTConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{raw.source} has an invalid gpt2fn config in its metadata ({exc}); "
                              "it was written by a different version of gpt2fn or edited by hand") from exc
    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "mlp_dim", "token_vocab_size"):
        value = getattr(config, name)
        if value is not None and config_int(value, name, "the gpt2fn config", raw.source) > _MAX_SIZE:
            raise CheckpointError(f"the gpt2fn config of {raw.source} says {name}={value}, beyond any real model "
                                  f"(at most {_MAX_SIZE}); the file is corrupt")
    return config


def quantized_format(raw: Raw) -> str | None:
    """The quantization a gpt2fn file says it holds ("int8"), or None."""
    return (raw.meta.get("safetensors") or {}).get(_QUANT_KEY)


def load_quantized(raw: Raw, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                   ) -> GPTParams:
    """The int8 tree of a file `save` wrote from a quantized tree (its int8 values and fp32 scales kept as they
    are); `dtype` is refused, since casting would undo the format (dequantize, then tree_to, for another)."""
    fmt = quantized_format(raw)
    if fmt != "int8":
        raise CheckpointError(f"{raw.source} says it holds {fmt!r} weights; this gpt2fn reads int8 only")
    if dtype is not None:
        raise CheckpointError(f"{raw.source} holds int8 weights (gpt2fn.quantize); load it without dtype=, then "
                              "gpt2fn.dequantize(params, dtype) for a floating tree")
    config = convert_config(raw)
    tensors = {k: t.to(device=device) for k, t in raw.tensors.items()}
    try:
        return quantized_from_dict(config, tensors, source=raw.source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _disjoint(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors with no two sharing memory (safetensors refuses overlapping tensors)."""
    out: dict[str, Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if any(s < end and start < e for s, e in spans):
            t = t.clone()  # a view of another leaf (say, a head made as tok_emb.T): store its own copy
            start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        spans.append((start, end))
        out[name] = t
    return out


def save(params: GPTParams, path: str | os.PathLike) -> Path:
    """Write `params` to a safetensors file with the config in its metadata, atomically (a temporary file in the
    same directory, fsync, then `os.replace`, through `gpt2fn.files`): an interrupted save never leaves a
    half-written file at `path`."""
    quantized = is_quantized(params)
    if not quantized:
        validate(params, source="params to save")
    elif not isinstance(params, GPTParams):
        raise TypeError(f"params to save must be a GPTParams tree, got {type(params).__name__}")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file name such as {path / 'model.safetensors'}")
    metadata = {"format": "pt", "gpt2fn.format": FORMAT_VERSION,
                _CONFIG_KEY: json.dumps(params.config.to_dict(), sort_keys=True)}
    if quantized:
        metadata[_QUANT_KEY] = "int8"
    tensors = _disjoint(dict(named_leaves(params)))
    try:
        atomic_write_path(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except OSError as exc:
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path

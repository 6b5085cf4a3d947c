"""Checkpoints at the border: every GPT-2 file people hold -> the params pytree, and back to safetensors.

    params = gpt2fn.load("gpt2_model.pth")          # the seed's GPTModel state dict (raw or wrapped)
    params = gpt2fn.load("out/ckpt.pt")             # nanoGPT
    params = gpt2fn.load("path/to/hf-dir")          # Hugging Face: config.json + model.safetensors / .bin / shards
    params = gpt2fn.load("gpt2", dtype=torch.bfloat16, device="cuda")   # a hub name, from the local cache first
    gpt2fn.save(params, "model.safetensors")        # config in the metadata; load() gives back the same tree

Flow: source -> `detect.read_source` (safe readers in `files`) -> `detect.adapter_for` -> one adapter (`seed`,
`hf`, `nanogpt`, `native`) maps names and transposes -> `params_from_dict` -> `validate`. Every failure is a
:class:`CheckpointError` (a ValueError) naming the file, what was expected, and what to do.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..params import GPTParams, params_from_dict, validate
from . import native
from .common import CheckpointError, CheckpointNotFoundError
from .detect import ADAPTERS, adapter_for, read_source
from .hf import save_hf
from .native import save

__all__ = ["load", "load_checkpoint", "save", "save_hf", "Checkpoint", "CheckpointError",
           "CheckpointNotFoundError", "LAYOUTS", "parse_dtype", "parse_device"]

LAYOUTS = {name: module.LAYOUT for name, module in ADAPTERS.items()}
"""Short name -> description of every layout `load` understands."""

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class Checkpoint:
    """What `load_checkpoint` found: the params and how they were read (for `gpt2fn inspect`)."""

    params: GPTParams
    layout: str
    """Short layout name, a key of LAYOUTS: `gpt2fn`, `seed`, `hf` or `nanogpt`."""
    source: str
    files: tuple[Path, ...]
    ignored: tuple[str, ...]
    """Entries of the file that were read and deliberately not used, each with its reason."""
    notes: tuple[str, ...]
    """How the config was decided, prefixes stripped, and the like."""


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or a name (`float32`, `bf16`, `float16`, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise CheckpointError(f"dtype must be a torch.dtype or a name such as 'float32', got "
                              f"{type(dtype).__name__} {dtype!r}")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def parse_device(device: torch.device | str | None) -> torch.device | None:
    """A torch device that exists on this machine, from itself or a name (`cpu`, `cuda`, `cuda:1`, `mps`);
    a CheckpointError naming the choices for a name torch does not know or a device that is not there."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise CheckpointError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', "
                              f"got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"device {device!r} is not a device torch knows ({exc}); "
                              "use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CheckpointError(f"device {device!r}: this machine (or this torch build) has no CUDA GPU; "
                                  "use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise CheckpointError(f"device {device!r}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CheckpointError(f"device {device!r}: MPS is not available on this machine; use device='cpu'")
    return dev


def load_checkpoint(source: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, *, n_heads: int | None = None) -> Checkpoint:
    """Like :func:`load`, returning also the detected layout, the files read and what was ignored."""
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating type for weights, got {dtype}")
    raw = read_source(source)
    name = adapter_for(raw)
    if name == "gpt2fn" and native.quantized_format(raw) is not None:
        params = native.load_quantized(raw, device=device, dtype=dtype)
        return Checkpoint(params=params, layout=name, source=raw.source, files=tuple(raw.files),
                          ignored=tuple(raw.ignored), notes=tuple(raw.notes))
    config, tensors, ignored, notes = ADAPTERS[name].convert(raw, n_heads=n_heads, device=device, dtype=dtype)
    try:
        params = validate(params_from_dict(config, tensors, source=raw.source), source=raw.source)
    except ValueError as exc:  # the adapter's own checks should have caught this: say so, plainly
        raise CheckpointError(str(exc)) from exc
    return Checkpoint(params=params, layout=name, source=raw.source, files=tuple(raw.files),
                      ignored=tuple(raw.ignored + ignored), notes=tuple(raw.notes + notes))


def load(source: str | os.PathLike, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, *, n_heads: int | None = None) -> GPTParams:
    """The params pytree of any GPT-2 checkpoint: a gpt2fn safetensors file, the seed's `.pth`, a Hugging Face
    directory / `.safetensors` / `.bin`, a nanoGPT `ckpt.pt`, or a hub name (`gpt2`, `org/name`).

    The layout is detected from the file; the config is inferred from the tensor shapes plus `config.json` /
    `model_args` where present. The head count is read from the file; when the file has none it is
    `emb_dim // 64`, or pass `n_heads`. Pickles load with `weights_only=True` only; safetensors are
    memory-mapped and each tensor is moved/cast once to `device` / `dtype`.
    """
    return load_checkpoint(source, device=device, dtype=dtype, n_heads=n_heads).params

"""The resumable training state on disk: one safetensors file, written atomically.

`DIR/state.safetensors` holds everything a run needs to continue exactly where it stopped:

    params.<leaf>        the parameters (names as `gpt2fn.params_to_dict`)
    opt.mu.<leaf>        AdamW first moments        opt.nu.<leaf>   second moments
    rng.<name>           generator states (uint8): `data` (window sampling = the data position), `dropout`
    metadata             JSON strings: format, step, model config, train config, data identity, world size

Atomicity: written through `gpt2fn.files.atomic_write` (temporary file in the same directory, fsync,
`os.replace`), so a crash or a full disk mid-write leaves the previous checkpoint whole; a temporary file left by
a hard kill is removed by the next write (`gpt2fn.files.remove_stale_temps`). No pickle anywhere: tensors and JSON
only. A state file that is truncated, corrupt or not a training state raises `CheckpointError` naming it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from ..checkpoints.common import CheckpointError
from ..config import GPTConfig
from ..files import atomic_write
from ..params import GPTParams, params_from_dict, params_to_dict
from .optim import AdamWState

__all__ = ["TrainState", "save_state", "load_state", "atomic_write", "STATE_FILE", "FORMAT"]

STATE_FILE = "state.safetensors"
FORMAT = "gpt2fn-train-state-v1"
_CHUNK = 1 << 20


@dataclass
class TrainState:
    """Everything that changes during training (the loop's carry)."""

    params: GPTParams
    opt: AdamWState
    step: int
    rng: dict[str, Tensor] = field(default_factory=dict)
    """Generator states by name (`torch.Generator.get_state()`)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts saved alongside: train config, data identity, world size."""


def _write_all(fh: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        fh.write(view[i:i + _CHUNK])


def save_state(state: TrainState, path: str | os.PathLike[str]) -> Path:
    """Write `state` to `path` atomically (see the module docstring for the layout)."""
    tensors: dict[str, Tensor] = {}
    for prefix, tree in (("params.", state.params), ("opt.mu.", state.opt.mu), ("opt.nu.", state.opt.nu)):
        for name, t in params_to_dict(tree).items():
            tensors[prefix + name] = t.detach().to("cpu").contiguous()
    for name, s in state.rng.items():
        tensors[f"rng.{name}"] = s.to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "step": str(state.step),
        "opt_step": str(int(state.opt.step)),
        "config": json.dumps(state.params.config.to_dict()),
        "meta": json.dumps(state.meta),
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write(path, lambda fh: _write_all(fh, data))


def load_state(path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> TrainState:
    """Read a training state written by :func:`save_state` (onto `device`).

    A missing file raises FileNotFoundError; one that is truncated, corrupt or not a training state raises
    `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {str(path)!r}; train without --resume first")
    fix = "it is truncated or corrupt (a copy cut short?); restore it or start again without --resume"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{str(path)!r} is not a gpt2fn training state (format "
                                      f"{metadata.get('format')!r}, expected {FORMAT!r}); for plain weights use "
                                      "--checkpoint instead of --resume")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{str(path)!r} is not a readable training state ({exc}); {fix}") from exc
    try:
        config = GPTConfig.from_dict(json.loads(metadata["config"]))
        step, opt_step = int(metadata["step"]), int(metadata["opt_step"])
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise CheckpointError(f"{str(path)!r} has invalid training-state metadata ({type(exc).__name__}: {exc}); "
                              f"{fix}") from exc

    def tree(prefix: str) -> GPTParams:
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            return params_from_dict(config, part, source=f"{path} ({prefix.rstrip('.')})")
        except ValueError as exc:
            raise CheckpointError(f"{exc}\n  {fix}") from exc

    params, mu, nu = tree("params."), tree("opt.mu."), tree("opt.nu.")
    if device is not None:
        params, mu, nu = (torch.utils._pytree.tree_map(lambda t: t.to(device), x) for x in (params, mu, nu))
    opt = AdamWState(torch.tensor(opt_step, dtype=torch.int64), mu, nu)
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainState(params, opt, step, rng, meta)

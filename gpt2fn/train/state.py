"""The resumable training state on disk: one safetensors file, written atomically.

`DIR/state.safetensors` holds everything a run needs to continue exactly where it stopped:

    params.<leaf>        the parameters (names as `gpt2fn.params_to_dict`)
    opt.mu.<leaf>        AdamW first moments        opt.nu.<leaf>   second moments
    rng.<name>           generator states (uint8): `data` (window sampling = the data position), `dropout`
    metadata             JSON strings: format, step, model config, train config, data identity, world size

Atomicity: the bytes go to a temporary file in the same directory, are flushed and fsync'd, and only then
`os.replace`d over the old file (an atomic rename on POSIX and Windows), so a crash or a full disk mid-write
leaves the previous checkpoint whole; the temporary file is removed on failure (and ignored if a kill left it).
No pickle anywhere: tensors and JSON only.
"""

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from torch import Tensor

from ..config import GPTConfig
from ..params import GPTParams, params_from_dict, params_to_dict
from .optim import AdamWState

__all__ = ["TrainState", "save_state", "load_state", "atomic_write", "STATE_FILE", "FORMAT"]

STATE_FILE = "state.safetensors"
FORMAT = "gpt2fn-train-state-v1"
_CHUNK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(fileobj)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """Read a training state written by :func:`save_state` (onto `device`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {str(path)!r}; train without --resume first")
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a gpt2fn training state (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); for plain weights use --checkpoint instead of --resume")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = GPTConfig.from_dict(json.loads(metadata["config"]))

    def tree(prefix: str) -> GPTParams:
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return params_from_dict(config, part, source=f"{path} ({prefix.rstrip('.')})")

    params, mu, nu = tree("params."), tree("opt.mu."), tree("opt.nu.")
    if device is not None:
        params, mu, nu = (torch.utils._pytree.tree_map(lambda t: t.to(device), x) for x in (params, mu, nu))
    opt = AdamWState(torch.tensor(int(metadata["opt_step"]), dtype=torch.int64), mu, nu)
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return TrainState(params, opt, int(metadata["step"]), rng, json.loads(metadata.get("meta", "{}")))

"""Reading checkpoint files safely: sniff the bytes, never unpickle code, memory-map what can be mapped.

- safetensors: `safe_open` maps the file; the tensors are views of the mapping (no copy until moved or cast).
- `torch.save` zip archives (`.pt`, `.pth`, `.bin`): `torch.load(weights_only=True)`, read into memory.
- legacy `torch.save` pickles: `torch.load(weights_only=True)` (cannot be mapped).
Anything the weights-only unpickler refuses (an object that would run code on load) is reported, never retried
with `weights_only=False`. Every failure becomes a CheckpointError naming the file and what was expected.
"""

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .common import CheckpointError, Raw

__all__ = ["sniff", "read_file", "read_json", "read_safetensors", "read_torch", "unwrap"]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel


def sniff(path: Path) -> str:
    """`safetensors`, `torch-zip` or `pickle` from the first bytes; a CheckpointError for anything else."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected a checkpoint (safetensors or torch.save). "
                              "The download or save was probably interrupted: fetch or write it again")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors before pickle: a header of 1024-1279 bytes starts with b"\x80\x04", like a pickle's protocol mark
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is a truncated safetensors file: its header claims {header_len} bytes "
                                  f"but the file has {size}; download or write it again")
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    raise CheckpointError(f"{path} is not a checkpoint gpt2fn can read: expected a safetensors file or a "
                          f"torch.save archive (.pt/.pth/.bin), but its first bytes are {head[:8]!r}")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (memory-mapped views) and the string metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); it is truncated or corrupt: "
                              "download or write it again") from exc
    return tensors, metadata


def read_torch(path: Path, kind: str) -> Any:
    """`torch.load` with the weights-only unpickler (tensors, dicts, lists, numbers, strings only)."""
    try:
        # not memory-mapped: most pickled layouts are transposed on load, and mapped pages would stay resident
        # beside the copies (1.77x the weights for the seed's .pth); read into memory, the sources are freed one
        # by one as `common.assemble` converts them
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # a forbidden object shows as a GLOBAL opcode naming it; anything else the unpickler stops at ("Unsupported
        # operand", "Can only build ...", a bad memo) is a damaged byte stream, not an attack
        refused = [line.strip() for line in text.splitlines() if "GLOBAL" in line]
        if refused:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that would construct objects other than tensors "
                f"({refused[0]}), and unpickling those can run arbitrary code. If you trust the file, convert "
                "it in a trusted environment: `sd = torch.load(path, weights_only=False)`, then save only the "
                "state dict (`safetensors.torch.save_file(sd, 'model.safetensors')` or `torch.save(sd, ...)`)"
            ) from exc
        raise CheckpointError(f"{path} is a corrupt or truncated torch.save file ({_first_line(text)}); "
                              "download or write it again") from exc
    except Exception as exc:  # noqa: BLE001 -- bytes from disk: whatever a damaged stream makes torch raise
        # (EOFError, IndexError, KeyError, RuntimeError, struct.error, ...) means the file is corrupt
        raise CheckpointError(f"{path} could not be read as a torch.save file ({type(exc).__name__}: "
                              f"{_first_line(str(exc)) or 'unexpected end of data'}); it is truncated or corrupt: "
                              "download or write it again") from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); expected a JSON object") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path} is JSON nested too deeply to be a config; expected a flat JSON object") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object")
    return data


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def unwrap(obj: Any, source: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The state dict inside what `torch.load` returned, the metadata next to it, and what was left out.

    Accepts a raw state dict, `{"model": sd, "model_args": ...}` (nanoGPT), `{"model_state_dict": sd, ...}`
    (the seed's training checkpoints) and `{"state_dict": sd}`.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}; expected a state dict (name -> tensor) "
                              "or a dict with 'model' / 'model_state_dict' / 'state_dict'")
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(obj.get(key), dict):
            meta = {k: obj[k] for k in ("model_args", "config") if isinstance(obj.get(k), dict)}
            return obj[key], meta, [f"{k} (not model weights)" for k in obj if k != key]
    return obj, {}, []


def to_raw(state: dict[str, Any], source: str, files: list[Path], meta: dict[str, Any], ignored: list[str]) -> Raw:
    """Strip wrapper prefixes, set aside non-tensor entries, and return the Raw checkpoint."""
    tensors: dict[str, Tensor] = {}
    notes: list[str] = []
    stripped: set[str] = set()
    for key, value in state.items():
        name = str(key)
        while name.startswith(_WRAPPER_PREFIXES):
            prefix = next(p for p in _WRAPPER_PREFIXES if name.startswith(p))
            stripped.add(prefix)
            name = name[len(prefix):]
        if isinstance(value, Tensor):
            if name in tensors:
                raise CheckpointError(f"{source} holds '{name}' twice (with and without a wrapper prefix); "
                                      "keep one")
            tensors[name] = value
        else:
            ignored.append(f"{key} (a {type(value).__name__}, not a tensor)")
    if stripped:
        notes.append(f"stripped wrapper prefix {', '.join(sorted(stripped))} from the keys")
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors; expected a GPT-2 state dict")
    return Raw(source=source, tensors=tensors, files=files, meta=meta, notes=notes, ignored=ignored)


def read_file(path: Path) -> Raw:
    """One checkpoint file of any supported container, as a Raw checkpoint."""
    kind = sniff(path)
    if kind == "safetensors":
        tensors, metadata = read_safetensors(path)
        return to_raw(tensors, str(path), [path], {"safetensors": metadata}, [])
    state, meta, ignored = unwrap(read_torch(path, kind), str(path))
    return to_raw(state, str(path), [path], meta, ignored)

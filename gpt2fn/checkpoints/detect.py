"""Format detection: a source (file, directory or hub name) -> its raw tensors -> the adapter that understands them.

Containers are recognised by their bytes (gpt2fn.checkpoints.files), layouts by their key names and, where the
names are shared (Hugging Face and nanoGPT both say `h.0.attn.c_attn.weight`), by the orientation of the
matrices against the embedding width.
"""

import os
from pathlib import Path
from types import ModuleType

from . import hf, hub, nanogpt, native, seed
from .common import CheckpointError, CheckpointNotFoundError, Raw
from .files import read_file, read_json, to_raw

__all__ = ["ADAPTERS", "read_source", "read_directory", "adapter_for"]

ADAPTERS: dict[str, ModuleType] = {"gpt2fn": native, "seed": seed, "hf": hf, "nanogpt": nanogpt}

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_source(source: str | os.PathLike) -> Raw:
    """Read a file, a Hugging Face directory, or a hub name (resolved through the local cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return read_directory(path)
    if path.is_file():
        raw = read_file(path)
        sibling = path.parent / "config.json"
        if sibling.is_file() and not native.matches(raw):
            try:  # a bare model.safetensors next to its Hugging Face config; anything else there is not ours
                config = read_json(sibling)
            except CheckpointError:
                config = {}
            if config.get("model_type") == "gpt2" or "n_embd" in config:
                raw.meta["config.json"] = config
                raw.files.append(sibling)
        return raw
    text = os.fspath(source)
    if isinstance(source, str) and hub.looks_like_hub_name(text):
        raw = read_directory(hub.resolve(text))
        raw.notes.insert(0, f"hub model {text!r} from {raw.files[0].parent}")
        return raw
    raise CheckpointNotFoundError(f"no such file or directory: {text}; expected a checkpoint file (.safetensors, "
                                  ".pt, .pth, .bin), a Hugging Face model directory, or a hub name such as 'gpt2'")


def read_directory(path: Path) -> Raw:
    """A Hugging Face model directory: config.json plus weights (single file or sharded, safetensors first)."""
    weights = next((path / n for n in _HF_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        present = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(f"{path} is a directory without model weights: expected one of {', '.join(_HF_WEIGHTS)} "
                              f"(a Hugging Face model directory); it holds {present or 'nothing'}")
    if weights.name.endswith(".index.json"):
        raw = _read_sharded(weights)
    else:
        raw = read_file(weights)
    raw.source = str(path)
    config = path / "config.json"
    if config.is_file():
        raw.meta["config.json"] = read_json(config)
        raw.files.append(config)
    return raw


def _read_sharded(index: Path) -> Raw:
    """Shards listed by a `*.index.json` (`{"weight_map": {key: shard file}}`), merged into one Raw."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object; expected a sharded-checkpoint index")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v or Path(v).name != v]
    if bad:
        raise CheckpointError(f"{index} maps keys to things that are not shard file names in its directory "
                              f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); expected "
                              '{"weight_map": {"key": "model-00001-of-00002.safetensors", ...}}')
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (index.parent / s).is_file()]
    if absent:
        raise CheckpointError(f"{index} lists shards that are not in {index.parent}: {', '.join(absent)}; "
                              "download the missing files")
    state: dict = {}
    files, ignored = [index], []
    for shard in shards:
        part = read_file(index.parent / shard)
        state.update(part.tensors)
        files += part.files
        ignored += part.ignored
    lost = [k for k in weight_map if k not in state and k.removeprefix("_orig_mod.") not in state]
    if lost:
        raise CheckpointError(f"{index} maps {len(lost)} keys to shards that do not hold them: {', '.join(lost[:8])}")
    return to_raw(state, str(index), files, {}, ignored)


def adapter_for(raw: Raw) -> str:
    """The name (a key of ADAPTERS) of the layout that understands `raw`'s keys."""
    for name, adapter in ADAPTERS.items():
        if adapter.matches(raw):
            return name
    keys = list(raw.tensors)
    sample = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    raise CheckpointError(
        f"{raw.source} holds {len(keys)} tensors in a layout gpt2fn does not know ({sample}); expected one of: "
        "gpt2fn safetensors, the seed's GPTModel (tok_emb/trf_blocks...), Hugging Face GPT-2 "
        "([transformer.]wte/h.N.attn.c_attn...), nanoGPT (transformer.wte/h.N... with nn.Linear weights)")

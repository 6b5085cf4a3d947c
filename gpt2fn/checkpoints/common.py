"""What every adapter shares: the error type, the raw contents of a checkpoint, and the name map that turns
foreign keys into the pytree, checking presence and shape of every key in the checkpoint's own names.

An adapter is a table `{our name template: Rule(their keys, transpose)}` plus a function that infers the
config from the tensors. `assemble` walks the names the config implies, so a missing key, a key nobody
claimed and a key of the wrong shape are all reported together, by the names the user sees in the file.
"""

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import GPTConfig
from ..params import expected_shapes, key_report

__all__ = ["CheckpointError", "CheckpointNotFoundError", "Raw", "Rule", "rule", "assemble", "need", "count_layers",
           "heads_for", "mlp_dim_for", "config_errors", "config_int", "config_float", "config_flag", "matrix_dim",
           "check_layers", "check_stated"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (or saved): the message names the file, what was expected and what
    to do. The CLI prints it as one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The source names no file, directory or cached hub model."""


@dataclass
class Raw:
    """A checkpoint read from disk, before any adapter: flat tensors plus whatever the file said about itself."""

    source: str
    """How to name the checkpoint in messages (usually its path)."""
    tensors: dict[str, Tensor]
    """The state dict, with `_orig_mod.` / `module.` wrapper prefixes already removed."""
    files: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """`safetensors` (file metadata), `config.json`, `model_args` (nanoGPT), `config` (a wrapper's dict)."""
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    """Entries read and deliberately not used, each with the reason."""


@dataclass(frozen=True)
class Rule:
    """Where one of our leaves comes from: one foreign key, or several concatenated along the output axis
    (the seed's separate query/key/value), stored `[out, in]` (`nn.Linear`) when `transpose`."""

    theirs: tuple[str, ...]
    transpose: bool = False


def rule(*theirs: str, transpose: bool = False) -> Rule:
    return Rule(tuple(theirs), transpose)


def need(raw: Raw, key: str, layout: str, ndim: int = 2) -> Tensor:
    """A tensor the config is inferred from; its absence means the file is not (all of) this layout. Its rank is
    checked here, before any shape is unpacked from it."""
    if key not in raw.tensors:
        raise CheckpointError(f"{raw.source} looks like a {layout} checkpoint but has no '{key}'; "
                              f"its keys start with {_sample(raw.tensors)}")
    t = raw.tensors[key]
    if t.ndim != ndim or 0 in t.shape:
        raise CheckpointError(f"{raw.source}: '{key}' has shape {list(t.shape)}, expected a non-empty "
                              f"{ndim}-d tensor; the file is corrupt or of another architecture")
    return t


def matrix_dim(raw: Raw, key: str, axis: int) -> int | None:
    """`shape[axis]` of an optional matrix the config is inferred from (None when absent); a CheckpointError
    when it is there but not a matrix."""
    t = raw.tensors.get(key)
    if t is None:
        return None
    if t.ndim != 2:
        raise CheckpointError(f"{raw.source}: '{key}' has shape {list(t.shape)}, expected a matrix (2-d); "
                              "the file is corrupt or of another architecture")
    return int(t.shape[axis])


@contextlib.contextmanager
def config_errors(source: str) -> Iterator[None]:
    """Report a config inferred from `source` that GPTConfig (or a value conversion) refuses as a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"{source}: the inferred config is invalid: {exc}") from exc


def config_int(value: Any, name: str, where: str, source: str) -> int:
    """A count read from a file's config: a positive integer (an integral float like 12.0 is accepted, as
    `json` writes some), never a bool, a string, NaN or infinity."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where} of {source} says {name}={value!r}; expected a positive integer. "
                              "Fix the file's config (or re-export it from the model that wrote it)")
    return value


def config_float(value: Any, name: str, where: str, source: str, default: float) -> float:
    """A real number read from a file's config (None: `default`): finite, not a bool or a string."""
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise CheckpointError(f"{where} of {source} says {name}={value!r}; expected a finite number. "
                              "Fix the file's config (or re-export it from the model that wrote it)")
    return float(value)


def config_flag(value: Any, name: str, where: str, source: str) -> bool | None:
    """A true/false switch read from a file's config (None when absent); only JSON booleans are accepted."""
    if value is None or isinstance(value, bool):
        return value
    raise CheckpointError(f"{where} of {source} says {name}={value!r}; expected true or false")


_MAX_REPORTED = 8


def count_layers(raw: Raw, prefix: str) -> int:
    """Number of blocks, from the `{prefix}{i}.` keys present: they must be exactly 0 .. n-1, so an absurd index
    (a key `h.1000000000000000000.x`) or a gap is reported by name before anything is allocated or looped over."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexed = [(m.group(1), k) for k in raw.tensors if (m := pattern.match(k))]
    absurd = next((k for i, k in indexed if len(i) > 9), None)  # int() of 5000 digits would itself fail
    if absurd is not None:
        raise CheckpointError(f"{raw.source} has a key with an absurd block index, {absurd[:80]!r}; no GPT-2 has "
                              "that many blocks: the file is corrupt, remove the key")
    found = {int(i) for i, _ in indexed}
    if not found:
        raise CheckpointError(f"{raw.source} has no transformer blocks (no keys starting with '{prefix}0.'); "
                              f"its keys start with {_sample(raw.tensors)}")
    n = max(found) + 1
    if n != len(found):
        gaps: list[str] = []
        prev = -1
        for i in sorted(found):
            if i > prev + 1:
                gaps.append(f"{prev + 1}" if i == prev + 2 else f"{prev + 1}..{i - 1}")
            prev = i
        shown = ", ".join(gaps[:_MAX_REPORTED]) + (", ..." if len(gaps) > _MAX_REPORTED else "")
        raise CheckpointError(f"{raw.source} has blocks {prefix}N. up to N={max(found)} but no keys for blocks "
                              f"{shown}; the file is incomplete or has a stray key such as "
                              f"'{next(k for k in raw.tensors if k.startswith(f'{prefix}{max(found)}.'))}'")
    return n


def check_layers(n_layers: int, stated: Any, name: str, where: str, source: str) -> None:
    """A layer count stated in the file's config must match the blocks present (a missing last block is an
    error, not a shorter model)."""
    if stated is None:
        return
    stated = config_int(stated, name, where, source)
    if stated != n_layers:
        missing = f"; blocks {n_layers}..{stated - 1} are missing" if stated > n_layers else ""
        raise CheckpointError(f"{where} of {source} says {name}={stated} but the file holds {n_layers} blocks"
                              f"{missing}; the file is incomplete or its config belongs to another model")


def check_stated(inferred: Mapping[str, int], stated: Mapping[str, Any], where: str, source: str) -> None:
    """Sizes a file's config states (`stated`) must be positive integers equal to what its tensors say."""
    clash = []
    for k, v in inferred.items():
        if stated.get(k) is not None and (n := config_int(stated[k], k, where, source)) != v:
            lost = f", blocks {v}..{n - 1} missing" if k.startswith("n_layer") and n > v else ""
            clash.append(f"{k}={stated[k]} (tensors say {v}){lost}")
    if clash:
        raise CheckpointError(f"{where} of {source} disagrees with the weights: {', '.join(clash)}; "
                              "the config belongs to another model")


def heads_for(emb_dim: int, stated: Any, source: str, where: str, n_heads: int | None) -> int:
    """The head count: an explicit `n_heads`, else what the file states, else GPT-2's 64-wide heads."""
    if stated is not None:
        stated = config_int(stated, "n_heads", where, source)
    if n_heads is not None:
        if stated is not None and stated != n_heads:
            raise CheckpointError(f"n_heads={n_heads} was passed but {where} of {source} says {stated}; "
                                  "drop the argument or fix the file")
        return n_heads
    if stated is not None:
        return stated
    if emb_dim % 64 == 0:
        return emb_dim // 64
    raise CheckpointError(f"{source} does not say how many attention heads it has, and its width emb_dim="
                          f"{emb_dim} is not a multiple of GPT-2's head size 64; pass n_heads=... "
                          "(`--n-heads` on the command line)")


def mlp_dim_for(emb_dim: int, hidden: int) -> int | None:
    return None if hidden == 4 * emb_dim else hidden


def _sample(tensors: Mapping[str, Any], n: int = 6) -> str:
    keys = list(tensors)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} keys)" if keys else "[] (no tensors)"


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def assemble(raw: Raw, config: GPTConfig, rules: Mapping[str, Rule] | None, *, layout: str,
             ignore: Callable[[str], str | None] = lambda key: None,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None
             ) -> tuple[dict[str, Tensor], list[str]]:
    """Our `{name: tensor}` for `config`, built from `raw` by `rules` (None: the names are already ours).

    Each tensor is moved/cast once, then transposed or concatenated where it lives, so no second full copy of
    the weights exists. Returns the dict and the ignored keys (with reasons); raises one CheckpointError that
    lists every missing, unexpected and mis-shaped key by its name in the file.
    """
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    ignored: list[str] = []
    for key in list(raw.tensors):  # set aside what is ignored (mask buffers, a tied head) before any copy is made
        reason = ignore(key)
        if reason is not None:
            ignored.append(f"{key} ({reason})")
            del raw.tensors[key]
    for name, shape in expected_shapes(config).items():
        m = _BLOCK.fullmatch(name)
        template, layer = (f"blocks.{{i}}.{m.group(2)}", m.group(1)) if m else (name, None)
        r = Rule((template,)) if rules is None else rules[template]
        keys = [k.format(i=layer) for k in r.theirs]
        absent = [k for k in keys if k not in raw.tensors]
        if absent:
            missing += absent
            continue
        want = list(shape)
        want[-1] //= len(keys)
        if r.transpose:
            want.reverse()
        parts = [raw.tensors[k] for k in keys]
        used.update(keys)
        bad = [f"{k}: got {list(t.shape)}, expected {want}"
               for k, t in zip(keys, parts, strict=True) if list(t.shape) != want]
        if bad:
            misshaped += bad
            continue
        if dtype is None and parts[0].is_floating_point():
            dtype = parts[0].dtype  # one dtype for the whole tree: the token embedding's (it comes first)
        parts = [t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in parts]
        if r.transpose:
            parts = [t.T for t in parts]
        out[name] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).contiguous()
        for k in keys:  # drop the source as soon as its converted copy exists: the peak stays near one copy
            del raw.tensors[k]
        del parts

    unexpected = [key for key in raw.tensors if key not in used]
    if missing or unexpected or misshaped:
        report = key_report(f"{raw.source} is not a complete {layout} checkpoint for {_brief(config)}:",
                            missing, unexpected, misshaped)
        raise CheckpointError(report + "\n  The config was inferred from the file's own tensors, so the file is "
                              "inconsistent or of another architecture; re-export it from the model that wrote it.")
    return out, ignored


def _brief(config: GPTConfig) -> str:
    return (f"vocab {config.vocab_size}, context {config.context_length}, width {config.emb_dim}, "
            f"{config.n_layers} layers, qkv_bias={config.qkv_bias}, bias={config.bias}, tie_head={config.tie_head}")

"""The dimension glossary and the one switch for run-time shape checks.

Axis names used in every annotation of gpt2fn (pairwise distinct in the tests, so a swapped axis cannot pass):

| name      | meaning                                                   | GPT-2 124M |
|-----------|-----------------------------------------------------------|------------|
| batch     | independent sequences                                     | any        |
| seq       | positions of the current input (queries)                  | <= ctx     |
| kv_seq    | positions attended to (keys/values, cache included)       | <= ctx     |
| d_model   | width of the residual stream (`emb_dim`)                  | 768        |
| heads     | attention heads (`n_heads`)                               | 12         |
| head_dim  | width of one head (`d_model // heads`)                    | 64         |
| d_mlp     | hidden width of the MLP (4 * d_model)                     | 3072       |
| vocab     | rows of the token embedding (`vocab_size`)                | 50257      |
| ctx       | rows of the position embedding (`context_length`)         | 1024       |

Checking: every layer function is wrapped by :func:`checked`, i.e. ``jaxtyping.jaxtyped(typechecker=beartype)``.
It is on by default. Turn it off for speed with the environment variable ``GPT2FN_CHECKS=0`` (read once at import)
or, for a block of code, with ``with gpt2fn.shape_checks(False): ...``. Under ``torch.compile`` the checks step aside.
"""

import contextlib
import contextvars
import functools
import io
import os
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jaxtyping
import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

__all__ = [
    "Bool", "Float", "Int", "Tensor", "Hidden", "TokenIds", "Logits",
    "checked", "check_record", "checks_enabled", "shape_checks", "ShapeError",
]

# Aliases for the common shapes.
Hidden = Float[Tensor, "*batch seq d_model"]
TokenIds = Int[Tensor, "batch seq"]
Logits = Float[Tensor, "batch seq vocab"]


def _env_default() -> bool:
    value = os.environ.get("GPT2FN_CHECKS", "1").strip().lower()
    return value not in ("0", "false", "off", "no")


_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("gpt2fn_checks", default=_env_default())  # noqa: B039 (a bool)


def checks_enabled() -> bool:
    """Whether run-time shape checks are on in the current context."""
    return _CHECKS.get()


@contextlib.contextmanager
def shape_checks(enabled: bool) -> Iterator[None]:
    """Turn run-time shape checks on or off inside a ``with`` block (restored on exit, thread/task-local)."""
    token = _CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _CHECKS.reset(token)


class ShapeError(TypeError):
    """A parameter record whose tensors disagree with the dimensions bound by the inputs."""


F = TypeVar("F", bound=Callable[..., Any])


def checked(fn: F) -> F:
    """Check ``fn``'s jaxtyping annotations with beartype at every call, unless checks are off or compiling."""
    typed = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling() and _CHECKS.get():
            return typed(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.unchecked = fn  # type: ignore[attr-defined]
    return typing.cast(F, wrapper)


def _is_record(value: Any) -> bool:
    return hasattr(type(value), "_fields") and not isinstance(value, Tensor)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_record(record: Any, name: str = "params") -> None:
    """Check each tensor field of a parameter record (see `gpt2fn.params.record`) against its annotation.

    Called first thing inside a :func:`checked` layer function, so the fields share the dimension bindings of
    the function's inputs: a ``d_model`` of 64 in ``x`` and 48 in ``record.scale`` is an error naming both.
    A no-op when checks are off.
    """
    if torch.compiler.is_compiling() or not _CHECKS.get():
        return
    hints = _field_hints(type(record))
    for field in record._fields:
        value = getattr(record, field)
        path = f"{name}.{field}"
        if _is_record(value):
            check_record(value, path)
            continue
        hint = hints.get(field)
        if hint is None or (isinstance(value, tuple) and not _is_record(value)):
            continue  # sequences of records (blocks) are checked by the functions that use them
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        if value is None:
            if type(None) not in options:
                raise ShapeError(f"{path} is None, but this layer needs a tensor of {hint}")
            continue
        tensor_types = [t for t in options if t is not type(None)]
        if not any(isinstance(value, t) for t in tensor_types):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            dtype = getattr(value, "dtype", "")
            expected = " or ".join(getattr(t, "dim_str", str(t)) for t in tensor_types)
            raise ShapeError(
                f"{path} has shape {list(shape) if isinstance(shape, tuple) else shape} {dtype}; expected "
                f"[{expected}] consistent with the inputs. {_bindings()}\n"
                "Check that the parameters were built for the same config as the inputs."
            )


def _bindings() -> str:
    """The current jaxtyping dimension bindings, through its public `print_bindings` (no private import)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jaxtyping.print_bindings()
    return out.getvalue().strip()


try:  # Python >= 3.10: `X | None` builds a types.UnionType
    from types import UnionType as _UnionType
except ImportError:  # pragma: no cover
    _UnionType = typing.Union  # type: ignore[misc,assignment]

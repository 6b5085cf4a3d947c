"""The parameter pytree: typed records nested like the model, with the config as static metadata.

    GPTParams
      tok_emb     [vocab, d_model]        token embedding (also the output head when `config.tie_head`)
      pos_emb     [ctx, d_model]          position embedding
      blocks      tuple[BlockParams, ...] one per layer:
        norm1     LayerNormParams         scale [d_model], shift [d_model] | None
        attn      AttentionParams         w_qkv [d_model, 3*d_model], b_qkv, w_out [d_model, d_model], b_out
        norm2     LayerNormParams
        mlp       MLPParams               w_fc [d_model, d_mlp], b_fc, w_proj [d_mlp, d_model], b_proj
      final_norm  LayerNormParams
      head        [d_model, vocab] | None untied output head; None when tied to `tok_emb`

Matrices are stored `[in, out]` and applied as `x @ W` (the OpenAI / Hugging Face orientation). Only tensors are
leaves (an absent bias is None and no child of its record), so `torch.func.grad`, `vmap`, `jacrev` and
`torch.utils._pytree.tree_map` work on the whole tree. A tied head is the one `tok_emb` leaf, never a copy.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from jaxtyping import Float, Float32, Int8
from torch import Tensor

from .config import GPTConfig
from .html import tree_view

__all__ = [
    "LayerNormParams", "AttentionParams", "MLPParams", "BlockParams", "GPTParams",
    "init_params", "count_params", "tree_to", "named_leaves", "params_to_dict", "params_from_dict",
    "validate", "head_matrix", "expected_shapes", "key_report", "Int8Matrix", "is_quantized",
]


T = TypeVar("T")


def record(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree node whose children are its tensor fields.

    Why not a NamedTuple: torch's pytree treats None as a leaf and `torch.func` rejects non-tensor leaves, so an
    absent bias (None) must be no child at all. Fields marked `static()` (the config) travel in the context.
    """
    cls = dataclasses.dataclass(frozen=True, repr=False)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static"))
    statics = tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("static"))
    cls._fields = names  # type: ignore[attr-defined]

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        present = tuple(n for n in names if getattr(obj, n) is not None)
        return [getattr(obj, n) for n in present], (present, tuple(getattr(obj, n) for n in statics))

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        children, context = flatten(obj)
        return [(pytree.GetAttrKey(n), c) for n, c in zip(context[0], children, strict=True)], context

    def unflatten(children: Any, context: Any) -> Any:
        present, static_values = context
        kwargs = dict.fromkeys(names)
        kwargs.update(zip(present, children, strict=True))
        kwargs.update(zip(statics, static_values, strict=True))
        return cls(**kwargs)

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"gpt2fn.{cls.__qualname__}",
                                flatten_with_keys_fn=flatten_with_keys)
    return cls


def static() -> Any:
    """A record field that is pytree metadata, not a child."""
    return dataclasses.field(metadata={"static": True})


class _Record:
    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, Tensor):
                return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
            if isinstance(v, tuple):
                return f"({len(v)} x {type(v[0]).__name__})" if v else "()"
            return repr(v)
        inner = ", ".join(f"{n}={show(getattr(self, n))}" for n in self._fields)  # type: ignore[attr-defined]
        return f"{type(self).__name__}({inner})"

    def _repr_html_(self) -> str:
        """A notebook's picture: the tree as a collapsible outline with shapes, dtypes and statistics."""
        return tree_view(self)._repr_html_()


@record
class Int8Matrix(_Record):
    """A weight matrix stored as int8 with one fp32 scale per output column, symmetric: the matrix is `q * scale`
    along `axis` (`gpt2fn.quantize`). `axis=1` for the `[in, out]` matrices (a scale per column), `axis=0` for the
    token embedding `[vocab, d_model]`, whose rows are the tied head's output columns (a scale per token, which
    also dequantizes an embedding lookup). A pytree node like every record: `tree_to` moves it (its int8 leaf is
    never cast), `named_leaves` names its leaves `<name>.q` / `<name>.scale`."""

    q: Int8[Tensor, "_rows _cols"]
    scale: Float32[Tensor, " _out"]
    axis: int = static()

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def ndim(self) -> int:
        return 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The matrix it stands for, `q * scale`, in `dtype`."""
        s = self.scale[None, :] if self.axis == 1 else self.scale[:, None]
        return (self.q.to(torch.float32) * s).to(dtype)


Matrix = Tensor | Int8Matrix
"""A weight matrix as a tree holds it: a floating tensor, or int8 with per-column scales."""


def is_quantized(tree: Any) -> bool:
    """Whether any matrix of `tree` is an `Int8Matrix`."""
    return any(isinstance(node, Int8Matrix) for node in pytree.tree_flatten(
        tree, is_leaf=lambda n: isinstance(n, Int8Matrix))[0])


@record
class LayerNormParams(_Record):
    """Layer norm gain and bias (`ln_*.weight/.bias` in GPT-2, `norm*.scale/.shift` in the seed)."""

    scale: Float[Tensor, " d_model"]
    shift: Float[Tensor, " d_model"] | None


@record
class AttentionParams(_Record):
    """Fused query/key/value projection and the output projection (`attn.c_attn`, `attn.c_proj`)."""

    w_qkv: Float[Tensor, "d_model 3*d_model"] | Int8Matrix
    b_qkv: Float[Tensor, " 3*d_model"] | None
    w_out: Float[Tensor, "d_model d_model"] | Int8Matrix
    b_out: Float[Tensor, " d_model"] | None


@record
class MLPParams(_Record):
    """Position-wise feed-forward network (`mlp.c_fc`, `mlp.c_proj`)."""

    w_fc: Float[Tensor, "d_model d_mlp"] | Int8Matrix
    b_fc: Float[Tensor, " d_mlp"] | None
    w_proj: Float[Tensor, "d_mlp d_model"] | Int8Matrix
    b_proj: Float[Tensor, " d_model"] | None


@record
class BlockParams(_Record):
    """One pre-norm transformer block."""

    norm1: LayerNormParams
    attn: AttentionParams
    norm2: LayerNormParams
    mlp: MLPParams


@record
class GPTParams(_Record):
    """All of a GPT-2's weights. `config` is static metadata (pytree context), not a leaf."""

    tok_emb: Float[Tensor, "vocab d_model"] | Int8Matrix
    pos_emb: Float[Tensor, "ctx d_model"]
    blocks: tuple[BlockParams, ...]
    final_norm: LayerNormParams
    head: Float[Tensor, "d_model vocab"] | Int8Matrix | None
    config: GPTConfig = static()

    @property
    def device(self) -> torch.device:
        return self.tok_emb.device

    @property
    def dtype(self) -> torch.dtype:
        """The token embedding's dtype (`torch.int8` for a quantized tree)."""
        return self.tok_emb.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations (residual stream, attention, KV cache) a run over these weights computes in.
        On CPU, 16-bit and int8 weights are storage formats: the kernel widens them to fp32 in registers and
        every activation is fp32 (what llama.cpp and CTranslate2 do on CPUs, whose 16-bit arithmetic is no faster
        and coarser: docs/performance.md). On other devices the weights' floating dtype (GPUs compute in bf16 and
        fp16 at full rate); fp32 for an int8 tree anywhere."""
        dtype = self.pos_emb.dtype
        if isinstance(self.tok_emb, Int8Matrix) or (self.pos_emb.device.type == "cpu" and dtype.itemsize < 4):
            return torch.float32
        return dtype

    def __repr__(self) -> str:
        return (f"GPTParams({count_params(self):,} parameters, {self.dtype}, {self.device}, "
                f"config={self.config})")


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def init_params(config: GPTConfig, seed: int | torch.Generator = 0, *,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GPTParams:
    """GPT-2's initialisation: weights ~ N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers),
    zero biases, unit layer-norm scales. Deterministic for a given seed, whatever the device.

    `dtype` must be a floating torch dtype (`torch.float32`, `torch.bfloat16`, ...) or None (float32); anything
    else raises a ValueError (TypeError when it is not a dtype at all) before any weight is made."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32 or torch.bfloat16, got "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype for weights (torch.float32, torch.bfloat16, "
                         f"torch.float16), got {dtype}")
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig (e.g. gpt2fn.preset('gpt2')), got {type(config).__name__}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    d, m, v, c = config.emb_dim, config.d_mlp, config.vocab_size, config.context_length
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)

    def normal(*shape: int, s: float = std) -> Tensor:
        return torch.randn(*shape, generator=gen) * s

    def zeros(n: int, present: bool = True) -> Tensor | None:
        return torch.zeros(n) if present else None

    def norm() -> LayerNormParams:
        return LayerNormParams(torch.ones(d), zeros(d, config.bias))

    blocks = tuple(
        BlockParams(
            norm1=norm(),
            attn=AttentionParams(normal(d, 3 * d), zeros(3 * d, config.qkv_bias),
                                 normal(d, d, s=resid_std), zeros(d, config.bias)),
            norm2=norm(),
            mlp=MLPParams(normal(d, m), zeros(m, config.bias), normal(m, d, s=resid_std), zeros(d, config.bias)),
        )
        for _ in range(config.n_layers)
    )
    params = GPTParams(
        tok_emb=normal(v, d), pos_emb=normal(c, d), blocks=blocks, final_norm=norm(),
        head=None if config.tie_head else normal(d, v), config=config,
    )
    return tree_to(params, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Tree utilities


def tree_to(params: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move and/or cast every tensor leaf (floating leaves only for `dtype`); returns a new tree."""
    if device is None and dtype is None:
        return params

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    def move_int8(m: Int8Matrix) -> Int8Matrix:  # its scales stay fp32: they are part of the int8 format
        return Int8Matrix(m.q.to(device=device), m.scale.to(device=device), m.axis)

    return pytree.tree_map_only(Tensor, move, pytree.tree_map_only(Int8Matrix, move_int8, params,
                                                                   is_leaf=lambda n: isinstance(n, Int8Matrix)),
                                is_leaf=lambda n: isinstance(n, Int8Matrix))


def count_params(params: Any) -> int:
    """Number of scalars in the tree (a tied head is counted once: it is one leaf)."""
    return sum(t.numel() for t in pytree.tree_leaves(params) if isinstance(t, Tensor))


def _key_name(key: Any) -> str:
    for attr in ("name", "idx", "key"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(params: Any) -> Iterator[tuple[str, Tensor]]:
    """Yield `("blocks.0.attn.w_qkv", tensor)` pairs in tree order (absent biases are skipped)."""
    leaves, _ = pytree.tree_flatten_with_path(params)
    for path, leaf in leaves:
        if isinstance(leaf, Tensor):
            yield ".".join(_key_name(k) for k in path), leaf


def params_to_dict(params: GPTParams) -> dict[str, Tensor]:
    """The tree as a flat `{name: tensor}` dict, the names being the tree paths (our safetensors keys)."""
    return dict(named_leaves(params))


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every leaf name the config implies, with its shape."""
    return {name: tuple(t.shape) for name, t in named_leaves(init_params_meta(config))}


def init_params_meta(config: GPTConfig) -> GPTParams:
    """A tree of the right structure with `meta` tensors (no memory): for shapes and names."""
    d, m = config.emb_dim, config.d_mlp

    def t(*shape: int, present: bool = True) -> Tensor | None:
        return torch.empty(*shape, device="meta") if present else None

    def norm() -> LayerNormParams:
        return LayerNormParams(t(d), t(d, present=config.bias))

    blocks = tuple(
        BlockParams(norm(), AttentionParams(t(d, 3 * d), t(3 * d, present=config.qkv_bias), t(d, d),
                                            t(d, present=config.bias)),
                    norm(), MLPParams(t(d, m), t(m, present=config.bias), t(m, d), t(d, present=config.bias)))
        for _ in range(config.n_layers)
    )
    return GPTParams(t(config.vocab_size, d), t(config.context_length, d), blocks, norm(),
                     None if config.tie_head else t(d, config.vocab_size), config)


def params_from_dict(config: GPTConfig, tensors: dict[str, Tensor], *, source: str = "checkpoint") -> GPTParams:
    """Build the tree from `{name: tensor}` (names as in :func:`params_to_dict`), reporting every missing,
    unexpected or mis-shaped key at once."""
    skeleton = init_params_meta(config)
    expected = dict(named_leaves(skeleton))
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [f"{k}: got {list(tensors[k].shape)}, expected {list(expected[k].shape)}"
                 for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        raise ValueError(key_report(f"{source} does not match the parameters of {config}:", missing, unexpected,
                                    misshaped))
    leaves, spec = pytree.tree_flatten(skeleton)
    names = [name for name, _ in named_leaves(skeleton)]
    assert len(names) == len(leaves)
    return pytree.tree_unflatten([tensors[n] for n in names], spec)


def key_report(header: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """A multi-line report of every missing, unexpected and mis-shaped key under a one-line `header`."""
    lines = [header]
    for label, items, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                              ("mis-shaped", misshaped, "; ")):
        if items:
            lines.append(f"  {label} keys ({len(items)}): {sep.join(items)}")
    return "\n".join(lines)


def validate(params: GPTParams, *, source: str = "params") -> GPTParams:
    """Check the whole tree against its config once (after loading), naming every wrong leaf; returns it."""
    if not isinstance(params, GPTParams):
        raise TypeError(f"{source} must be a GPTParams tree, got {type(params).__name__}")
    got = params_to_dict(params)
    params_from_dict(params.config, got, source=source)
    dtypes = {t.dtype for t in got.values()}
    devices = {t.device for t in got.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"{source} mixes dtypes {dtypes} / devices {devices}; use tree_to(params, device, dtype)")
    if not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{source} has non-floating weights ({dtypes}); cast with tree_to(params, dtype=...)")
    return params


def head_matrix(params: GPTParams) -> Float[Tensor, "d_model vocab"]:
    """The unembedding `[d_model, vocab]`: the untied head, or a transposed view of the token embedding."""
    return params.tok_emb.T if params.head is None else params.head


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`torch.utils._pytree.tree_map`, re-exported for convenience."""
    return pytree.tree_map(fn, tree, *rest)

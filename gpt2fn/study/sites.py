"""The activation sites of a GPT-2: their names, their axes, and `Activations`, the dict-like pytree of captures.

A site name is `embed.tok`, `embed.pos`, `embed`, `blocks.{i}.<per-layer site>`, `final_norm` (and its parts
`final_norm.scale`, `final_norm.normalized`) or `logits`; a request may also be a glob pattern
(`blocks.*.attn.pattern`, `blocks.3.*`). The table of sites and axes is `SITE_DIMS` (and the docstring of
`gpt2fn.study`).
"""

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor

from ..config import GPTConfig
from ..html import tree_view

__all__ = ["SITE_DIMS", "LAYER_SITES", "site_names", "resolve_sites", "site_dims", "Activations"]

# Axis names per site (glossary: gpt2fn.shapes). `{i}` is the layer index.
SITE_DIMS: dict[str, str] = {
    "embed.tok": "batch seq d_model",
    "embed.pos": "*batch seq d_model",  # [seq d_model] unless explicit positions (or a pad mask) are given
    "embed": "batch seq d_model",
    "blocks.{i}.resid_pre": "batch seq d_model",
    # the residual stream as each head's queries / keys / values read it, before ln1 (TransformerLens's hook_q_input
    # with split qkv input; heads on axis 1 as in attn.q): an edit at one head changes only that head's q (k, v)
    "blocks.{i}.attn.q_input": "batch heads seq d_model",
    "blocks.{i}.attn.k_input": "batch heads seq d_model",
    "blocks.{i}.attn.v_input": "batch heads seq d_model",
    "blocks.{i}.ln1.scale": "batch seq 1",  # sqrt(var + eps) of the residual entering ln1
    "blocks.{i}.ln1.normalized": "batch seq d_model",  # (x - mean) / scale, before the affine map
    "blocks.{i}.ln1": "batch seq d_model",
    "blocks.{i}.attn.q": "batch heads seq head_dim",
    "blocks.{i}.attn.k": "batch heads seq head_dim",
    "blocks.{i}.attn.v": "batch heads seq head_dim",
    "blocks.{i}.attn.scores": "batch heads seq kv_seq",
    "blocks.{i}.attn.pattern": "batch heads seq kv_seq",
    "blocks.{i}.attn.z": "batch heads seq head_dim",
    "blocks.{i}.attn.result": "batch seq heads d_model",  # each head's output after w_out; sums (+ b_out) to out
    "blocks.{i}.attn.out": "batch seq d_model",
    "blocks.{i}.resid_mid": "batch seq d_model",
    "blocks.{i}.ln2.scale": "batch seq 1",  # sqrt(var + eps) of the residual entering ln2
    "blocks.{i}.ln2.normalized": "batch seq d_model",  # (x - mean) / scale, before the affine map
    "blocks.{i}.ln2": "batch seq d_model",
    "blocks.{i}.mlp.pre": "batch seq d_mlp",
    "blocks.{i}.mlp.post": "batch seq d_mlp",
    "blocks.{i}.mlp.out": "batch seq d_model",
    "blocks.{i}.resid_post": "batch seq d_model",
    "final_norm.scale": "batch seq 1",  # sqrt(var + eps) of the residual after the last block
    "final_norm.normalized": "batch seq d_model",  # (x - mean) / scale, before the affine map
    "final_norm": "batch seq d_model",
    "logits": "batch seq vocab",
}

LAYER_SITES: tuple[str, ...] = tuple(k.removeprefix("blocks.{i}.") for k in SITE_DIMS if k.startswith("blocks."))
"""The per-layer site suffixes, in the order a forward pass meets them."""


def site_names(config: GPTConfig) -> list[str]:
    """Every site of a model with this config, in the order a forward pass meets them."""
    per_layer = [f"blocks.{i}.{s}" for i in range(config.n_layers) for s in LAYER_SITES]
    return ["embed.tok", "embed.pos", "embed", *per_layer, "final_norm.scale", "final_norm.normalized", "final_norm",
            "logits"]


def _template(site: str) -> str:
    parts = site.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return ".".join(["blocks", "{i}", *parts[2:]])
    return site


def site_dims(site: str) -> str:
    """The axis names of a site's value, e.g. `site_dims("blocks.0.attn.pattern") == "batch heads seq kv_seq"`."""
    try:
        return SITE_DIMS[_template(site)]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; sites are {', '.join(SITE_DIMS)}") from None


def resolve_sites(config: GPTConfig, requests: str | Iterable[str], *, what: str = "capture") -> list[str]:
    """Expand names and glob patterns into the model's site names (in forward order), or raise a ValueError that
    names the request, the valid sites and the closest match."""
    requests = [requests] if isinstance(requests, str) else list(requests)
    valid = site_names(config)
    chosen: set[str] = set()
    for request in requests:
        if not isinstance(request, str):
            raise TypeError(f"{what} names sites by string; got {type(request).__name__} {request!r}")
        hits = fnmatch.filter(valid, request) if any(c in request for c in "*?[") else (
            [request] if request in valid else [])
        if not hits:
            raise ValueError(_unknown(request, valid, config, what))
        chosen.update(hits)
    return [s for s in valid if s in chosen]


def _unknown(request: str, valid: list[str], config: GPTConfig, what: str) -> str:
    close = difflib.get_close_matches(request, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    template = _template(request)
    if template in SITE_DIMS and template != request:
        hint = f" This model has {config.n_layers} layers (0..{config.n_layers - 1})."
    table = ", ".join(SITE_DIMS)
    return (f"{what}: no site matches {request!r}.{hint} Sites are {table} with i in 0..{config.n_layers - 1}; "
            "glob patterns such as 'blocks.*.attn.pattern' are allowed.")


class Activations(Mapping[str, Tensor]):
    """Captured activations: a read-only mapping from site name to tensor, holding only the requested sites.

    A registered pytree (so `torch.func` transforms can return it and `tree_map` can move it). `acts.dims(site)`
    names a site's axes; `repr` shows each site's shape against those names.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Tensor] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, site: str) -> Tensor:
        try:
            return self._data[site]
        except KeyError:
            held = ", ".join(self._data) or "nothing"
            raise KeyError(f"site {site!r} was not captured; this capture holds {held}. Pass it in capture=...")\
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Activations are read-only; build a new one with Activations({...})")

    def dims(self, site: str) -> str:
        """The axis names of `site` (see `SITE_DIMS`)."""
        return site_dims(site)

    def __repr__(self) -> str:
        lines = [f"  {k}: {list(v.shape)} [{site_dims(k)}]" for k, v in self._data.items()]
        return "Activations(\n" + "\n".join(lines) + "\n)" if lines else "Activations()"

    def _repr_html_(self) -> str:
        """A notebook's picture: each site with its axis names, shape, dtype and statistics."""
        return tree_view(self, name="Activations")._repr_html_()


def _flatten(acts: Activations) -> tuple[list[Tensor], Any]:
    return list(acts._data.values()), tuple(acts._data)


def _flatten_with_keys(acts: Activations) -> tuple[list[tuple[Any, Tensor]], Any]:
    values, keys = _flatten(acts)
    return [(pytree.MappingKey(k), v) for k, v in zip(keys, values, strict=True)], keys


def _unflatten(values: Iterable[Tensor], keys: Any) -> Activations:
    return Activations(dict(zip(keys, values, strict=True)))


pytree.register_pytree_node(Activations, _flatten, _unflatten, serialized_type_name="gpt2fn.study.Activations",
                            flatten_with_keys_fn=_flatten_with_keys)

"""Sparse autoencoders (SAEs) on gpt2fn's sites, in SAE-Lens's file format, as pure functions over a pytree.

    sae = load_sae("path/to/blocks.8.hook_resid_pre")           # cfg.json + sae_weights.safetensors (SAE-Lens)
    params = prepare_for_sae(params, sae)                       # the weight processing the SAE was trained on
    feats = sae_encode(sae, acts["blocks.8.resid_pre"])          # [batch seq d_sae]
    logits, acts, feats = run_with_saes(params, ids, [sae])      # spliced in with its error term: logits unchanged
    logits, _, _ = run_with_saes(params, ids, [sae], features={sae.config.site: ablate_features([123])})
    save_sae(sae, "out/dir")

`SAEParams`: `w_enc [d_in, d_sae]`, `b_enc [d_sae]`, `w_dec [d_sae, d_in]`, `b_dec [d_in]`, `threshold [d_sae]`
(JumpReLU only), with its `SAEConfig` as static metadata (a registered pytree, like `GPTParams`: `tree_map`,
`torch.func` transforms and `gpt2fn.tree_to` apply).

Encoding (SAE-Lens's inference SAEs, `sae_lens.saes.*`): `x -> normalize(x) - b_dec * apply_b_dec_to_input ->
h = x @ w_enc + b_enc -> act(h)`, with `act` ReLU (`standard`), `relu(h) * (h > threshold)` (`jumprelu`) or the
top `k` of `h` (times `||w_dec||` rows when `rescale_acts_by_decoder_norm`), ReLU'd, the rest 0 (`topk`).
Decoding: `f @ w_dec + b_dec`, then the normalization undone. `normalize_activations`: `none`,
`constant_norm_rescale` (x * sqrt(d_in) / ||x||) and `layer_norm` (SAE-Lens's: centred, divided by the unbiased
std + 1e-5) are computed; both need the input again to decode (`sae_decode(..., x=)`). `expected_average_only_in`
needs the dataset's norm scaling factor, which is not in the file: `load_sae(..., norm_scaling_factor=s)` folds it
(as SAE-Lens's `from_pretrained` does), otherwise loading refuses. Gated SAEs, transcoders, whitened inputs and
other architectures are refused by name.

Hook names (TransformerLens's, in `cfg.json`'s `hook_name`) map to sites: `hook_embed` -> `embed.tok`,
`hook_pos_embed` -> `embed.pos`, `blocks.L.hook_resid_pre/mid/post` -> `blocks.L.resid_pre/mid/post`,
`blocks.L.hook_attn_out` / `hook_mlp_out` -> `blocks.L.attn.out` / `mlp.out`, `blocks.L.mlp.hook_pre/post` ->
`blocks.L.mlp.pre/post`, `blocks.L.attn.hook_z/q/k/v` -> `blocks.L.attn.z/q/k/v` (heads flattened as
TransformerLens lays them out, `[batch seq (heads head_dim)]`, or one head with `hook_head_index`). Norm hooks are
refused: their value depends on TransformerLens's `fold_ln`.

The SAE-Lens GPT-2 SAEs (`gpt2-small-res-jb`, ...) were trained on TransformerLens models loaded with processing;
their config says which (`model_from_pretrained_kwargs`, e.g. `{"center_writing_weights": true}`, applied on top of
`from_pretrained_no_processing`). `prepare_for_sae` applies the same transforms (`gpt2fn.transforms`) so the
activations the SAE reads are the ones it was trained on; the logits do not change.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from ..files import atomic_write_path, atomic_write_text
from ..params import GPTParams, record, static
from ..transforms import center_unembed, center_writing_weights, fold_layer_norm, fold_value_biases
from .run import Edit, forward_with, resolve_edits
from .sites import Activations, resolve_sites

__all__ = ["SAEConfig", "SAEParams", "SAEError", "load_sae", "save_sae", "sae_encode", "sae_decode", "sae_forward",
           "sae_from_dict", "hook_to_site", "sae_site_value", "splice_sae", "run_with_saes", "ablate_features",
           "steer_features", "clamp_features", "prepare_for_sae"]

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


class SAEError(ValueError):
    """An SAE file or config gpt2fn cannot use as it is: the message names the field and what to do."""


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it reads. `cfg` keeps the file's whole `cfg.json` (as JSON text) so that
    `save_sae` writes back every field it did not interpret."""

    d_in: int
    d_sae: int
    architecture: Literal["standard", "jumprelu", "topk"]
    hook_name: str
    site: str
    head: int | None = None  # hook_head_index: one head of a per-head site
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    cfg: str = "{}"

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """`model_from_pretrained_kwargs` of the file (the TransformerLens processing it was trained on)."""
        raw = json.loads(self.cfg)
        meta = raw.get("metadata") or {}
        return dict(meta.get("model_from_pretrained_kwargs") or raw.get("model_from_pretrained_kwargs") or {})


@record
class SAEParams:
    """An SAE's weights (SAE-Lens's names: `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`), config static."""

    w_enc: Float[Tensor, "d_in d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    w_dec: Float[Tensor, "d_sae d_in"]
    b_dec: Float[Tensor, " d_in"]
    threshold: Float[Tensor, " d_sae"] | None
    config: SAEConfig = static()

    def replace(self, **changes: Any) -> "SAEParams":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        c = self.config
        return f"SAEParams({c.architecture}, {c.d_in} -> {c.d_sae}, at {c.site!r}, {self.w_enc.dtype})"


# ---------------------------------------------------------------------------------------------------------------
# Hook names

_HOOKS = [
    (r"hook_embed", "embed.tok"),
    (r"hook_pos_embed", "embed.pos"),
    (r"blocks\.(\d+)\.hook_resid_(pre|mid|post)", r"blocks.\1.resid_\2"),
    (r"blocks\.(\d+)\.hook_(attn|mlp)_out", r"blocks.\1.\2.out"),
    (r"blocks\.(\d+)\.mlp\.hook_(pre|post)", r"blocks.\1.mlp.\2"),
    (r"blocks\.(\d+)\.attn\.hook_([zqkv])", r"blocks.\1.attn.\2"),
]


def hook_to_site(hook_name: str) -> str:
    """The gpt2fn site of a TransformerLens hook name (`blocks.8.hook_resid_pre` -> `blocks.8.resid_pre`), or an
    SAEError listing the hooks understood."""
    for pattern, site in _HOOKS:
        if re.fullmatch(pattern, hook_name):
            return re.sub(pattern, site, hook_name)
    raise SAEError(f"hook_name {hook_name!r} has no gpt2fn site here; understood are hook_embed, hook_pos_embed, "
                   "blocks.L.hook_resid_pre/mid/post, blocks.L.hook_attn_out/hook_mlp_out, blocks.L.mlp.hook_pre/"
                   "hook_post, blocks.L.attn.hook_z/q/k/v (norm hooks depend on TransformerLens's fold_ln and are "
                   "not mapped)")


def _per_head(site: str) -> bool:
    return site.endswith((".attn.z", ".attn.q", ".attn.k", ".attn.v"))


def sae_site_value(sae: SAEParams, x: Tensor) -> Tensor:
    """A site's value as the SAE reads it, `[..., d_in]`. Per-head sites `[batch heads seq head_dim]`: one head's
    `[batch seq head_dim]` with `config.head` (`hook_head_index`); TransformerLens's flattened `[batch seq (heads
    head_dim)]` when `d_in` is every head's width (`hook_z` SAEs); as they are (one SAE for every head) when `d_in`
    is `head_dim`."""
    if not _per_head(sae.config.site):
        return x
    if sae.config.head is not None:
        return x[:, sae.config.head]
    if sae.config.d_in == x.shape[1] * x.shape[3]:
        return rearrange(x, "b h s d -> b s (h d)")
    return x


def _site_from_value(sae: SAEParams, value: Tensor, like: Tensor) -> Tensor:
    """The inverse of `sae_site_value`: `value` written back into a site value shaped like `like`."""
    if not _per_head(sae.config.site):
        return value
    if sae.config.head is not None:
        return like.index_copy(1, torch.tensor([sae.config.head], device=like.device), value[:, None])
    if value.shape != like.shape:
        return rearrange(value, "b s (h d) -> b h s d", h=like.shape[1])
    return value


# ---------------------------------------------------------------------------------------------------------------
# Encode / decode


def _normalize(sae: SAEParams, x: Tensor) -> Tensor:
    how = sae.config.normalize_activations
    if how == "constant_norm_rescale":
        return x * (sae.config.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
    if how == "layer_norm":
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.std(-1, keepdim=True) + 1e-5)
    return x


def _denormalize(sae: SAEParams, y: Tensor, x: Tensor | None) -> Tensor:
    how = sae.config.normalize_activations
    if how == "none":
        return y
    if x is None:
        raise SAEError(f"this SAE normalizes its input ({how}); decoding undoes that with the input's statistics: "
                       "pass the encoded activations as sae_decode(sae, features, x=acts)")
    if how == "constant_norm_rescale":
        return y / (sae.config.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
    centred = x - x.mean(-1, keepdim=True)  # layer_norm: SAE-Lens undoes with the std of the centred input
    return y * centred.std(-1, keepdim=True) + x.mean(-1, keepdim=True)


def _check_input(sae: SAEParams, x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != sae.config.d_in:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} takes activations [..., d_in={sae.config.d_in}] (the SAE's {sae.config.site!r} "
                         f"as sae_site_value lays it out); got {got}")


def sae_encode(sae: SAEParams, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
    """The SAE's features of activations `x` `[..., d_in]` (see the module docstring for each architecture)."""
    _check_input(sae, x, "sae_encode")
    c = sae.config
    x = _normalize(sae, x.to(sae.w_enc.dtype))
    if c.apply_b_dec_to_input:
        x = x - sae.b_dec
    h = x @ sae.w_enc + sae.b_enc
    if c.architecture == "standard":
        return torch.relu(h)
    if c.architecture == "jumprelu":
        assert sae.threshold is not None
        return torch.relu(h) * (h > sae.threshold).to(h.dtype)
    if c.rescale_acts_by_decoder_norm:
        h = h * sae.w_dec.norm(dim=-1)
    top = torch.topk(h, k=int(c.k or 0), dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())


def sae_decode(sae: SAEParams, features: Float[Tensor, "*batch d_sae"], *, x: Tensor | None = None
               ) -> Float[Tensor, "*batch d_in"]:
    """The reconstruction `features @ w_dec + b_dec`, the input normalization undone (which needs the encoded
    activations `x` when the SAE normalizes)."""
    if not isinstance(features, Tensor) or features.shape[-1:] != (sae.config.d_sae,):
        got = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"sae_decode takes features [..., d_sae={sae.config.d_sae}]; got {got}")
    if sae.config.rescale_acts_by_decoder_norm:
        features = features / sae.w_dec.norm(dim=-1)
    return _denormalize(sae, features @ sae.w_dec + sae.b_dec, x)


def sae_forward(sae: SAEParams, x: Float[Tensor, "*batch d_in"]) -> tuple[Tensor, Tensor]:
    """`(reconstruction, features)` of `x`."""
    f = sae_encode(sae, x)
    return sae_decode(sae, f, x=x), f


# ---------------------------------------------------------------------------------------------------------------
# Feature edits: functions features -> features, for `run_with_saes(features=...)` / `splice_sae(features=...)`

FeatureEdit = Callable[[Tensor], Tensor]
Features = int | Sequence[int] | Tensor


def _feature_index(features: Features, like: Tensor) -> Tensor:
    idx = torch.as_tensor([features] if isinstance(features, int) else features, dtype=torch.long,
                          device=like.device).flatten()
    bad = idx[(idx < 0) | (idx >= like.shape[-1])].tolist() if idx.numel() else []
    if bad:
        raise ValueError(f"features {bad} out of range for an SAE with d_sae = {like.shape[-1]}")
    return idx


def ablate_features(features: Features) -> FeatureEdit:
    """Set the given features to 0 (their decoder directions leave the site; the error term stays)."""
    return clamp_features(features, 0.0)


def clamp_features(features: Features, value: float | Tensor) -> FeatureEdit:
    """Set the given features to `value` (a number, or one per feature) at every position."""
    def edit(f: Tensor) -> Tensor:
        idx = _feature_index(features, f)
        v = torch.as_tensor(value, dtype=f.dtype, device=f.device).expand(*f.shape[:-1], len(idx))
        return f.index_copy(-1, idx, v.contiguous()) if idx.numel() else f
    return edit


def steer_features(features: Features, scale: float | Tensor = 1.0) -> FeatureEdit:
    """Add `scale` to the given features' activations at every position: for an SAE without input normalization
    the site moves by `scale * w_dec[feature]` (`gpt2fn.study.steer(sae.w_dec[i], scale=...)` at the site)."""
    def edit(f: Tensor) -> Tensor:
        idx = _feature_index(features, f)
        add = torch.as_tensor(scale, dtype=f.dtype, device=f.device).expand(*f.shape[:-1], len(idx))
        return f.index_add(-1, idx, add.contiguous())
    return edit


# ---------------------------------------------------------------------------------------------------------------
# Splicing into a run


def splice_sae(sae: SAEParams, *, features: FeatureEdit | None = None, keep_error: bool = True,
               store: dict[str, Tensor] | None = None) -> Edit:
    """The edit that runs the site through the SAE: `decode(features(encode(x))) + error`, where `error = x -
    decode(encode(x))`, written as `x + decode(edited) - decode(encoded)` so that without a feature edit the site
    keeps its exact value (logits unchanged bit for bit). `keep_error=False` replaces the site by the
    reconstruction alone. `store` (a dict the caller owns, e.g. `run_with_saes`'s): receives the features before
    the feature edit under the SAE's site name. Use with `forward_with(params, ids, edit={sae.config.site: ...})`."""
    def edit(x: Tensor) -> Tensor:
        a = sae_site_value(sae, x)
        f = sae_encode(sae, a)
        if store is not None:
            store[sae.config.site] = f
        recon = sae_decode(sae, f, x=a)
        if keep_error:
            if features is None:
                return x
            new = (a + (sae_decode(sae, features(f), x=a) - recon)).to(x.dtype)
        else:
            new = (recon if features is None else sae_decode(sae, features(f), x=a)).to(x.dtype)
        return _site_from_value(sae, new, x)
    return edit


def run_with_saes(params: GPTParams, ids: Tensor, saes: SAEParams | Iterable[SAEParams], *,
                  features: Mapping[str, FeatureEdit] | None = None, keep_error: bool = True,
                  capture: str | Iterable[str] = (), edit: Mapping[str, Edit] | None = None, **forward_kwargs: Any
                  ) -> tuple[Any, Activations, dict[str, Tensor]]:
    """`forward_with` with SAEs spliced in (`splice_sae`, one per site): returns `(forward's result, captured
    activations, {site: feature activations})`. `features`: `{site: feature edit}` (`ablate_features`,
    `steer_features`, `clamp_features` or any `f -> f`); `capture`/`edit`: as in `forward_with` (an edit may not
    name an SAE's site). A later SAE reads the site after earlier SAEs' edits, as the run does."""
    saes = [saes] if isinstance(saes, SAEParams) else list(saes)
    sites = [s.config.site for s in saes]
    if len(set(sites)) != len(sites):
        raise ValueError(f"two SAEs read one site ({sites}); splice one SAE per site")
    resolve_sites(params.config, sites, what="run_with_saes")
    for s in saes:
        _check_fits(params, s)
    unknown = sorted(set(features or {}) - set(sites))
    if unknown:
        raise ValueError(f"features= names {unknown}, where no SAE is spliced; SAE sites are {sites}")
    edits = resolve_edits(params.config, edit)
    clash = sorted(set(edits) & set(sites))
    if clash:
        raise ValueError(f"edit= names {clash}, where an SAE is spliced; edit the features instead (features=)")
    store: dict[str, Tensor] = {}
    for s in saes:
        edits[s.config.site] = splice_sae(s, features=(features or {}).get(s.config.site), keep_error=keep_error,
                                          store=store)
    out, acts = forward_with(params, ids, capture=capture, edit=edits, **forward_kwargs)
    return out, acts, store


def _check_fits(params: GPTParams, sae: SAEParams) -> None:
    cfg, c = params.config, sae.config
    if c.site.endswith((".mlp.pre", ".mlp.post")):
        widths = [cfg.d_mlp]
    elif _per_head(c.site):
        widths = [cfg.head_dim] if c.head is not None else [cfg.emb_dim, cfg.head_dim]
    else:
        widths = [cfg.emb_dim]
    if c.head is not None and not 0 <= c.head < cfg.n_heads:
        raise SAEError(f"SAE at {c.site!r} reads head {c.head}; this model has heads 0..{cfg.n_heads - 1}")
    if c.d_in not in widths:
        model = json.loads(c.cfg).get("metadata", {}).get("model_name", "unknown")
        raise SAEError(f"SAE at {c.site!r} has d_in = {c.d_in}; this model's site is {' or '.join(map(str, widths))} "
                       f"wide (the SAE was trained on another model: {model})")


# ---------------------------------------------------------------------------------------------------------------
# Model processing the SAE expects

_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
               "refactor_factored_attn_matrices")
_HARMLESS = ("device", "dtype", "n_devices", "move_to_device", "default_prepend_bos", "default_padding_side",
             "first_n_layers", "trust_remote_code")


def prepare_for_sae(params: GPTParams, sae: SAEParams) -> GPTParams:
    """`params` with the weight processing the SAE was trained on (its `model_from_pretrained_kwargs`, applied on
    top of an unprocessed model as SAE-Lens advises): `center_writing_weights`, `fold_ln`, `center_unembed`,
    `fold_value_biases` (`gpt2fn.transforms`). Logits are unchanged; the residual stream (and, for
    `fold_value_biases`, the values and `attn.z`) become what the SAE read in training. Refuses
    `refactor_factored_attn_matrices` (not implemented) and keys it does not know."""
    kwargs = sae.config.model_kwargs
    unknown = sorted(k for k in kwargs if k not in _PROCESSING and k not in _HARMLESS)
    if unknown:
        raise SAEError(f"model_from_pretrained_kwargs has {unknown}, which gpt2fn does not know how to apply; known "
                       f"processing: {', '.join(_PROCESSING)}")
    if kwargs.get("refactor_factored_attn_matrices"):
        raise SAEError("model_from_pretrained_kwargs asks for refactor_factored_attn_matrices, which gpt2fn does not "
                       "implement; this SAE's activations (attention q/k) cannot be reproduced")
    if kwargs.get("fold_ln"):
        params = fold_layer_norm(params)
    if kwargs.get("center_writing_weights"):
        params = center_writing_weights(params)
    if kwargs.get("center_unembed"):
        params = center_unembed(params)
    if kwargs.get("fold_value_biases"):
        params = fold_value_biases(params)
    return params


# ---------------------------------------------------------------------------------------------------------------
# Files (SAE-Lens's layout: cfg.json + sae_weights.safetensors in one directory)


def _config_from(raw: dict[str, Any], path: Path) -> SAEConfig:
    meta = raw.get("metadata") or {}
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if not hook:
        raise SAEError(f"{path} names no hook (metadata.hook_name, hook_name or hook_point)")
    arch = raw.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SAEError(f"{path}: architecture {arch!r} is not supported; gpt2fn reads "
                       f"{', '.join(ARCHITECTURES)} SAEs")
    norm = raw.get("normalize_activations") or "none"
    norm = {True: "expected_average_only_in", False: "none"}.get(norm, norm)
    if norm not in NORMALIZATIONS and norm != "expected_average_only_in":
        raise SAEError(f"{path}: normalize_activations {norm!r} is not supported (gpt2fn computes "
                       f"{', '.join(NORMALIZATIONS)}, and folds expected_average_only_in given its scaling factor)")
    if raw.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise SAEError(f"{path}: reshape_activations {raw['reshape_activations']!r} is not supported")
    head = meta.get("hook_head_index", raw.get("hook_head_index", raw.get("hook_point_head_index")))
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "topk" and not isinstance(k, int):
        raise SAEError(f"{path}: a topk SAE needs an integer k; got {k!r}")
    try:
        return SAEConfig(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), architecture=arch, hook_name=hook,
                         site=hook_to_site(hook), head=head, k=k if arch == "topk" else None,
                         rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
                         apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                         normalize_activations=norm, cfg=json.dumps(raw, sort_keys=True))
    except KeyError as e:
        raise SAEError(f"{path} has no {e.args[0]!r}; an SAE-Lens cfg.json names d_in and d_sae") from None


def load_sae(path: str | os.PathLike[str], *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, norm_scaling_factor: float | None = None) -> SAEParams:
    """An SAE from an SAE-Lens directory (`cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes and
    the Hugging Face releases hold). Weights load through safetensors (no pickle). `norm_scaling_factor`: for an
    `expected_average_only_in` SAE, the factor SAE-Lens's `from_pretrained` folds in (`w_enc * s`, `w_dec / s`,
    `b_dec / s`, and the threshold `* s`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an SAE-Lens SAE directory: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    raw = json.loads((path / CFG_FILE).read_text())
    weights = load_file(str(path / WEIGHTS_FILE), device=str(device or "cpu"))
    return sae_from_dict(raw, weights, dtype=dtype, norm_scaling_factor=norm_scaling_factor, where=str(path))


def sae_from_dict(cfg: Mapping[str, Any], weights: Mapping[str, Tensor], *, dtype: torch.dtype | None = None,
                  norm_scaling_factor: float | None = None, where: str = "the SAE") -> SAEParams:
    """An SAE from an SAE-Lens config dict (what `cfg.json` holds) and its state dict (`W_enc`, `b_enc`,
    `W_dec`, `b_dec`, `threshold`): `load_sae` without the files."""
    raw = dict(cfg)
    config = _config_from(raw, Path(where))
    weights = dict(weights)
    if "finetuning_scaling_factor" in weights or "scaling_factor" in weights:  # pre-6 files: scale on the features
        scale = weights.pop("finetuning_scaling_factor", None)
        scale = weights.pop("scaling_factor", None) if scale is None else scale
        weights["W_dec"] = weights["W_dec"] * scale[:, None]
    want = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,), "W_dec": (config.d_sae, config.d_in),
            "b_dec": (config.d_in,)}
    if config.architecture == "jumprelu":
        want["threshold"] = (config.d_sae,)
    problems = [f"{k} missing" for k in want if k not in weights] + [
        f"{k} has shape {list(weights[k].shape)}, expected {list(s)}" for k, s in want.items()
        if k in weights and tuple(weights[k].shape) != s] + [f"unexpected {k}" for k in weights if k not in want]
    if problems:
        raise SAEError(f"{where}: the weights do not match the {config.architecture} config (d_in {config.d_in}, "
                       f"d_sae {config.d_sae}): {'; '.join(problems)}")
    w = {k: v if dtype is None else v.to(dtype) for k, v in weights.items()}
    sae = SAEParams(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], w.get("threshold"), config)
    if config.normalize_activations == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise SAEError(f"{where}: normalize_activations is expected_average_only_in, whose scaling factor "
                           "(sqrt(d_in) / the dataset's mean activation norm) is not in the file; pass "
                           "load_sae(..., norm_scaling_factor=s) to fold it in")
        sae = _fold_scaling(sae, float(norm_scaling_factor))
    return sae


def _fold_scaling(sae: SAEParams, s: float) -> SAEParams:
    raw = json.loads(sae.config.cfg)
    raw["normalize_activations"] = "none"
    return sae.replace(w_enc=sae.w_enc * s, w_dec=sae.w_dec / s, b_dec=sae.b_dec / s,
                       threshold=None if sae.threshold is None else sae.threshold * s,
                       config=dataclasses.replace(sae.config, normalize_activations="none",
                                                  cfg=json.dumps(raw, sort_keys=True)))


def save_sae(sae: SAEParams, path: str | os.PathLike[str]) -> Path:
    """Write `sae` as an SAE-Lens directory (`cfg.json` + `sae_weights.safetensors`, each written atomically) that
    `load_sae` and SAE-Lens's `SAE.load_from_disk` read back."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = sae.config
    raw = json.loads(c.cfg)
    raw.update(d_in=c.d_in, d_sae=c.d_sae, architecture=c.architecture, apply_b_dec_to_input=c.apply_b_dec_to_input,
               normalize_activations=c.normalize_activations, dtype=str(sae.w_enc.dtype).removeprefix("torch."))
    raw.setdefault("device", "cpu")
    raw.setdefault("reshape_activations", "hook_z" if c.site.endswith(".attn.z") and c.head is None else "none")
    if c.architecture == "topk":
        raw.update(k=c.k, rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm)
    meta = raw.setdefault("metadata", {})
    meta.update(hook_name=c.hook_name, hook_head_index=c.head)
    meta.setdefault("sae_lens_version", "6.0.0")
    raw.pop("hook_name", None)
    raw.pop("hook_point", None)
    weights = {"W_enc": sae.w_enc, "b_enc": sae.b_enc, "W_dec": sae.w_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        weights["threshold"] = sae.threshold
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    atomic_write_path(path / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    atomic_write_text(path / CFG_FILE, json.dumps(raw, indent=2, sort_keys=True))
    return path

"""SAEs: encode/decode against formulas written here and (when GPT2FN_SAELENS_PYTHON names a Python with sae-lens
6.x) against SAE-Lens's own encode/decode on the same files both ways; splicing, feature edits and capture
against plain forward_with edits; the model transforms SAE-Lens's GPT-2 SAEs expect."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from einops import rearrange

import gpt2fn
from gpt2fn.study import (
    SAEError,
    ablate_features,
    forward_with,
    hook_to_site,
    load_sae,
    patch,
    prepare_for_sae,
    run_with_saes,
    sae_decode,
    sae_encode,
    sae_from_dict,
    save_sae,
    steer,
    steer_features,
)


def make_sae(hook: str, d_in: int, d_sae: int = 40, seed: int = 0, **cfg):
    g = torch.Generator().manual_seed(seed)
    arch = cfg.get("architecture", "standard")
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    return sae_from_dict({"d_in": d_in, "d_sae": d_sae, "metadata": {"hook_name": hook}, **cfg}, w)


def by_hand(sae, x):
    """SAE-Lens's inference encode and decode, written out."""
    c = sae.config
    xin = x
    if c.normalize_activations == "constant_norm_rescale":
        coeff = c.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
        xin = x * coeff
    elif c.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xin = (x - mu) / (std + 1e-5)
    h = (xin - (sae.b_dec if c.apply_b_dec_to_input else 0)) @ sae.w_enc + sae.b_enc
    if c.architecture == "standard":
        f = h.clamp(min=0)
    elif c.architecture == "jumprelu":
        f = torch.where(h > sae.threshold, h.clamp(min=0), 0.0)
    else:
        score = h * sae.w_dec.norm(dim=-1) if c.rescale_acts_by_decoder_norm else h
        keep = score >= score.topk(c.k, dim=-1).values[..., -1:]
        f = torch.where(keep, score.clamp(min=0), 0.0)
    y = (f / sae.w_dec.norm(dim=-1) if c.rescale_acts_by_decoder_norm else f) @ sae.w_dec + sae.b_dec
    if c.normalize_activations == "constant_norm_rescale":
        y = y / coeff
    elif c.normalize_activations == "layer_norm":
        y = y * std + mu
    return f, y


CASES = {
    "standard": {},
    "standard_no_bdec_in": {"apply_b_dec_to_input": False},
    "jumprelu": {"architecture": "jumprelu"},
    "topk": {"architecture": "topk", "k": 5},
    "topk_rescaled": {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True},
    "constant_norm": {"normalize_activations": "constant_norm_rescale"},
    "layer_norm": {"architecture": "jumprelu", "normalize_activations": "layer_norm"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_and_decode_follow_the_formulas(case):
    sae = make_sae("blocks.0.hook_resid_pre", 24, **CASES[case])
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    f, y = by_hand(sae, x)
    got = sae_encode(sae, x)
    torch.testing.assert_close(got, f)
    torch.testing.assert_close(sae_decode(sae, got, x=x), y)
    assert (got > 0).any() and (got == 0).any()


def test_normalizing_saes_need_the_input_to_decode_and_bad_shapes_are_named():
    sae = make_sae("blocks.0.hook_resid_pre", 24, normalize_activations="layer_norm")
    with pytest.raises(SAEError, match="x=acts"):
        sae_decode(sae, torch.zeros(3, 40))
    with pytest.raises(ValueError, match="d_in=24"):
        sae_encode(sae, torch.zeros(3, 23))


def test_save_and_load_round_trip_in_sae_lens_layout(tmp_path):
    sae = make_sae("blocks.1.hook_mlp_out", 24, architecture="jumprelu", extra_field="kept",
                   model_from_pretrained_kwargs={"center_writing_weights": True})
    save_sae(sae, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert raw["metadata"]["hook_name"] == "blocks.1.hook_mlp_out" and raw["extra_field"] == "kept"
    back = load_sae(tmp_path / "s")
    same = ("d_in", "d_sae", "architecture", "hook_name", "site", "head", "apply_b_dec_to_input",
            "normalize_activations")
    assert [getattr(back.config, f) for f in same] == [getattr(sae.config, f) for f in same]
    assert back.config.site == "blocks.1.mlp.out"
    for a, b in zip(pytree.tree_leaves(back), pytree.tree_leaves(sae), strict=True):
        assert torch.equal(a, b)
    assert back.config.model_kwargs == {"center_writing_weights": True}


def test_hook_names_map_to_sites_and_unknown_ones_are_refused():
    assert hook_to_site("blocks.8.hook_resid_pre") == "blocks.8.resid_pre"
    assert hook_to_site("blocks.3.hook_mlp_out") == "blocks.3.mlp.out"
    assert hook_to_site("blocks.3.attn.hook_z") == "blocks.3.attn.z"
    assert hook_to_site("blocks.0.mlp.hook_post") == "blocks.0.mlp.post"
    assert hook_to_site("hook_embed") == "embed.tok"
    with pytest.raises(SAEError, match="norm hooks"):
        hook_to_site("blocks.0.ln1.hook_normalized")


def test_loading_refuses_what_it_cannot_compute_and_folds_a_given_scaling_factor():
    w = make_sae("blocks.0.hook_resid_pre", 24)
    state = {"W_enc": w.w_enc, "b_enc": w.b_enc, "W_dec": w.w_dec, "b_dec": w.b_dec}
    base = {"d_in": 24, "d_sae": 40, "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}
    with pytest.raises(SAEError, match="gated"):
        sae_from_dict({**base, "architecture": "gated"}, state)
    with pytest.raises(SAEError, match="norm_scaling_factor"):
        sae_from_dict({**base, "normalize_activations": "expected_average_only_in"}, state)
    with pytest.raises(SAEError, match="W_dec has shape"):
        sae_from_dict(base, {**state, "W_dec": state["W_dec"][:, :-1]})
    s = 1.7
    folded = sae_from_dict({**base, "normalize_activations": "expected_average_only_in"}, state,
                           norm_scaling_factor=s)
    x = torch.randn(4, 24)
    # SAE-Lens's training normalization: encode s * x, decode, divide by s
    torch.testing.assert_close(sae_encode(folded, x), sae_encode(w, s * x))
    torch.testing.assert_close(sae_decode(folded, sae_encode(folded, x)), sae_decode(w, sae_encode(w, s * x)) / s)


@pytest.fixture(scope="module")
def model():
    return pytree.tree_map(lambda t: t + 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)),
                           gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0))


IDS = torch.tensor([[1, 5, 9, 33, 2, 7], [4, 4, 60, 8, 11, 3]])


def test_splicing_an_sae_with_its_error_term_changes_no_logit_and_captures_its_features(model):
    sae = make_sae("blocks.1.hook_resid_pre", 24, architecture="topk", k=6)
    plain, acts = forward_with(model, IDS, capture="blocks.1.resid_pre")
    logits, _, feats = run_with_saes(model, IDS, sae)
    assert torch.equal(logits, plain)
    torch.testing.assert_close(feats["blocks.1.resid_pre"], sae_encode(sae, acts["blocks.1.resid_pre"]))


def test_without_the_error_term_the_site_is_the_reconstruction(model):
    sae = make_sae("blocks.0.hook_mlp_out", 24, normalize_activations="constant_norm_rescale")
    _, acts = forward_with(model, IDS, capture="blocks.0.mlp.out")
    a = acts["blocks.0.mlp.out"]
    want, _ = forward_with(model, IDS, edit={"blocks.0.mlp.out": patch(sae_decode(sae, sae_encode(sae, a), x=a))})
    got, _, _ = run_with_saes(model, IDS, sae, keep_error=False)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, forward_with(model, IDS)[0])


def test_ablating_features_removes_their_decoder_directions_and_steering_adds_them(model):
    site = "blocks.1.resid_mid"
    sae = make_sae("blocks.1.hook_resid_mid", 24)
    _, acts = forward_with(model, IDS, capture=site)
    a = acts[site]
    f = sae_encode(sae, a)
    chosen = [int(i) for i in f.flatten(0, 1).sum(0).topk(2).indices]
    by_hand = a - f[..., chosen] @ sae.w_dec[chosen]
    want, _ = forward_with(model, IDS, edit={site: patch(by_hand)})
    got, _, _ = run_with_saes(model, IDS, sae, features={site: ablate_features(chosen)})
    torch.testing.assert_close(got, want)
    want, _ = forward_with(model, IDS, edit={site: steer(sae.w_dec[chosen[0]], scale=3.0)})
    got, _, _ = run_with_saes(model, IDS, sae, features={site: steer_features(chosen[0], 3.0)})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_attention_z_sae_reads_heads_flattened_as_transformer_lens_lays_them_out(model):
    cfg = model.config
    sae = make_sae("blocks.0.attn.hook_z", cfg.emb_dim, reshape_activations="hook_z")
    _, acts = forward_with(model, IDS, capture="blocks.0.attn.z")
    z = acts["blocks.0.attn.z"]  # [batch heads seq head_dim]
    flat = rearrange(z, "b h s d -> b s (h d)")
    recon = rearrange(sae_decode(sae, sae_encode(sae, flat)), "b s (h d) -> b h s d", h=cfg.n_heads)
    want, _ = forward_with(model, IDS, edit={"blocks.0.attn.z": patch(recon)})
    got, _, feats = run_with_saes(model, IDS, sae, keep_error=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(feats["blocks.0.attn.z"], sae_encode(sae, flat))
    one = make_sae("blocks.0.attn.hook_z", cfg.head_dim, hook_head_index=2)
    _, _, feats = run_with_saes(model, IDS, one)
    torch.testing.assert_close(feats["blocks.0.attn.z"], sae_encode(one, z[:, 2]))


def test_an_sae_for_another_model_or_a_clashing_edit_is_refused(model):
    with pytest.raises(SAEError, match="d_in = 768"):
        run_with_saes(model, IDS, make_sae("blocks.0.hook_resid_pre", 768))
    sae = make_sae("blocks.0.hook_resid_pre", 24)
    with pytest.raises(ValueError, match="edit the features"):
        run_with_saes(model, IDS, sae, edit={"blocks.0.resid_pre": patch(0.0)})


def test_prepare_for_sae_centres_the_stream_and_folds_value_biases_without_changing_logits(model):
    sae = make_sae("blocks.1.hook_resid_pre", 24, model_from_pretrained_kwargs={
        "center_writing_weights": True, "fold_value_biases": True, "fold_ln": True, "center_unembed": True})
    prepared = prepare_for_sae(model, sae)
    before, a0 = forward_with(model, IDS, capture=["blocks.1.resid_pre", "blocks.0.attn.v"])
    after, a1 = forward_with(prepared, IDS, capture=["blocks.1.resid_pre", "blocks.0.attn.v"])
    torch.testing.assert_close(after - after.mean(-1, keepdim=True), before - before.mean(-1, keepdim=True),
                               atol=1e-5, rtol=1e-5)  # center_unembed: logits move by a per-position constant
    resid = a1["blocks.1.resid_pre"]
    torch.testing.assert_close(resid.mean(-1), torch.zeros(resid.shape[:-1]), atol=1e-6, rtol=0)
    # fold_ln (applied first, as TransformerLens does) moves ln1's shift into b_V; fold_value_biases then removes it
    b_v = gpt2fn.fold_layer_norm(model).blocks[0].attn.b_qkv[2 * 24:].view(model.config.n_heads, 1, -1)
    torch.testing.assert_close(a1["blocks.0.attn.v"], a0["blocks.0.attn.v"] - b_v, atol=1e-5, rtol=1e-5)
    with pytest.raises(SAEError, match="refactor_factored_attn_matrices"):
        prepare_for_sae(model, make_sae("blocks.1.hook_resid_pre", 24, model_from_pretrained_kwargs={
            "refactor_factored_attn_matrices": True}))


def test_center_writing_weights_alone_keeps_logits(model):
    before = forward_with(model, IDS)[0]
    torch.testing.assert_close(forward_with(gpt2fn.center_writing_weights(model), IDS)[0], before,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward_with(gpt2fn.fold_value_biases(model), IDS)[0], before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SAE-Lens itself (a peer in its own environment: a subprocess)

PEER = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file, load_file
from sae_lens import SAE
root = Path(sys.argv[1])
x = load_file(str(root / "x.safetensors"))["x"]
for name, cfg in json.loads((root / "cases.json").read_text()).items():
    torch.manual_seed(len(name))
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (0.2 if n == "threshold" else 0.0))
    sae.save_model(root / "lens" / name)
out = {}
for d in sorted([*(root / "lens").iterdir(), *(root / "ours").iterdir()]):
    sae = SAE.load_from_disk(d)
    with torch.no_grad():
        f = sae.encode(x)
        out[f"{d.parent.name}/{d.name}/features"] = f.contiguous()
        out[f"{d.parent.name}/{d.name}/recon"] = sae.decode(f).contiguous()
save_file(out, str(root / "out.safetensors"))
"""


@pytest.mark.skipif(not os.environ.get("GPT2FN_SAELENS_PYTHON"),
                    reason="SAE-Lens is a peer in its own environment: set GPT2FN_SAELENS_PYTHON to a Python with "
                           "sae-lens 6.x (python3 -m venv v && v/bin/pip install torch sae-lens)")
def test_sae_lens_reads_our_files_and_we_read_its_files_with_the_same_encode_and_decode(tmp_path):
    from safetensors.torch import load_file, save_file

    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    base = {"d_in": 24, "d_sae": 40, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}}
    (tmp_path / "cases.json").write_text(json.dumps({n: {"architecture": "standard", **base, **c}
                                                     for n, c in CASES.items()}))
    for n, c in CASES.items():
        save_sae(make_sae("blocks.1.hook_resid_pre", 24, seed=len(n), **c), tmp_path / "ours" / n)
    proc = subprocess.run([os.environ["GPT2FN_SAELENS_PYTHON"], "-c", PEER, str(tmp_path)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for kind in ("lens", "ours"):
        for n in CASES:
            sae = load_sae(tmp_path / kind / n)
            f = sae_encode(sae, x)
            assert (f > 0).any(), (kind, n)
            torch.testing.assert_close(f, theirs[f"{kind}/{n}/features"], atol=1e-5, rtol=1e-5, msg=f"{kind}/{n}")
            torch.testing.assert_close(sae_decode(sae, f, x=x), theirs[f"{kind}/{n}/recon"], atol=1e-5, rtol=1e-5,
                                       msg=f"{kind}/{n}")
    assert Path(tmp_path / "lens" / "topk" / "cfg.json").is_file()

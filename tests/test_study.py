"""Study tools: capture and edit as arguments, sweeps under torch.func, logit lens, direct logit attribution, the
attention PNG command."""

import json

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import study
from gpt2fn.study import (
    Activations,
    ablate_head,
    direct_logit_attribution,
    forward_with,
    logit_diff,
    logit_lens,
    patch,
    patching_sweep,
    per_example_grad_norms,
    per_example_grads,
    run_with_capture,
    site_grads,
    site_names,
    steer,
)

SEQ, BATCH = 7, 2  # distinct from every tiny config size


def perturbed(params: gpt2fn.GPTParams, seed: int = 1, scale: float = 0.3) -> gpt2fn.GPTParams:
    """Every leaf moved off its initial value, so layer-norm scales/shifts and biases are all non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: t + scale * torch.randn(t.shape, generator=gen).to(t), params)


@pytest.fixture
def params(tiny_config, device):
    return perturbed(gpt2fn.init_params(tiny_config, seed=0, device=device))


@pytest.fixture
def ids(tiny_config, device):
    return torch.randint(0, tiny_config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3)).to(
        device)


@pytest.fixture
def other_ids(tiny_config, device):
    return torch.randint(0, tiny_config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(4)).to(
        device)


def _sizes(cfg: gpt2fn.GPTConfig) -> dict[str, int]:
    return dict(batch=BATCH, seq=SEQ, kv_seq=SEQ, d_model=cfg.emb_dim, heads=cfg.n_heads, head_dim=cfg.head_dim,
                d_mlp=cfg.d_mlp, vocab=cfg.vocab_size, **{"1": 1})


# --------------------------------------------------------------------------------------------------------------
# Capture


def test_capturing_non_attention_sites_changes_no_logits_bit_for_bit(params, ids):
    reference = gpt2fn.forward(params, ids)
    sites = [s for s in site_names(params.config) if not s.endswith((".scores", ".pattern"))]
    logits, acts = run_with_capture(params, ids, sites)
    assert torch.equal(logits, reference)
    assert list(acts) == sites


def test_capturing_every_site_changes_no_logits(params, ids):
    reference = gpt2fn.forward(params, ids)
    logits, acts = run_with_capture(params, ids, "*")
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(acts["logits"], logits)


@pytest.mark.parametrize("site", ["blocks.1.mlp.post", "blocks.0.attn.pattern", "embed.pos"])
def test_capturing_one_site_stores_only_that_site(params, ids, site):
    _, acts = run_with_capture(params, ids, [site])
    assert list(acts) == [site]
    assert len(pytree.tree_leaves(acts)) == 1


def test_capture_without_attention_sites_stays_on_the_fused_path(params, ids, monkeypatch):
    calls = []
    original = gpt2fn.layers.attend_explicit
    monkeypatch.setattr(gpt2fn.layers, "attend_explicit", lambda *a, **k: calls.append(1) or original(*a, **k))
    run_with_capture(params, ids, ["blocks.0.attn.z", "blocks.1.resid_post"])
    assert calls == []
    run_with_capture(params, ids, ["blocks.1.attn.pattern"])
    assert len(calls) == 1  # only the layer whose pattern is asked for leaves the fused path


def test_every_site_has_the_shape_its_table_entry_names(params, ids):
    sizes = _sizes(params.config)
    _, acts = run_with_capture(params, ids, "*")
    assert list(acts) == site_names(params.config)
    for site, value in acts.items():
        dims = acts.dims(site).split()
        expected = [sizes[d] for d in dims if not d.startswith("*")]
        assert list(value.shape) == expected, site


def test_attention_pattern_rows_are_distributions_over_the_past(params, ids):
    _, acts = run_with_capture(params, ids, "blocks.*.attn.pattern")
    for pattern in acts.values():
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        assert torch.all(pattern.triu(1) == 0)


def test_unknown_sites_raise_value_errors_that_list_the_valid_ones(params, ids):
    with pytest.raises(ValueError, match=r"blocks.0.resid_pre.*blocks.\{i\}.resid_post"):
        run_with_capture(params, ids, ["blocks.0.resid"])
    with pytest.raises(ValueError, match=r"2 layers"):
        run_with_capture(params, ids, ["blocks.2.resid_pre"])
    with pytest.raises(ValueError, match=r"no site matches 'blocks.\*.nothing'"):
        forward_with(params, ids, edit={"blocks.*.nothing": lambda x: x})


def test_activations_are_a_read_only_pytree(params, ids):
    _, acts = run_with_capture(params, ids, ["embed", "logits"])
    doubled = pytree.tree_map(lambda t: 2 * t, acts)
    assert isinstance(doubled, Activations) and list(doubled) == ["embed", "logits"]
    torch.testing.assert_close(doubled["embed"], 2 * acts["embed"])
    with pytest.raises(KeyError, match="was not captured"):
        acts["blocks.0.ln1"]
    with pytest.raises(AttributeError):
        acts.extra = 1
    assert "embed: [2, 7, 24] [batch seq d_model]" in repr(acts)


def test_forward_with_leaves_nothing_behind(params, ids):
    before = [t.clone() for t in pytree.tree_leaves(params)]
    reference = gpt2fn.forward(params, ids)
    forward_with(params, ids, capture="*", edit={"blocks.0.attn.z": ablate_head(1)})
    assert all(torch.equal(a, b) for a, b in zip(before, pytree.tree_leaves(params), strict=True))
    assert torch.equal(gpt2fn.forward(params, ids), reference)


# --------------------------------------------------------------------------------------------------------------
# Edit


def test_every_site_can_be_edited_and_patching_its_own_value_back_is_the_identity(params, ids):
    with gpt2fn.shape_checks(False):  # 3 passes per site; the shapes are pinned by the tests above
        for site in site_names(params.config):
            logits, acts = run_with_capture(params, ids, [site])
            same, _ = forward_with(params, ids, capture=[site], edit={site: patch(acts[site])})
            if site.endswith((".scale", ".normalized", ".result")):  # an edited part: recomposed, not fused
                torch.testing.assert_close(same, logits, rtol=1e-5, atol=1e-5, msg=site)
            else:
                assert torch.equal(same, logits), site
            zeroed, _ = forward_with(params, ids, edit={site: patch(0.0)})
            assert not torch.allclose(zeroed, logits), f"editing {site} changed nothing"


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (1, 1)])
def test_zero_ablating_a_head_equals_removing_its_rows_of_w_out(params, ids, layer, head):
    cfg = params.config
    ablated, acts = forward_with(params, ids, capture=[f"blocks.{layer}.attn.z", f"blocks.{layer}.ln1",
                                                       f"blocks.{layer}.attn.out"],
                                 edit={f"blocks.{layer}.attn.z": ablate_head(head)})
    # by hand: the layer's attention output with that head's slice of w_out removed
    rows = torch.arange(cfg.emb_dim, device=ids.device) // cfg.head_dim != head
    bp = params.blocks[layer]
    h = acts[f"blocks.{layer}.ln1"]
    v = gpt2fn.layers.split_heads(h @ bp.attn.w_qkv[:, 2 * cfg.emb_dim:] + bp.attn.b_qkv[2 * cfg.emb_dim:],
                                  cfg.n_heads)
    z = gpt2fn.layers.merge_heads(gpt2fn.attention_pattern(bp.attn, h, n_heads=cfg.n_heads) @ v)
    by_hand = z[..., rows] @ bp.attn.w_out[rows] + bp.attn.b_out
    torch.testing.assert_close(acts[f"blocks.{layer}.attn.out"], by_hand, rtol=1e-5, atol=1e-5)
    assert torch.all(acts[f"blocks.{layer}.attn.z"][:, head] == 0)
    # and the whole model with those rows zeroed
    w_out = bp.attn.w_out * rows[:, None]
    removed = params.replace(blocks=tuple(b.replace(attn=b.attn.replace(w_out=w_out)) if i == layer else b
                                          for i, b in enumerate(params.blocks)))
    torch.testing.assert_close(ablated, gpt2fn.forward(removed, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated, gpt2fn.forward(params, ids))


def test_mean_ablation_sets_each_ablated_head_to_its_mean_and_leaves_the_others(params, ids):
    site = "blocks.1.attn.z"
    _, clean = run_with_capture(params, ids, [site])
    mean = clean[site].mean(0)  # [heads seq head_dim]
    _, acts = forward_with(params, ids, capture=[site], edit={site: ablate_head([0, 2], value=mean)})
    z = acts[site]
    torch.testing.assert_close(z[:, 0], mean[0].expand_as(z[:, 0]))
    torch.testing.assert_close(z[:, 2], mean[2].expand_as(z[:, 2]))
    assert torch.equal(z[:, 1], clean[site][:, 1])


def test_patching_every_position_of_the_first_residual_reproduces_the_other_run(params, ids, other_ids):
    clean_logits, clean = run_with_capture(params, other_ids, ["blocks.0.resid_pre"])
    patched, _ = forward_with(params, ids, edit={"blocks.0.resid_pre": patch(clean["blocks.0.resid_pre"])})
    assert torch.equal(patched, clean_logits)


def test_patching_one_position_leaves_earlier_positions_unchanged(params, ids, other_ids):
    site, p = "blocks.1.resid_mid", 4
    _, clean = run_with_capture(params, other_ids, [site])
    base = gpt2fn.forward(params, ids)
    patched, _ = forward_with(params, ids, edit={site: patch(clean[site], positions=[p])})
    assert torch.equal(patched[:, :p], base[:, :p])
    assert not torch.allclose(patched[:, p:], base[:, p:])


def test_steering_adds_the_vector_only_at_the_chosen_positions(params, ids):
    site = "blocks.0.resid_mid"
    vector = torch.linspace(-1, 1, params.config.emb_dim, device=ids.device)
    _, clean = run_with_capture(params, ids, [site])
    _, acts = forward_with(params, ids, capture=[site], edit={site: steer(vector, scale=2.0, positions=[1, -1])})
    delta = acts[site] - clean[site]
    torch.testing.assert_close(delta[:, [1, SEQ - 1]], (2.0 * vector).expand(BATCH, 2, -1))
    assert torch.all(delta[:, [0, 2, 3, 4, 5]] == 0)


def test_edits_that_change_the_shape_or_overlap_are_refused(params, ids):
    with pytest.raises(ValueError, match=r"edit of site 'blocks.0.ln1' returned \[2, 7, 1\]"):
        forward_with(params, ids, edit={"blocks.0.ln1": lambda x: x[..., :1]})
    with pytest.raises(ValueError, match="matched by two edit entries"):
        forward_with(params, ids, edit={"blocks.*.ln1": lambda x: x, "blocks.0.ln1": lambda x: x})
    with pytest.raises(ValueError, match="heads axis"):
        forward_with(params, ids, edit={"blocks.0.ln1": ablate_head(0)})


# --------------------------------------------------------------------------------------------------------------
# Transforms: vmap sweeps, gradients with respect to sites, per-example gradients


@pytest.mark.parametrize("site", ["resid_pre", "attn.z"])
def test_patching_sweep_as_one_vmap_equals_the_python_loop(params, ids, other_ids, site):
    def metric(logits):
        return logit_diff(logits, 5, 11).mean()

    fast = patching_sweep(params, other_ids, ids, metric, site=site)
    slow = patching_sweep(params, other_ids, ids, metric, site=site, vectorize=False)
    assert fast.shape == (params.config.n_layers, SEQ)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    # the loop written out with the public edit functions
    names = [f"blocks.{i}.{site}" for i in range(params.config.n_layers)]
    _, clean = run_with_capture(params, other_ids, names)
    by_hand = torch.tensor([[metric(forward_with(params, ids, edit={n: patch(clean[n], positions=[p])})[0])
                             for p in range(SEQ)] for n in names], device=ids.device)
    torch.testing.assert_close(fast, by_hand, rtol=1e-4, atol=1e-5)
    # patching the first residual at every position one at a time: at the last position it restores the clean
    # prediction's logits there (earlier positions cannot see later ones)
    if site == "resid_pre":
        corrupt = metric(gpt2fn.forward(params, ids))
        assert not torch.allclose(fast[0, -1], corrupt)
        torch.testing.assert_close(patching_sweep(params, other_ids, ids, metric, layers=[1], positions=[0],
                                                  chunk_size=1)[0, 0], slow[1, 0], rtol=1e-4, atol=1e-5)


def test_patching_a_position_where_the_prompts_agree_changes_nothing(params, ids):
    corrupt = ids.clone()
    corrupt[:, 3] = (ids[:, 3] + 1) % params.config.vocab_size

    def metric(logits):
        return logit_diff(logits, 2, 9).sum()

    sweep = patching_sweep(params, ids, corrupt, metric, layers=[0])
    baseline = metric(gpt2fn.forward(params, corrupt))
    agree = [p for p in range(SEQ) if p != 3]
    torch.testing.assert_close(sweep[0, agree], baseline.expand(len(agree)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sweep[0, 3], metric(gpt2fn.forward(params, ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["blocks.0.resid_mid", "blocks.1.attn.pattern", "blocks.0.mlp.pre"])
def test_gradient_of_a_logit_difference_wrt_a_site_matches_finite_differences(tiny_config, device, site):
    if device.type == "mps":
        pytest.skip("finite differences need float64, which MPS lacks")
    params = gpt2fn.tree_to(perturbed(gpt2fn.init_params(tiny_config, seed=0)), device, torch.float64)
    ids = torch.randint(0, tiny_config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    ids = ids.to(device)

    def metric(logits):
        return logit_diff(logits, 1, 2, position=-2).sum()

    g = site_grads(params, ids, [site], metric)[site]
    _, acts = run_with_capture(params, ids, [site])
    direction = torch.randn(acts[site].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    direction = direction.to(device) * torch.isfinite(acts[site])  # scores' -inf entries stay put
    eps = 1e-6

    def at(t):
        logits, _ = forward_with(params, ids, edit={site: lambda x: x + t * direction})
        return metric(logits)

    numeric = (at(eps) - at(-eps)) / (2 * eps)
    torch.testing.assert_close((g * direction).sum(), numeric, rtol=1e-5, atol=1e-8)
    assert g.abs().sum() > 0


def test_site_grads_match_autograd_and_jacrev_gives_one_gradient_per_output(params, ids):
    sites = ["blocks.0.ln2", "blocks.1.resid_pre"]

    def metric(logits):
        return logit_diff(logits, 3, 4)  # [batch]

    grads = site_grads(params, ids, sites, lambda lg: metric(lg).sum())
    jac = site_grads(params, ids, sites, metric, jacobian=True)
    deltas = {s: torch.zeros(BATCH, SEQ, params.config.emb_dim, device=ids.device, requires_grad=True)
              for s in sites}
    logits, _ = forward_with(params, ids, edit={s: (lambda x, d=d: x + d) for s, d in deltas.items()})
    metric(logits).sum().backward()
    for s in sites:
        torch.testing.assert_close(grads[s], deltas[s].grad)
        assert jac[s].shape == (BATCH, BATCH, SEQ, params.config.emb_dim)
        torch.testing.assert_close(jac[s].sum(0), grads[s])
        assert torch.all(jac[s][0, 1] == 0)  # example 0's logits do not depend on example 1


def test_per_example_gradient_norms_with_vmap_match_a_loop(params, ids, other_ids):
    norms = per_example_grad_norms(params, ids, other_ids)
    grads = per_example_grads(params, ids, other_ids)
    for i in range(BATCH):
        with gpt2fn.shape_checks(False):
            alone = torch.func.grad(gpt2fn.loss)(params, ids[i:i + 1], other_ids[i:i + 1])
        leaves = pytree.tree_leaves(alone)
        expected = torch.sqrt(sum(leaf.pow(2).sum() for leaf in leaves))
        torch.testing.assert_close(norms[i], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads.blocks[1].mlp.w_fc[i], alone.blocks[1].mlp.w_fc, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(norms[0], norms[1])


# --------------------------------------------------------------------------------------------------------------
# Views


def test_logit_lens_at_the_last_layer_equals_the_model_logits(params, ids):
    lens = logit_lens(params, ids)
    assert lens.shape == (params.config.n_layers + 1, BATCH, SEQ, params.config.vocab_size)
    torch.testing.assert_close(lens[-1], gpt2fn.forward(params, ids), rtol=1e-6, atol=1e-6)
    _, acts = run_with_capture(params, ids, ["embed"])
    first = gpt2fn.layer_norm(params.final_norm, acts["embed"]) @ params.tok_emb.T
    torch.testing.assert_close(lens[0], first)
    torch.testing.assert_close(logit_lens(params, ids, positions=[-1, 2]), lens[:, :, [SEQ - 1, 2]])


@settings(max_examples=8)
@given(position=st.integers(-SEQ, SEQ - 1), good=st.integers(0, 96), bad=st.integers(0, 96))
def test_direct_logit_attribution_shares_sum_to_the_logit_difference(tiny_config, position, good, bad):
    params = perturbed(gpt2fn.init_params(tiny_config, seed=0))
    ids = torch.randint(0, tiny_config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    attribution = direct_logit_attribution(params, ids, good, bad, position=position)
    actual = logit_diff(gpt2fn.forward(params, ids), good, bad, position=position)
    torch.testing.assert_close(attribution.total(), actual, rtol=1e-4, atol=1e-4)
    assert sum(attribution.named().values()).shape == (BATCH,)
    torch.testing.assert_close(sum(attribution.named().values()), actual, rtol=1e-4, atol=1e-4)


def test_direct_logit_attribution_per_head_matches_the_heads_own_write(params, ids, device):
    cfg = params.config
    good, bad = torch.tensor([4, 8], device=device), torch.tensor([15, 16], device=device)
    attribution = direct_logit_attribution(params, ids, good, bad)  # one answer pair per example
    torch.testing.assert_close(attribution.total(), logit_diff(gpt2fn.forward(params, ids), good, bad),
                               rtol=1e-4, atol=1e-4)
    # head 2 of layer 1 by hand: its slice of w_out, centred, over the frozen final-norm scale
    _, acts = run_with_capture(params, ids, ["blocks.1.attn.z", "blocks.1.resid_post"])
    h, hd = 2, cfg.head_dim
    write = acts["blocks.1.attn.z"][:, h, -1] @ params.blocks[1].attn.w_out[h * hd:(h + 1) * hd]
    x = acts["blocks.1.resid_post"][:, -1]
    normed = (write - write.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False) + cfg.ln_eps).sqrt()[:, None]
    direction = params.tok_emb[good] - params.tok_emb[bad]
    expected = (normed * params.final_norm.scale * direction).sum(-1)
    torch.testing.assert_close(attribution.heads[:, 1, h], expected, rtol=1e-5, atol=1e-6)


def test_direct_logit_attribution_of_a_single_logit(params, ids):
    attribution = direct_logit_attribution(params, ids, 6)
    torch.testing.assert_close(attribution.total(), gpt2fn.forward(params, ids)[:, -1, 6], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Attention heat map: the library function and the CLI


def test_attention_command_writes_a_png_with_token_labels(tmp_path, capsys):
    from PIL import Image

    from gpt2fn.cli import main
    from gpt2fn.tokenizer import encode

    out = tmp_path / "maps" / "map.png"
    text = "Hello world, it is time"
    assert main(["attention", text, "--layer", "1", "--head", "3", "--out", str(out), "--preset", "mini"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        labels = json.loads(image.text["Description"])
        assert image.size[0] > 200 and image.size[1] > 200
    expected = study.token_labels(encode(text))
    assert labels == {"queries": expected, "keys": expected}
    assert expected[1] == "·world"
    assert "layer 1, head 3" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [(["--layer", "5"], "--layer must be an int in 0.."),
                                           (["--head", "4"], "--head 4 is out of range")])
def test_attention_command_reports_bad_layer_or_head_in_one_line(tmp_path, capsys, flags, message):
    from gpt2fn.cli import main

    assert main(["attention", "hi there", "--preset", "mini", "--out", str(tmp_path / "m.png"), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "m.png").exists()


def test_save_attention_map_refuses_labels_that_do_not_match(tmp_path):
    with pytest.raises(ValueError, match=r"expected \[2, 2\]"):
        study.save_attention_map(torch.eye(3), ["a", "b"], tmp_path / "x.png")


def test_study_tools_are_exported():
    for name in ("forward_with", "run_with_capture", "logit_lens", "direct_logit_attribution", "patching_sweep"):
        assert getattr(gpt2fn, name) is getattr(study, name)

"""The functional AdamW, clipping and schedule against torch's own optimizer and clip_grad_norm_."""

import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import init_params, named_leaves
from gpt2fn.train import (
    AdamWHParams,
    adamw_init,
    adamw_update,
    clip_by_global_norm,
    decay_mask,
    global_norm,
    warmup_cosine,
)


def _random_grads(params, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda p: torch.randn(p.shape, generator=gen).to(p.device) * 0.1, params)


def _torch_adamw(params, hp: AdamWHParams, lr: float, fused: bool = False):
    """torch.optim.AdamW over copies of the leaves, decay on matrices only through two param groups."""
    leaves = [t.detach().clone().requires_grad_(True) for _, t in named_leaves(params)]
    groups = [{"params": [p for p in leaves if p.ndim >= 2], "weight_decay": hp.weight_decay},
              {"params": [p for p in leaves if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                            **({"fused": True} if fused else {"foreach": False}))
    return leaves, opt


def _run_both(params, hp: AdamWHParams, lrs: list[float], fused: bool = False):
    leaves, opt = _torch_adamw(params, hp, lrs[0], fused)
    state = adamw_init(params)
    for i, lr in enumerate(lrs):
        grads = _random_grads(params, seed=i)
        for p, g in zip(leaves, pytree.tree_leaves(grads), strict=True):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        params, state = adamw_update(grads, state, params, lr=lr, hp=hp, fused=fused)
    return params, state, leaves


@pytest.mark.parametrize("fused", [False, True], ids=["multi-tensor", "fused"])
def test_adamw_matches_torch_optim_adamw_step_for_step(tiny_config, device, fused):
    params = init_params(tiny_config, seed=0, device=device)
    hp = AdamWHParams(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    lrs = [1e-3, 3e-3, 2e-3, 5e-4, 1e-4]
    ours, state, theirs = _run_both(params, hp, lrs, fused)
    assert int(state.step) == len(lrs)
    for (name, a), b in zip(named_leaves(ours), theirs, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7, msg=name)
        if device.type == "cpu":  # the same arithmetic in the same order: bit for bit
            assert torch.equal(a, b.detach()), name
    assert not torch.equal(pytree.tree_leaves(ours)[0], pytree.tree_leaves(params)[0])  # it did move


@settings(max_examples=8)
@given(beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.999), wd=st.floats(0.0, 1.0),
       lr=st.floats(1e-5, 1e-1), eps=st.sampled_from([1e-8, 1e-6, 1e-3]))
def test_adamw_matches_torch_for_any_hyperparameters(tiny_config, beta1, beta2, wd, lr, eps):
    params = init_params(tiny_config, seed=1)
    hp = AdamWHParams(beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
    ours, _, theirs = _run_both(params, hp, [lr, lr / 2, lr])
    for (name, a), b in zip(named_leaves(ours), theirs, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_weight_decay_touches_matrices_only(tiny_config):
    params = init_params(tiny_config, seed=0)
    zero = pytree.tree_map(torch.zeros_like, params)
    new, _ = adamw_update(zero, adamw_init(params), params, lr=0.5, hp=AdamWHParams(weight_decay=0.2))
    for (name, before), after in zip(named_leaves(params), pytree.tree_leaves(new), strict=True):
        if before.ndim >= 2:
            torch.testing.assert_close(after, before * (1 - 0.5 * 0.2), msg=name)
        else:
            assert torch.equal(after, before), name
    mask = dict(zip((n for n, _ in named_leaves(params)), pytree.tree_leaves(decay_mask(params)), strict=True))
    assert mask["tok_emb"] and mask["blocks.0.attn.w_qkv"] and not mask["blocks.0.norm1.scale"]


def test_update_returns_new_trees_and_leaves_inputs_untouched(tiny_config):
    params = init_params(tiny_config, seed=0)
    grads = _random_grads(params, 3)
    state = adamw_init(params)
    before = [t.clone() for t in pytree.tree_leaves((params, grads, state))]
    adamw_update(grads, state, params, lr=1e-2)
    for a, b in zip(before, pytree.tree_leaves((params, grads, state)), strict=True):
        assert torch.equal(a, b)


def test_mismatched_state_is_a_clear_error(tiny_config):
    params = init_params(tiny_config, seed=0)
    other = init_params(tiny_config.replace(n_layers=1), seed=0)
    with pytest.raises(ValueError, match="adamw_init"):
        adamw_update(_random_grads(params, 0), adamw_init(other), params, lr=1e-3)


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_clip_by_global_norm_matches_clip_grad_norm(tiny_config, max_norm):
    params = init_params(tiny_config, seed=0)
    grads = _random_grads(params, 7)
    ref = [g.clone() for g in pytree.tree_leaves(grads)]
    holders = [torch.zeros_like(g, requires_grad=True) for g in ref]
    for h, g in zip(holders, ref, strict=True):
        h.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    clipped, norm = clip_by_global_norm(grads, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for a, h in zip(pytree.tree_leaves(clipped), holders, strict=True):
        torch.testing.assert_close(a, h.grad)
    if max_norm < float(norm):
        torch.testing.assert_close(global_norm(clipped), torch.tensor(max_norm), rtol=1e-5, atol=0)
    else:
        assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(clipped), ref, strict=True))


def test_global_norm_is_the_norm_of_all_leaves_as_one_vector(tiny_config):
    grads = _random_grads(init_params(tiny_config, seed=0), 2)
    flat = torch.cat([g.reshape(-1) for g in pytree.tree_leaves(grads)])
    torch.testing.assert_close(global_norm(grads), flat.norm())


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    kw = dict(peak_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(4, **kw) == pytest.approx(0.5)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)  # halfway down the cosine
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)
    after = [warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    expected = [0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 100)) for s in range(10, 111)]
    assert after == pytest.approx(expected)


def test_schedule_without_warmup_starts_at_peak():
    assert warmup_cosine(0, peak_lr=3e-4, total_steps=10) == pytest.approx(3e-4)
    assert warmup_cosine(10, peak_lr=3e-4, total_steps=10) == pytest.approx(0.0)


def test_bad_hyperparameters_are_rejected_by_name():
    with pytest.raises(ValueError, match="beta2"):
        AdamWHParams(beta2=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamWHParams(weight_decay=-1.0)


@pytest.mark.parametrize("fused", [False, True], ids=["multi-tensor", "fused"])
def test_donated_update_gives_the_same_values_in_the_same_buffers(tiny_config, fused):
    params = init_params(tiny_config, seed=0)
    grads = _random_grads(params, 4)
    state = adamw_init(params)
    state, params = adamw_update(grads, state, params, lr=1e-2)[::-1]  # a non-trivial state to start from
    before = pytree.tree_map(torch.clone, (params, state))
    want_p, want_s = adamw_update(grads, state, params, lr=1e-2, fused=fused)
    for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves((params, state)), strict=True):
        assert torch.equal(a, b)  # not donated: the inputs are untouched
    copy = pytree.tree_map(torch.clone, (params, state))
    got_p, got_s = adamw_update(grads, copy[1], copy[0], lr=1e-2, donate=True, fused=fused)
    for a, b in zip(pytree.tree_leaves((want_p, want_s)), pytree.tree_leaves((got_p, got_s)), strict=True):
        assert torch.equal(a, b)
    donated = pytree.tree_leaves((copy[0], copy[1].mu, copy[1].nu))
    reused = pytree.tree_leaves((got_p, got_s.mu, got_s.nu))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(donated, reused, strict=True))


def test_donated_clipping_scales_the_given_buffers(tiny_config):
    grads = _random_grads(init_params(tiny_config, seed=0), 5)
    want, norm = clip_by_global_norm(grads, 0.01)
    got, norm2 = clip_by_global_norm(grads, 0.01, donate=True)
    assert torch.equal(norm, norm2)
    for a, b, g in zip(pytree.tree_leaves(want), pytree.tree_leaves(got), pytree.tree_leaves(grads), strict=True):
        assert torch.equal(a, b) and b is g


def test_fused_update_needs_one_floating_dtype(tiny_config):
    params = init_params(tiny_config, seed=0)
    grads = pytree.tree_map(lambda g: g.bfloat16(), _random_grads(params, 6))
    with pytest.raises(ValueError, match="one floating dtype.*fused=False"):
        adamw_update(grads, adamw_init(params), params, lr=1e-3, fused=True)

"""Properties of the individual layer functions: layer norm, GELU, attention, dropout."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn.layers import attend_explicit, attend_fast, causal_mask, dropout, split_heads
from gpt2fn.params import LayerNormParams


def _unit_norm(d: int, device: torch.device, dtype: torch.dtype) -> LayerNormParams:
    return LayerNormParams(torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype))


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), d=st.integers(2, 40),
       loc=st.floats(-50, 50), spread=st.floats(0.1, 20))
def test_layer_norm_gives_zero_mean_unit_variance_before_the_affine_part(device, seed, rows, d, loc, spread):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 3, d, generator=g, dtype=torch.float64) * spread + loc).to(device)
    y = gpt2fn.layer_norm(_unit_norm(d, device, torch.float64), x, eps=1e-12)
    torch.testing.assert_close(y.mean(-1), torch.zeros_like(y.mean(-1)), atol=1e-9, rtol=0)
    var = x.var(-1, unbiased=False)  # unit variance up to the eps guard: var / (var + eps)
    torch.testing.assert_close(y.var(-1, unbiased=False), var / (var + 1e-12), atol=1e-9, rtol=0)


@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(-100, 100), scale=st.floats(0.05, 50))
def test_layer_norm_is_invariant_to_adding_a_constant_and_positive_scaling(device, seed, shift, scale):
    g = torch.Generator().manual_seed(seed)
    d = 24
    f64 = dict(device=device, dtype=torch.float64)  # exact up to eps, so test in float64 with a negligible eps
    p = LayerNormParams(torch.randn(d, generator=g, dtype=torch.float64).to(**f64),
                        torch.randn(d, generator=g, dtype=torch.float64).to(**f64))
    x = torch.randn(2, 5, d, generator=g, dtype=torch.float64).to(**f64)
    base = gpt2fn.layer_norm(p, x, eps=1e-12)
    torch.testing.assert_close(gpt2fn.layer_norm(p, x + shift, eps=1e-12), base, atol=1e-9, rtol=1e-9)
    # exact in the maths: LN(a x; a^2 eps) = LN(x; eps) (with eps fixed, a scale of 0.05 moved it by 1.2e-9)
    torch.testing.assert_close(gpt2fn.layer_norm(p, x * scale, eps=1e-12 * scale**2), base, atol=1e-9, rtol=1e-9)


def test_layer_norm_applies_scale_then_shift(device):
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], device=device)
    p = LayerNormParams(torch.tensor([1.0, 2.0, 3.0, 4.0], device=device), torch.full((4,), 0.5, device=device))
    mean, var = x.mean(), x.var(unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * p.scale + p.shift
    torch.testing.assert_close(gpt2fn.layer_norm(p, x), expected)
    no_bias = p.replace(shift=None)
    torch.testing.assert_close(gpt2fn.layer_norm(no_bias, x), expected - 0.5)


def test_gelu_flavours_match_their_formulas(device):
    x = torch.linspace(-6, 6, 101, device=device, dtype=torch.float64)
    tanh_form = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf_form = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(gpt2fn.gelu(x), tanh_form)
    torch.testing.assert_close(gpt2fn.gelu(x, approximate="erf"), erf_form)
    assert (tanh_form - erf_form).abs().max() > 1e-5  # the flavours really differ


def _qkv(seed: int, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(device)
    k = torch.randn(batch, heads, k_len, head_dim, generator=g).to(device)
    v = torch.randn(batch, heads, k_len, head_dim, generator=g).to(device)
    return q, k, v


@given(seed=st.integers(0, 2**31 - 1), seq=st.integers(1, 12), batch=st.integers(1, 3))
def test_attention_pattern_rows_are_distributions_over_the_past_only(device, seed, seq, batch):
    q, k, v = _qkv(seed, batch, 3, seq, seq, 8, device)
    _, pattern = attend_explicit(q, k, v, None)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(batch, 3, seq, device=device))
    above = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)
    assert torch.all(pattern[..., above] == 0)  # exactly zero, not just small
    assert torch.all(pattern >= 0)


@given(seed=st.integers(0, 2**31 - 1), q_len=st.integers(1, 6), past=st.integers(0, 6),
       padded=st.booleans())
def test_fast_and_explicit_attention_agree(device, seed, q_len, past, padded):
    k_len = q_len + past
    q, k, v = _qkv(seed, 2, 3, q_len, k_len, 8, device)
    key_mask = None
    if padded:
        n_pad = torch.tensor([min(2, k_len - 1), 0])
        key_mask = (torch.arange(k_len)[None, :] >= n_pad[:, None]).to(device)
    fast = attend_fast(q, k, v, key_mask)
    slow, _ = attend_explicit(q, k, v, key_mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_padded_keys_get_no_attention_but_every_row_stays_finite(device):
    q, k, v = _qkv(0, 1, 2, 5, 5, 4, device)
    key_mask = torch.tensor([[False, False, True, True, True]], device=device)
    _, pattern = attend_explicit(q, k, v, key_mask)
    assert torch.isfinite(pattern).all()
    assert torch.all(pattern[0, :, 2:, :2] == 0)  # real queries never see padding
    mask = causal_mask(5, 5, key_mask, device)
    assert mask.shape == (1, 1, 5, 5)


def test_attention_pattern_function_matches_the_fused_layer(device, tiny_params):
    cfg = tiny_params.config
    x = torch.randn(2, 7, cfg.emb_dim, device=device)
    p = tiny_params.blocks[0].attn
    pattern = gpt2fn.attention_pattern(p, x, n_heads=cfg.n_heads)
    v = split_heads(x @ p.w_qkv[:, 2 * cfg.emb_dim:] + p.b_qkv[2 * cfg.emb_dim:], cfg.n_heads)
    z = pattern @ v
    by_hand = z.transpose(1, 2).reshape(2, 7, cfg.emb_dim) @ p.w_out + p.b_out
    torch.testing.assert_close(gpt2fn.attention(p, x, n_heads=cfg.n_heads), by_hand, atol=1e-5, rtol=1e-5)


def test_dropout_is_identity_without_a_generator_and_replayable_with_one(device):
    x = torch.randn(4, 50, device=device)
    assert dropout(x, 0.5, None) is x
    a = dropout(x, 0.5, torch.Generator(device=device).manual_seed(1))
    b = dropout(x, 0.5, torch.Generator(device=device).manual_seed(1))
    c = dropout(x, 0.5, torch.Generator(device=device).manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    kept = a != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(a[kept], x[kept] * 2)  # inverted dropout keeps the expectation


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_is_gelu_sandwich(device, tiny_config, bias):
    cfg = tiny_config.replace(bias=bias)
    p = gpt2fn.init_params(cfg, seed=3, device=device).blocks[1].mlp
    x = torch.randn(2, 5, cfg.emb_dim, device=device)
    hidden = x @ p.w_fc + (p.b_fc if bias else 0)
    expected = torch.nn.functional.gelu(hidden, approximate="tanh") @ p.w_proj + (p.b_proj if bias else 0)
    torch.testing.assert_close(gpt2fn.mlp(p, x), expected, atol=1e-5, rtol=1e-5)

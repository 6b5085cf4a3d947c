"""The config, the parameter tree and its utilities, and the shape-check switch."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

import gpt2fn
from gpt2fn import GPTConfig, forward, init_params, preset


def test_config_defaults_are_the_seed_model():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (50257, 1024, 768, 12, 12)
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is False and cfg.tie_head is False
    assert cfg.head_dim == 64 and cfg.d_mlp == 3072


@pytest.mark.parametrize("changes, message", [
    (dict(emb_dim=100, n_heads=12), "emb_dim (100) must be divisible by n_heads (12)"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(drop_rate=1.5), "drop_rate must be in [0, 1)"),
    (dict(gelu="relu"), "gelu must be 'tanh' or 'erf'"),
    (dict(token_vocab_size=60000), "token_vocab_size must be in [1, vocab_size=50257]"),
])
def test_invalid_configs_are_refused_with_the_reason(changes, message):
    with pytest.raises(ValueError) as info:
        GPTConfig(**changes)
    assert message in str(info.value)


def test_config_is_frozen_hashable_and_round_trips_through_a_dict():
    cfg = preset("gpt2-medium")
    with pytest.raises(AttributeError):
        cfg.emb_dim = 5  # type: ignore[misc]
    assert hash(cfg) == hash(GPTConfig.from_dict(cfg.to_dict()))
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 3})
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        preset("gpt3")


def test_init_follows_gpt2_initialisation():
    cfg = preset("tiny").replace(emb_dim=96, n_heads=4, n_layers=8, vocab_size=500)
    p = init_params(cfg, seed=0)
    assert abs(p.tok_emb.std().item() - 0.02) < 0.002
    assert abs(p.blocks[0].mlp.w_fc.std().item() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(p.blocks[3].mlp.w_proj.std().item() - resid) < 0.1 * resid
    assert abs(p.blocks[3].attn.w_out.std().item() - resid) < 0.1 * resid
    assert torch.all(p.blocks[2].attn.b_qkv == 0) and torch.all(p.blocks[2].mlp.b_fc == 0)
    assert torch.all(p.final_norm.scale == 1) and torch.all(p.final_norm.shift == 0)


def test_init_is_deterministic_per_seed_and_device_independent(tiny_config, device):
    a, b = init_params(tiny_config, seed=5), init_params(tiny_config, seed=5, device=device)
    c = init_params(tiny_config, seed=6)
    leaves = zip(gpt2fn.named_leaves(a), gpt2fn.named_leaves(b), gpt2fn.named_leaves(c), strict=True)
    for (n, x), (_, y), (_, z) in leaves:
        assert torch.equal(x, y.cpu()), n
        if x.std() > 0:
            assert not torch.equal(x, z), n


def test_only_tensors_are_leaves_and_the_config_is_metadata(tiny_config):
    p = init_params(tiny_config.replace(bias=False, qkv_bias=False, tie_head=False), seed=0)
    leaves, spec = pytree.tree_flatten(p)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert rebuilt.config == p.config and rebuilt.blocks[0].mlp.b_fc is None
    doubled = gpt2fn.tree_map(lambda t: t * 2, p)
    assert torch.equal(doubled.head, p.head * 2) and doubled.config is p.config


def test_params_dict_round_trip_is_exact(tiny_config):
    p = init_params(tiny_config, seed=1)
    d = gpt2fn.params_to_dict(p)
    assert "blocks.1.attn.w_qkv" in d and "head" not in d
    back = gpt2fn.params_from_dict(tiny_config, d)
    for (n, x), (_, y) in zip(gpt2fn.named_leaves(p), gpt2fn.named_leaves(back), strict=True):
        assert torch.equal(x, y), n


def test_params_from_dict_reports_every_problem_at_once(tiny_config):
    d = gpt2fn.params_to_dict(init_params(tiny_config, seed=1))
    del d["blocks.0.mlp.w_fc"], d["final_norm.scale"]
    d["blocks.0.attn.w_out"] = torch.zeros(3, 3)
    d["lm_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        gpt2fn.params_from_dict(tiny_config, d, source="my.ckpt")
    msg = str(info.value)
    assert msg.startswith("my.ckpt does not match")
    for part in ("blocks.0.mlp.w_fc", "final_norm.scale", "lm_head.weight",
                 "blocks.0.attn.w_out: got [3, 3], expected [24, 24]"):
        assert part in msg


def test_validate_refuses_mixed_dtypes(tiny_config):
    p = init_params(tiny_config, seed=0)
    mixed = p.replace(pos_emb=p.pos_emb.double())
    with pytest.raises(ValueError, match="mixes dtypes"):
        gpt2fn.validate(mixed)
    assert gpt2fn.validate(p) is p


# ------------------------------------------------------------------------------------------ shape errors


def test_one_dimensional_ids_are_refused_naming_the_dimensions(tiny_params):
    with pytest.raises(Exception) as info:
        forward(tiny_params, torch.tensor([1, 2, 3], device=tiny_params.device))
    assert "ids" in str(info.value) and "batch seq" in str(info.value)


def test_float_ids_are_refused(tiny_params):
    with pytest.raises(Exception) as info:
        forward(tiny_params, torch.ones(1, 3, device=tiny_params.device))
    assert "ids" in str(info.value) and "Int" in str(info.value)


def test_a_sequence_longer_than_the_context_is_refused(tiny_params):
    ids = torch.zeros(1, 33, dtype=torch.long, device=tiny_params.device)
    with pytest.raises(ValueError, match="33 positions .* exceeds context_length 32; crop to the last 32"):
        forward(tiny_params, ids)


def test_mismatched_emb_dim_names_the_dimension(tiny_config, device):
    params = init_params(tiny_config, seed=0, device=device)
    x = torch.randn(1, 4, 30, device=device)
    with pytest.raises(Exception) as info:
        gpt2fn.block(params.blocks[0], x, config=tiny_config)
    assert "d_model" in str(info.value)
    other = init_params(tiny_config.replace(emb_dim=30, n_heads=3), seed=0, device=device)
    with pytest.raises(gpt2fn.ShapeError) as info2:
        gpt2fn.block(other.blocks[0], torch.randn(1, 4, 24, device=device), config=tiny_config)
    assert "norm.scale has shape [30]" in str(info2.value) and "d_model=24" in str(info2.value)


def test_mixed_up_params_tree_is_caught_by_forward(tiny_config, device):
    params = init_params(tiny_config, seed=0, device=device)
    wide = init_params(tiny_config.replace(emb_dim=30), seed=0, device=device)
    broken = params.replace(pos_emb=wide.pos_emb)
    with pytest.raises(gpt2fn.ShapeError, match="params.pos_emb has shape"):
        forward(broken, torch.zeros(1, 3, dtype=torch.long, device=device))


def test_checks_switch_off_in_a_context_and_back_on(tiny_config):
    params = init_params(tiny_config, seed=0)
    other = init_params(tiny_config.replace(emb_dim=30, n_heads=3), seed=0)
    x = torch.randn(1, 4, 24)
    assert gpt2fn.checks_enabled()
    with gpt2fn.shape_checks(False):
        assert not gpt2fn.checks_enabled()
        with pytest.raises(RuntimeError):  # torch's own error: no jaxtyping/ShapeError in the way
            gpt2fn.block(other.blocks[0], x, config=tiny_config)
        torch.testing.assert_close(forward(params, torch.ones(1, 3, dtype=torch.long)),
                                   forward.unchecked(params, torch.ones(1, 3, dtype=torch.long)))
    assert gpt2fn.checks_enabled()
    with pytest.raises(gpt2fn.ShapeError):
        gpt2fn.block(other.blocks[0], x, config=tiny_config)


@pytest.mark.parametrize("value, expected", [("0", "False"), ("1", "True"), ("off", "False")])
def test_environment_variable_sets_the_default(value, expected):
    env = {**os.environ, "GPT2FN_CHECKS": value}
    out = subprocess.run([sys.executable, "-c", "import gpt2fn; print(gpt2fn.checks_enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected

"""vmap over interventions: one batched call over steering scales / vectors and ablation masks equals the loop."""

import pytest
import torch
import torch.utils._pytree as pytree

import gpt2fn
from gpt2fn.study import (
    ablation_sweep,
    forward_with,
    logit_diff,
    steer,
    steering_sweep,
    vmap_edits,
)

IDS = torch.tensor([[1, 5, 9, 33, 2, 7], [4, 4, 60, 8, 11, 3]])


@pytest.fixture(scope="module")
def model():
    return pytree.tree_map(lambda t: t + 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)),
                           gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0))


def metric(logits):
    return logit_diff(logits, 5, 11)


def test_a_sweep_over_steering_scales_equals_the_loop(model):
    v = torch.randn(24, generator=torch.Generator().manual_seed(0))
    scales = torch.linspace(-4, 4, 5)
    got = steering_sweep(model, IDS, "blocks.1.resid_pre", v, scales=scales, positions=[1, 3], metric=metric)
    want = torch.stack([metric(forward_with(model, IDS, edit={"blocks.1.resid_pre": steer(
        v, scale=float(s), positions=[1, 3])})[0]) for s in scales])
    assert got.shape == (5, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[-1])


def test_a_sweep_over_steering_vectors_equals_the_loop_in_chunks(model):
    vectors = torch.randn(4, 24, generator=torch.Generator().manual_seed(1))
    got = steering_sweep(model, IDS, "blocks.0.mlp.out", vectors, chunk_size=3)
    want = torch.stack([forward_with(model, IDS, edit={"blocks.0.mlp.out": steer(v)})[0] for v in vectors])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_sweep_over_ablation_masks_equals_the_loop(model):
    heads = model.config.n_heads
    masks = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)[:, :, None, None]
    assert masks.shape[1] == heads
    got = ablation_sweep(model, IDS, "blocks.1.attn.z", masks, metric=metric)
    want = torch.stack([metric(forward_with(model, IDS, edit={"blocks.1.attn.z": lambda x, m=m: torch.where(
        m, torch.zeros(()), x)})[0]) for m in masks])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], metric(forward_with(model, IDS)[0]), atol=1e-5, rtol=1e-5)


def test_vmap_edits_sweeps_any_edit_argument_and_refuses_bad_ones(model):
    values = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    got = vmap_edits(model, IDS, lambda a: {"blocks.1.resid_mid": lambda x: x * 0.5 + a}, values)
    want = torch.stack([forward_with(model, IDS, edit={"blocks.1.resid_mid": lambda x, a=a: x * 0.5 + a})[0]
                        for a in values])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="leading axis"):
        vmap_edits(model, IDS, lambda a: {}, torch.tensor(1.0))
    with pytest.raises(ValueError, match="no site matches"):
        vmap_edits(model, IDS, lambda a: {"blocks.7.resid_mid": lambda x: x + a}, values)
    with pytest.raises(ValueError, match="bool"):
        ablation_sweep(model, IDS, "blocks.1.attn.z", torch.ones(2, 3, 1, 1))
    with pytest.raises(ValueError, match=r"vectors must be \[n, d\]"):
        steering_sweep(model, IDS, "blocks.1.resid_pre", torch.zeros(24))

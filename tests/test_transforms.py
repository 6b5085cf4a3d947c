"""Weight transforms Params -> Params: layer-norm folding keeps the logits, unembedding centring keeps the softmax."""

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import center_unembed, fold_layer_norm


@st.composite
def models(draw: st.DrawFn) -> tuple[gpt2fn.GPTParams, torch.Tensor]:
    """Small float64 models of every layout (biases or not, q/k/v biases or not, tied head or not) whose every
    weight, layer-norm scale and shift included, is random; and a batch of ids."""
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4]))
    cfg = gpt2fn.GPTConfig(vocab_size=draw(st.integers(5, 29)), context_length=11, emb_dim=heads * head_dim,
                           n_heads=heads, n_layers=draw(st.integers(1, 2)), drop_rate=0.0,
                           qkv_bias=draw(st.booleans()), bias=draw(st.booleans()), tie_head=draw(st.booleans()),
                           gelu=draw(st.sampled_from(["tanh", "erf"])))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    params = gpt2fn.tree_to(gpt2fn.init_params(cfg, seed=seed), dtype=torch.float64)
    params = pytree.tree_map(lambda t: t + 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype), params)
    ids = torch.randint(0, cfg.vocab_size, (2, draw(st.integers(1, 9))), generator=gen)
    return params, ids


@settings(max_examples=15)
@given(models(), st.booleans())
def test_folding_layer_norms_preserves_the_logits(model, final):
    params, ids = model
    folded = fold_layer_norm(params, final=final)
    torch.testing.assert_close(gpt2fn.forward(folded, ids), gpt2fn.forward(params, ids), rtol=1e-9, atol=1e-9)
    gpt2fn.validate(folded)  # shapes agree with the (possibly changed) config
    norms = [b.norm1 for b in folded.blocks] + [b.norm2 for b in folded.blocks]
    norms += [folded.final_norm] if final else []
    for norm in norms:
        assert torch.all(norm.scale == 1)
    for norm in norms[:-1] if final else norms:
        assert norm.shift is None or torch.all(norm.shift == 0)


@settings(max_examples=15)
@given(models())
def test_centring_the_unembedding_preserves_the_softmax_of_the_logits(model):
    params, ids = model
    centred = center_unembed(params)
    before, after = gpt2fn.forward(params, ids), gpt2fn.forward(centred, ids)
    torch.testing.assert_close(after.softmax(-1), before.softmax(-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(after - after.mean(-1, keepdim=True), before - before.mean(-1, keepdim=True))
    assert torch.allclose(centred.head.mean(-1), torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(after, before)  # the logits themselves do move
    assert torch.equal(centred.tok_emb, params.tok_emb)  # a tied head is untied, not the embedding changed
    gpt2fn.validate(centred)


@settings(max_examples=10)
@given(models())
def test_transforms_compose_and_leave_their_input_untouched(model):
    params, ids = model
    before = [t.clone() for t in pytree.tree_leaves(params)]
    both = center_unembed(fold_layer_norm(params))
    torch.testing.assert_close(gpt2fn.forward(both, ids).softmax(-1), gpt2fn.forward(params, ids).softmax(-1),
                               rtol=1e-9, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, pytree.tree_leaves(params), strict=True))


def test_folding_gives_a_model_without_qkv_bias_its_layer_norm_shift_as_bias(device):
    cfg = gpt2fn.preset("tiny", qkv_bias=False, tie_head=False)
    gen = torch.Generator().manual_seed(0)
    params = pytree.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=gen),
                             gpt2fn.init_params(cfg, seed=0))
    params = gpt2fn.tree_to(params, device)
    ids = torch.randint(0, cfg.vocab_size, (3, 5), generator=gen).to(device)
    folded = fold_layer_norm(params)
    assert folded.config.qkv_bias and not params.config.qkv_bias
    shift, w = params.blocks[0].norm1.shift, params.blocks[0].attn.w_qkv
    torch.testing.assert_close(folded.blocks[0].attn.b_qkv, shift @ w)
    torch.testing.assert_close(gpt2fn.forward(folded, ids), gpt2fn.forward(params, ids), rtol=1e-5, atol=1e-5)


def test_transforms_keep_the_dtype(device):
    params = gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0, device=device, dtype=torch.bfloat16)
    for out in (fold_layer_norm(params), center_unembed(params)):
        assert {t.dtype for t in pytree.tree_leaves(out)} == {torch.bfloat16}
        assert out.device == params.device


def test_folding_the_final_norm_refuses_a_zero_scale_with_a_shift():
    params = gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)
    scale = params.final_norm.scale.clone()
    scale[3] = 0
    broken = params.replace(final_norm=params.final_norm.replace(scale=scale))
    with pytest.raises(ValueError, match=r"scale is 0 at \[3\].*final=False"):
        fold_layer_norm(broken)
    fold_layer_norm(broken, final=False)  # the blocks alone still fold

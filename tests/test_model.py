"""Properties of the whole model: causality, batch independence, caches, padding, dtypes, transforms."""

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import forward, init_cache, init_params, loss, preset


def _ids(seed: int, batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


@given(seed=st.integers(0, 2**31 - 1), seq=st.integers(2, 32), data=st.data())
def test_changing_future_tokens_leaves_past_logits_unchanged(device, tiny_params, seed, seq, data):
    vocab = tiny_params.config.vocab_size
    t = data.draw(st.integers(1, seq - 1), label="t")
    ids = _ids(seed, 2, seq, vocab, device)
    changed = ids.clone()
    changed[:, t:] = _ids(seed + 1, 2, seq - t, vocab, device)
    a, b = forward(tiny_params, ids), forward(tiny_params, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=1e-5)


def test_changing_a_past_token_changes_later_logits(device, tiny_params):
    # the converse, so the causality test above cannot pass by a model that ignores its context
    ids = _ids(0, 1, 10, tiny_params.config.vocab_size, device)
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % tiny_params.config.vocab_size
    a, b = forward(tiny_params, ids), forward(tiny_params, changed)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert (a[:, 2:] - b[:, 2:]).abs().amax(-1).min() > 1e-6


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 4), seq=st.integers(1, 16))
def test_batch_rows_are_independent(device, tiny_params, seed, batch, seq):
    ids = _ids(seed, batch, seq, tiny_params.config.vocab_size, device)
    together = forward(tiny_params, ids)
    for i in range(batch):
        torch.testing.assert_close(together[i:i + 1], forward(tiny_params, ids[i:i + 1]), atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**31 - 1), seq=st.integers(2, 20), data=st.data())
def test_cached_decoding_equals_full_recomputation(device, tiny_params, seed, seq, data):
    split = data.draw(st.integers(1, seq - 1), label="split")
    ids = _ids(seed, 2, seq, tiny_params.config.vocab_size, device)
    full = forward(tiny_params, ids)
    cache = init_cache(tiny_params.config, 2, seq, device=device)
    first, cache = forward(tiny_params, ids[:, :split], cache=cache)
    steps = [first]
    for t in range(split, seq):  # then one token at a time
        logits, cache = forward(tiny_params, ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    assert cache.length == seq
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_left_padding_with_a_mask_equals_no_padding(device, tiny_params, seed, lengths):
    vocab, width = tiny_params.config.vocab_size, max(lengths)
    rows = [_ids(seed + i, 1, n, vocab, device)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    padded = forward(tiny_params, ids, pad_mask=mask)
    for i, row in enumerate(rows):
        alone = forward(tiny_params, row[None])
        torch.testing.assert_close(padded[i, width - len(row):], alone[0], atol=1e-5, rtol=1e-5)


def test_left_padded_cache_decodes_like_each_prompt_alone(device, tiny_params):
    vocab = tiny_params.config.vocab_size
    short, long = _ids(1, 1, 3, vocab, device)[0], _ids(2, 1, 6, vocab, device)[0]
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long, device=device), short]), long])
    mask = torch.tensor([[False] * 3 + [True] * 3, [True] * 6], device=device)
    cache = init_cache(tiny_params.config, 2, 10, device=device, padded=True)
    _, cache = forward(tiny_params, ids, pad_mask=mask, cache=cache)
    nxt = _ids(3, 2, 1, vocab, device)
    step, cache = forward(tiny_params, nxt, cache=cache)
    for i, row in enumerate([short, long]):
        alone = forward(tiny_params, torch.cat([row, nxt[i]])[None])
        torch.testing.assert_close(step[i, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_last_only_returns_the_last_position(device, tiny_params):
    ids = _ids(4, 2, 9, tiny_params.config.vocab_size, device)
    torch.testing.assert_close(forward(tiny_params, ids, last_only=True), forward(tiny_params, ids)[:, -1:])


def test_bf16_forward_is_close_to_fp32(device, tiny_params):
    ids = _ids(5, 2, 16, tiny_params.config.vocab_size, device)
    full = forward(tiny_params, ids)
    tree = gpt2fn.tree_to(tiny_params, dtype=torch.bfloat16)
    half = forward(tree, ids)
    # 16-bit weights are storage on CPU (fp32 activations), a compute dtype elsewhere
    assert half.dtype == tree.compute_dtype == (torch.float32 if device.type == "cpu" else torch.bfloat16)
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.05)


def test_torch_func_grad_of_the_loss_equals_autograd(device, tiny_params):
    ids = _ids(6, 3, 12, tiny_params.config.vocab_size, device)
    targets = _ids(7, 3, 12, tiny_params.config.vocab_size, device)
    grads = torch.func.grad(loss)(tiny_params, ids, targets)
    assert isinstance(grads, gpt2fn.GPTParams) and grads.config == tiny_params.config
    leaves = gpt2fn.tree_map(lambda t: t.detach().clone().requires_grad_(), tiny_params)
    loss(leaves, ids, targets).backward()
    for (name, g), (_, p) in zip(gpt2fn.named_leaves(grads), gpt2fn.named_leaves(leaves), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_vmap_of_grad_gives_per_example_gradients(device, tiny_params):
    ids = _ids(8, 4, 10, tiny_params.config.vocab_size, device)
    targets = _ids(9, 4, 10, tiny_params.config.vocab_size, device)

    def example_loss(p, x, y):
        return loss(p, x[None], y[None])

    per_example = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(tiny_params, ids, targets)
    for i in range(4):
        one = torch.func.grad(example_loss)(tiny_params, ids[i], targets[i])
        for (name, a), (_, b) in zip(gpt2fn.named_leaves(per_example), gpt2fn.named_leaves(one), strict=True):
            torch.testing.assert_close(a[i], b, atol=1e-5, rtol=1e-4, msg=name)
    mean_grad = torch.func.grad(loss)(tiny_params, ids, targets)
    torch.testing.assert_close(per_example.tok_emb.mean(0), mean_grad.tok_emb, atol=1e-6, rtol=1e-4)


def test_tied_head_is_one_leaf_that_collects_both_gradients(device, tiny_params):
    assert tiny_params.head is None
    names = [n for n, _ in gpt2fn.named_leaves(tiny_params)]
    assert "head" not in names and names.count("tok_emb") == 1
    ids = _ids(10, 1, 5, tiny_params.config.vocab_size, device)
    grads = torch.func.grad(loss)(tiny_params, ids, ids)
    unused_rows = torch.ones(tiny_params.config.vocab_size, dtype=torch.bool, device=device)
    unused_rows[ids.flatten()] = False
    # rows never embedded still get gradient through the unembedding: proof the head reads this leaf
    assert grads.tok_emb[unused_rows].abs().sum() > 0


def test_dropout_needs_a_generator_and_is_replayable(device, tiny_config):
    params = init_params(tiny_config.replace(drop_rate=0.3), seed=0, device=device)
    ids = _ids(11, 2, 8, tiny_config.vocab_size, device)
    plain = forward(params, ids)
    torch.testing.assert_close(forward(params, ids), plain)  # deterministic inference by default
    a = forward(params, ids, generator=torch.Generator(device=device).manual_seed(0))
    b = forward(params, ids, generator=torch.Generator(device=device).manual_seed(0))
    c = forward(params, ids, generator=1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain) and not torch.allclose(a, c)


def test_erf_gelu_config_changes_the_output(device, tiny_config):
    ids = _ids(12, 1, 6, tiny_config.vocab_size, device)
    tanh = forward(init_params(tiny_config, seed=0, device=device), ids)
    erf = forward(init_params(tiny_config.replace(gelu="erf"), seed=0, device=device), ids)
    assert 0 < (tanh - erf).abs().max() < 0.1


def test_untied_biasless_model_runs_and_differentiates(device, tiny_config):
    cfg = tiny_config.replace(tie_head=False, bias=False, qkv_bias=False)
    params = init_params(cfg, seed=0, device=device)
    assert params.head is not None and params.head.shape == (cfg.emb_dim, cfg.vocab_size)
    ids = _ids(13, 2, 7, cfg.vocab_size, device)
    grads = torch.func.grad(loss)(params, ids, ids)
    assert grads.blocks[0].attn.b_qkv is None and grads.head.abs().sum() > 0


def test_params_move_between_devices_and_dtypes(device, tiny_params):
    moved = gpt2fn.tree_to(tiny_params, device="cpu", dtype=torch.float64)
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in pytree.tree_leaves(moved))
    assert moved.config == tiny_params.config
    assert tiny_params.tok_emb.dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize("name, expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
    ("seed", 163_009_536),
])
def test_preset_parameter_counts_match_the_published_models(name, expected):
    # counted on the meta device: no memory is allocated for the big sizes
    assert gpt2fn.count_params(gpt2fn.params.init_params_meta(preset(name))) == expected

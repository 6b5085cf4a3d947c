"""The fused, chunked head cross-entropy equals the plain `F.cross_entropy(x @ w.T)` in value and gradient."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import init_params, loss
from gpt2fn.losses import head_cross_entropy


def _problem(seed: int, rows: int, vocab: int, d: int, device: torch.device, ignored: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g).to(device)
    w = (torch.randn(vocab, d, generator=g) * 0.5).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = -100
    return x, w, targets.to(device)


def _reference(x, w, targets):
    return F.cross_entropy((x @ w.T).float(), targets, ignore_index=-100)


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), vocab=st.integers(2, 70), d=st.integers(1, 9),
       chunk=st.integers(1, 48), ignored=st.sampled_from([0.0, 0.3]))
def test_value_and_gradients_equal_plain_cross_entropy(device, seed, rows, vocab, d, chunk, ignored):
    x, w, targets = _problem(seed, rows, vocab, d, device, ignored)
    if (targets == -100).all():
        targets[0] = 0
    fused = torch.func.grad_and_value(lambda x, w: head_cross_entropy(x, w, targets, chunk_rows=chunk),
                                      argnums=(0, 1))(x, w)
    plain = torch.func.grad_and_value(lambda x, w: _reference(x, w, targets), argnums=(0, 1))(x, w)
    torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused[0], plain[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_ignored_rows_get_no_gradient_and_do_not_count(device):
    x, w, targets = _problem(0, 12, 30, 5, device)
    targets[3:7] = -100
    dx = torch.func.grad(lambda x: head_cross_entropy(x, w, targets, chunk_rows=5))(x)
    assert dx[3:7].abs().max() == 0 and dx[:3].abs().max() > 0
    keep = targets != -100
    torch.testing.assert_close(head_cross_entropy(x, w, targets), _reference(x[keep], w, targets[keep]))


def test_every_row_ignored_gives_nan_like_cross_entropy(device):
    x, w, _ = _problem(1, 4, 10, 3, device)
    targets = torch.full((4,), -100, device=device)
    assert torch.isnan(_reference(x, w, targets))
    assert torch.isnan(head_cross_entropy(x, w, targets))


def test_upstream_gradient_scales_the_result(device):
    # the gradient is formed in the forward pass for a unit upstream gradient; backward must scale it
    x, w, targets = _problem(2, 9, 13, 4, device)
    fused = torch.func.grad(lambda x: -3.0 * head_cross_entropy(x, w, targets, chunk_rows=4))(x)
    plain = torch.func.grad(lambda x: -3.0 * _reference(x, w, targets))(x)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-4)


def test_per_example_gradients_under_vmap_and_jacrev_match_plain(device):
    x, w, _ = _problem(3, 6, 11, 4, device)
    targets = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(3)).to(device)
    per = torch.func.vmap(torch.func.grad(lambda x, t: head_cross_entropy(x, w, t, chunk_rows=4)),
                          in_dims=(None, 0))(x, targets)
    ref = torch.func.vmap(torch.func.grad(lambda x, t: _reference(x, w, t)), in_dims=(None, 0))(x, targets)
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=1e-4)
    jac = torch.func.jacrev(lambda w: head_cross_entropy(x, w, targets[0]))(w)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda w: _reference(x, w, targets[0]))(w),
                               atol=1e-6, rtol=1e-4)


def test_forward_mode_takes_the_plain_path_and_second_derivatives_raise(device):
    x, w, targets = _problem(4, 5, 7, 3, device)
    torch.testing.assert_close(torch.func.jacfwd(lambda x: head_cross_entropy(x, w, targets))(x),
                               torch.func.jacfwd(lambda x: _reference(x, w, targets))(x), atol=1e-6, rtol=1e-4)
    with pytest.raises(Exception, match="jvp"):  # torch: "You must implement the jvp function ..."
        torch.func.hessian(lambda x: head_cross_entropy(x, w, targets))(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(head_cross_entropy(xr, w, targets), xr, create_graph=True)
    with pytest.raises(RuntimeError):  # once differentiable: no silent zero second derivative
        g.sum().backward()


def test_without_gradients_only_the_loss_is_computed(device):
    x, w, targets = _problem(5, 10, 17, 4, device)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(x, w, targets, chunk_rows=3), _reference(x, w, targets))


def test_bad_shapes_are_named():
    x, w, targets = _problem(6, 4, 9, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"x \[4, 3\], w \[9, 2\]"):
        head_cross_entropy(x, w[:, :2], targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        head_cross_entropy(x, w, targets, chunk_rows=0)


@pytest.mark.parametrize("tie_head", [True, False])
def test_model_loss_fused_head_equals_the_default_loss_and_its_gradients(device, tiny_config, tie_head):
    cfg = tiny_config.replace(tie_head=tie_head, drop_rate=0.1)
    params = init_params(cfg, seed=0, device=device)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (3, 11), generator=g).to(device)
    targets = torch.randint(0, cfg.vocab_size, (3, 11), generator=g).to(device)
    targets[1, :4] = -100
    for seed in (None, 5):  # without and with dropout: the fused path draws the same masks
        plain = torch.func.grad_and_value(loss)(params, ids, targets, generator=seed)
        fused = torch.func.grad_and_value(loss)(params, ids, targets, generator=seed, fused_head=True)
        torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(gpt2fn.named_leaves(fused[0]), gpt2fn.named_leaves(plain[0]), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_model_loss_fused_head_in_bf16_stays_close_to_fp32(tiny_config):
    params = init_params(tiny_config, seed=0)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    targets = ids.roll(-1, 1)
    ref = torch.func.grad_and_value(loss)(params, ids, targets)
    low = torch.func.grad_and_value(loss)(gpt2fn.tree_to(params, dtype=torch.bfloat16), ids, targets,
                                          fused_head=True)
    assert low[1].dtype == torch.float32
    torch.testing.assert_close(low[1], ref[1], atol=2e-2, rtol=2e-2)
    assert low[0].tok_emb.dtype == torch.bfloat16
    torch.testing.assert_close(low[0].tok_emb.float(), ref[0].tok_emb, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("fused_head", [False, True])
def test_a_trained_vocabulary_restricts_the_softmax_to_its_rows(device, tiny_config, fused_head):
    rows = (2, 5, 6, 11, 40, 96)
    cfg = tiny_config.replace(trained_vocab=rows)
    params = init_params(cfg, seed=0, device=device)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=g).to(device)
    pick = torch.randint(0, len(rows), (2, 7), generator=g)
    targets = torch.tensor(rows)[pick].to(device)
    targets[0, 0] = -100
    got = torch.func.grad_and_value(loss)(params, ids, targets, fused_head=fused_head)
    index = torch.tensor(rows, device=device)

    def reference(p):
        logits = gpt2fn.forward(p, ids).flatten(0, 1)[:, index]
        return F.cross_entropy(logits, pick.to(device).flatten().masked_fill(targets.flatten() == -100, -100))

    want = torch.func.grad_and_value(reference)(params)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(gpt2fn.named_leaves(got[0]), gpt2fn.named_leaves(want[0]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)
    outside = [i for i in range(cfg.vocab_size) if i not in rows]
    assert got[0].tok_emb[outside].abs().max() < got[0].tok_emb[list(rows)].abs().max()  # untouched by the head
    assert got[1] < torch.func.grad_and_value(loss)(init_params(tiny_config, seed=0, device=device), ids,
                                                     targets)[1]  # fewer competitors: a lower loss


def test_a_trained_vocabulary_keeps_a_nonnegative_ignore_index_apart_from_positions(tiny_config):
    # ignore_index=1 is also the position of id 5 among the trained ids: only the target 1 may be skipped
    params = init_params(tiny_config.replace(trained_vocab=(2, 5, 6, 11)), seed=0)
    ids = torch.tensor([[3, 4, 7]])
    both = loss(params, ids, torch.tensor([[5, 1, 6]]), ignore_index=1)
    torch.testing.assert_close(both, loss(params, ids, torch.tensor([[5, -100, 6]])))
    assert not torch.isclose(both, loss(params, ids, torch.tensor([[-100, -100, 6]])))


def test_a_trained_vocabulary_must_be_sorted_ids_inside_the_vocabulary(tiny_config):
    for bad in [(), (3, 2), (1, 1), (-1, 4), (0, tiny_config.vocab_size)]:
        with pytest.raises(ValueError, match="trained_vocab"):
            tiny_config.replace(trained_vocab=bad)
    cfg = gpt2fn.GPTConfig.from_dict({**tiny_config.to_dict(), "trained_vocab": [1, 4, 9]})  # JSON lists
    assert cfg.trained_vocab == (1, 4, 9) and "trained_vocab" not in repr(cfg)


def test_a_trained_vocabulary_survives_save_and_load(tmp_path, tiny_config):
    params = init_params(tiny_config.replace(trained_vocab=(0, 3, 7)), seed=0)
    gpt2fn.save(params, tmp_path / "m.safetensors")
    assert gpt2fn.load(tmp_path / "m.safetensors").config.trained_vocab == (0, 3, 7)

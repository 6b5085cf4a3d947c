"""FactoredMatrix against the materialised product (torch.linalg), the head circuits against the stored weights
and the forward pass, composition scores against a dense loop over head pairs, and the errors of bad arguments."""

import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import example, given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn.shapes import shape_checks
from gpt2fn.study import (
    FactoredMatrix,
    composition_score,
    composition_scores,
    full_ov_circuit,
    full_qk_circuit,
    ov_circuit,
    qk_circuit,
    run_with_capture,
)

F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-9, atol=1e-9)


def _randn(shape, seed, device):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64).to(device)


@st.composite
def factored(draw, square=False):
    """A FactoredMatrix with 0-2 leading axes (each factor may hold 1 on an axis, to broadcast), small sizes."""
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    a_batch = [s if draw(st.booleans()) else 1 for s in batch]
    b_batch = [s if draw(st.booleans()) else 1 for s in batch]
    m, r = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n = m if square else draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    return a_batch, b_batch, m, r, n, seed


def _make(spec, device):
    a_batch, b_batch, m, r, n, seed = spec
    return FactoredMatrix(_randn((*a_batch, m, r), seed, device), _randn((*b_batch, r, n), seed + 1, device))


# --------------------------------------------------------------------------------------------------------------
# FactoredMatrix


@given(spec=factored())
def test_shape_product_transpose_and_reverse_product_match_the_materialised_matrix(spec, device):
    fm = _make(spec, device)
    a_batch, b_batch, m, r, n, _ = spec
    dense = fm.A @ fm.B
    batch = torch.broadcast_shapes(tuple(a_batch), tuple(b_batch))
    assert fm.shape == (*batch, m, n) and fm.AB.shape == fm.shape and fm.batch_shape == batch
    assert (fm.ldim, fm.mdim, fm.rdim, fm.ndim) == (m, r, n, len(batch) + 2)
    torch.testing.assert_close(fm.AB, dense, **TOL)
    torch.testing.assert_close(fm.T.AB, dense.mT, **TOL)
    if m == n:
        torch.testing.assert_close(fm.BA, fm.B @ fm.A, **TOL)


@given(spec=factored(), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_products_stay_factored_through_the_narrowest_width_and_equal_the_dense_product(spec, k, seed, device):
    fm = _make(spec, device)
    m, r, n = fm.ldim, fm.mdim, fm.rdim
    right, left = _randn((n, k), seed, device), _randn((2, 1, k, m) if fm.ndim == 2 else (k, m), seed + 1, device)
    other = FactoredMatrix(_randn((n, 3), seed + 2, device), _randn((3, k), seed + 3, device))
    for got, want, inner in ((fm @ right, fm.AB @ right, min(r, n)), (left @ fm, left @ fm.AB, min(r, m)),
                             (fm @ other, fm.AB @ other.AB, min(r, 3, n))):
        assert isinstance(got, FactoredMatrix) and got.mdim == inner
        torch.testing.assert_close(got.AB, want, **TOL)
    vec_r, vec_l = _randn((n,), seed + 4, device), _randn((m,), seed + 5, device)
    torch.testing.assert_close(fm @ vec_r, fm.AB @ vec_r, **TOL)
    torch.testing.assert_close(vec_l @ fm, vec_l @ fm.AB, **TOL)
    torch.testing.assert_close((fm * 2.5).AB, 2.5 * fm.AB, **TOL)
    torch.testing.assert_close((torch.tensor(-3.0, **F64, device=device) * fm).AB, -3 * fm.AB, **TOL)


@given(spec=factored())
def test_svd_from_the_factors_matches_torch_linalg_on_the_product(spec, device):
    fm = _make(spec, device)
    dense = fm.AB
    k = min(fm.ldim, fm.mdim, fm.rdim)
    u, s, vh = fm.svd()
    assert u.shape == (*fm.batch_shape, fm.ldim, k) and s.shape == (*fm.batch_shape, k)
    assert vh.shape == (*fm.batch_shape, k, fm.rdim)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[..., :k], **TOL)
    torch.testing.assert_close(fm.S, s, **TOL)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, dense, **TOL)
    eye = torch.eye(k, **F64, device=device).expand(*fm.batch_shape, k, k)
    torch.testing.assert_close(u.mT @ u, eye, **TOL)
    torch.testing.assert_close(vh @ vh.mT, eye, **TOL)
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(dense), **TOL)
    torch.testing.assert_close(u @ fm.collapse_l(), dense, **TOL)
    torch.testing.assert_close(fm.collapse_r() @ vh, dense, **TOL)


@given(spec=factored(square=True))
def test_eigenvalues_are_those_of_the_product_apart_from_zeros(spec, device):
    fm = _make(spec, device)
    ours, full = fm.eigenvalues, torch.linalg.eigvals(fm.AB)
    assert ours.shape == (*fm.batch_shape, fm.mdim) and ours.is_complex()
    # equal multisets up to zeros <=> equal power sums sum(lambda^k), k = 1..max(m, r)
    scale = full.abs().amax(-1).clamp_min(1.0)
    for power in range(1, max(fm.ldim, fm.mdim) + 1):
        got, want = (ours ** power).sum(-1), (full ** power).sum(-1)
        assert ((got - want).abs() <= 1e-8 * scale ** power * fm.ldim).all(), (power, got, want)


@given(m=st.integers(2, 6), r=st.integers(2, 6), n=st.integers(2, 6), q=st.integers(1, 5), seed=st.integers(0, 999))
@example(m=4, r=6, n=2, q=1, seed=14)  # a noise direction of 2.1e-16 above matrix_rank's own threshold
def test_rank_counts_the_independent_directions_as_matrix_rank_does(m, r, n, q, seed, device):
    a = _randn((m, q), seed, device) @ _randn((q, r), seed + 1, device)  # rank min(m, q, r)
    fm = FactoredMatrix(a, _randn((r, n), seed + 2, device))
    assert fm.rank().item() == torch.linalg.matrix_rank(fm.AB).item() == min(m, q, r, n)


def test_selection_of_leading_axes_rows_and_columns_matches_indexing_the_product(device):
    fm = FactoredMatrix(_randn((4, 3, 5, 2), 0, device), _randn((3, 2, 6), 1, device))
    dense = fm.AB
    for idx in (1, (2, 0), (slice(1, 3), 2), (..., 1), [0, 3], (None, 1)):
        got = fm[idx]
        full = (*(idx if isinstance(idx, tuple) else (idx,)), slice(None), slice(None))
        torch.testing.assert_close(got.AB, dense[full], **TOL)
    torch.testing.assert_close(fm.rows([4, 0]).AB, dense[..., [4, 0], :], **TOL)
    torch.testing.assert_close(fm.rows(-1).AB, dense[..., -1:, :], **TOL)
    torch.testing.assert_close(fm.cols(slice(1, 4)).AB, dense[..., 1:4], **TOL)
    torch.testing.assert_close(fm.cols(torch.tensor([5, 2], device=device)).AB, dense[..., [5, 2]], **TOL)
    torch.testing.assert_close(fm.unsqueeze(1).AB, dense.unsqueeze(1), **TOL)
    with pytest.raises(IndexError, match=r"more than its 2 leading axes.*\.rows\(\.\.\.\)"):
        fm[0, 0, 0]
    with pytest.raises(IndexError, match="row 5 is out of range for 5 rows"):
        fm.rows(5)


def test_a_factored_matrix_is_a_pytree_that_tree_map_and_torch_func_take(device):
    fm = FactoredMatrix(_randn((3, 5, 2), 0, device), _randn((3, 2, 4), 1, device))
    leaves = pytree.tree_leaves(fm)
    assert len(leaves) == 2 and leaves[0] is fm.A and leaves[1] is fm.B
    half = pytree.tree_map(lambda t: t.to(torch.float32), fm)
    assert isinstance(half, FactoredMatrix) and half.dtype == torch.float32
    torch.testing.assert_close(half.AB, fm.AB.float(), rtol=1e-5, atol=1e-6)
    # d||AB||_F / dA = (AB / ||AB||) B^T, through QR and SVD of the core, leaf by leaf
    grads = torch.func.grad(lambda f: f.norm().sum())(fm)
    assert isinstance(grads, FactoredMatrix)
    dense = fm.AB
    torch.testing.assert_close(grads.A, (dense / fm.norm()[:, None, None]) @ fm.B.mT, **TOL)
    torch.testing.assert_close(grads.B, fm.A.mT @ (dense / fm.norm()[:, None, None]), **TOL)
    torch.testing.assert_close(torch.func.vmap(lambda f: f.norm())(fm), fm.norm(), **TOL)


def test_factors_that_cannot_form_a_product_are_refused(device):
    with pytest.raises(ValueError, match=r"share the inner width: A \[3, 4\] has 4 columns, B \[5, 2\] has 5 rows"):
        FactoredMatrix(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="at least two axes"):
        FactoredMatrix(torch.zeros(3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="do not broadcast"):
        FactoredMatrix(torch.zeros(2, 3, 4), torch.zeros(3, 4, 2))
    with pytest.raises(TypeError, match="must be tensors"):
        FactoredMatrix([[1.0]], torch.zeros(1, 1))
    fm = FactoredMatrix(torch.zeros(3, 2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"needs a square matrix.*\[3, 5\]"):
        _ = fm.BA
    with pytest.raises(ValueError, match=r"needs a square matrix"):
        _ = fm.eigenvalues
    with pytest.raises(ValueError, match=r"inner widths differ \(5 vs 4\)"):
        fm @ torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"inner widths differ \(2 vs 3\)"):
        torch.zeros(4, 2) @ fm
    with pytest.raises(ValueError, match="needs a scalar"):
        fm * torch.ones(2)


# --------------------------------------------------------------------------------------------------------------
# Circuits of a model

CFG = gpt2fn.preset("tiny", n_layers=4)  # layer 4, heads 3, head_dim 8, d_model 24, vocab 97, ctx 32


def _noisy(cfg, device, seed=0):
    """Random weights with non-trivial layer norms and biases (init has unit scales and zero biases)."""
    p = gpt2fn.init_params(cfg, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    return pytree.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g).to(t), p)


@pytest.fixture
def params(device):
    return _noisy(CFG, device)


def _dense_heads(params, layer):
    """W_Q, W_K, W_V `[heads, d_model, head_dim]` and W_O `[heads, head_dim, d_model]` sliced from the stored
    matrices by explicit column / row ranges (not through gpt2fn.study.weights)."""
    cfg = params.config
    d, hd = cfg.emb_dim, cfg.head_dim
    w_qkv, w_out = params.blocks[layer].attn.w_qkv, params.blocks[layer].attn.w_out
    cols = [torch.stack([w_qkv[:, part * d + h * hd: part * d + (h + 1) * hd] for h in range(cfg.n_heads)])
            for part in range(3)]
    return (*cols, torch.stack([w_out[h * hd:(h + 1) * hd] for h in range(cfg.n_heads)]))


def test_ov_and_qk_circuits_are_the_head_blocks_of_the_stored_matrices(params):
    cfg = params.config
    for layer in range(cfg.n_layers):
        wq, wk, wv, wo = _dense_heads(params, layer)
        ov, qk = ov_circuit(params, layer), qk_circuit(params, layer)
        assert ov.shape == qk.shape == (cfg.n_heads, cfg.emb_dim, cfg.emb_dim) and ov.mdim == cfg.head_dim
        torch.testing.assert_close(ov.AB, wv @ wo)
        torch.testing.assert_close(qk.AB, wq @ wk.mT)
        for h in range(cfg.n_heads):
            torch.testing.assert_close(ov_circuit(params, layer, h).AB, wv[h] @ wo[h])
            torch.testing.assert_close(qk_circuit(params, layer, h - cfg.n_heads).AB, wq[h] @ wk[h].T)
    every = ov_circuit(params, None)
    assert every.shape == (cfg.n_layers, cfg.n_heads, cfg.emb_dim, cfg.emb_dim)
    torch.testing.assert_close(every[2, 1].AB, ov_circuit(params, 2, 1).AB)
    torch.testing.assert_close(qk_circuit(params, None, 1).AB, torch.stack(
        [qk_circuit(params, i, 1).AB for i in range(cfg.n_layers)]))
    assert ov_circuit(params, 1, 0).A.data_ptr() == params.blocks[1].attn.w_qkv[:, 2 * cfg.emb_dim:].data_ptr()


def test_the_ov_circuit_carries_what_a_head_writes_and_the_qk_circuit_gives_its_scores(device):
    params = _noisy(CFG.replace(qkv_bias=False), device)  # no q/k/v biases: circuits are the whole map
    cfg, layer = params.config, 2
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3)).to(device)
    sites = [f"blocks.{layer}.{s}" for s in ("ln1", "attn.scores", "attn.pattern", "attn.result")]
    _, acts = run_with_capture(params, ids, sites)
    x, scores, pattern, result = (acts[s] for s in sites)
    causal = torch.ones(7, 7, dtype=torch.bool, device=device).tril()
    for h in range(cfg.n_heads):
        ov, qk = ov_circuit(params, layer, h), qk_circuit(params, layer, h)
        torch.testing.assert_close(result[:, :, h], (pattern[:, h] @ (x @ ov)).AB, rtol=1e-4, atol=1e-5)
        want = (x @ qk.AB @ x.mT / math.sqrt(cfg.head_dim))[:, causal]
        torch.testing.assert_close(scores[:, h][:, causal], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_full_circuits_are_embedding_circuit_unembedding_products_held_factored(tied, device):
    params = _noisy(CFG.replace(tie_head=tied), device)
    cfg = params.config
    assert (params.head is None) == tied
    w_u = params.tok_emb.T if tied else params.head
    we, wp = params.tok_emb, params.pos_emb
    wq, wk, wv, wo = _dense_heads(params, 3)
    full = full_ov_circuit(params, 3, 1)
    assert full.shape == (cfg.vocab_size, cfg.vocab_size) and full.A.shape == (cfg.vocab_size, cfg.head_dim)
    assert full.B.shape == (cfg.head_dim, cfg.vocab_size)  # never vocab x vocab
    torch.testing.assert_close(full.AB, we @ wv[1] @ wo[1] @ w_u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full_ov_circuit(params, 3, source="pos").AB, wp @ wv @ wo @ w_u, rtol=1e-4,
                               atol=1e-6)
    qk = full_qk_circuit(params, 3, 2)
    assert qk.shape == (cfg.vocab_size, cfg.vocab_size) and qk.mdim == cfg.head_dim
    torch.testing.assert_close(qk.AB, we @ wq[2] @ wk[2].T @ we.T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full_qk_circuit(params, 3, 2, query="pos").AB, wp @ wq[2] @ wk[2].T @ we.T,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full_qk_circuit(params, 3, key="pos").AB, we @ wq @ wk.mT @ wp.T, rtol=1e-4,
                               atol=1e-6)
    assert full_ov_circuit(params, None).shape == (cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.vocab_size)


# --------------------------------------------------------------------------------------------------------------
# Composition scores


def _dense_score(left, right):
    return (torch.linalg.matrix_norm(left @ right) / (torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(right)))


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_scores_equal_a_dense_loop_over_head_pairs(kind, params):
    cfg = params.config
    p64 = gpt2fn.tree_to(params, dtype=torch.float64)
    got = composition_scores(p64, kind)
    assert got.shape == (cfg.n_layers, cfg.n_heads, cfg.n_layers, cfg.n_heads) and got.dtype == torch.float64
    heads = [_dense_heads(p64, i) for i in range(cfg.n_layers)]
    want = torch.zeros_like(got)
    for l1 in range(cfg.n_layers):
        for h1 in range(cfg.n_heads):
            ov1 = heads[l1][2][h1] @ heads[l1][3][h1]  # what l1.h1 writes
            for l2 in range(l1 + 1, cfg.n_layers):
                for h2 in range(cfg.n_heads):
                    wq, wk, wv, wo = (w[h2] for w in heads[l2])
                    right = {"q": wq @ wk.T, "k": (wq @ wk.T).T, "v": wv @ wo}[kind]
                    want[l1, h1, l2, h2] = _dense_score(ov1, right)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got[:, :, 0] == 0).all() and (got[3] == 0).all() and ((got > 0) & (got < 1)).sum() == 6 * 9
    torch.testing.assert_close(composition_scores(params, kind), got.float(), rtol=1e-4, atol=1e-6)  # fp32


def test_composition_score_of_circuits_pairs_every_left_with_every_right(params):
    ov, qk = ov_circuit(params, None), qk_circuit(params, None)
    scores = composition_scores(params, "k")
    torch.testing.assert_close(composition_score(ov[0, 1], qk[2, 0], "k"), scores[0, 1, 2, 0])
    torch.testing.assert_close(composition_score(ov[0], qk[1:], "k"), scores[0, :, 1:])
    assert composition_score(ov[0], qk, "q").shape == (3, 4, 3)
    torch.testing.assert_close(composition_score(ov[0], qk[2], "v", outer=False),
                               torch.stack([_dense_score(ov[0, h].AB, qk[2, h].AB) for h in range(3)]))
    # K-composition is Q-composition with the later QK transposed; scores ignore the scale of either side
    torch.testing.assert_close(composition_score(ov[1, 2], qk[3, 1], "k"), composition_score(ov[1, 2], qk[3, 1].T,
                                                                                              "q"))
    torch.testing.assert_close(composition_score(ov[1, 2] * 7.0, qk[3, 1] * 0.1, "q"),
                               composition_score(ov[1, 2], qk[3, 1], "q"))


# --------------------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument and its valid values, with shape checks on and off

BAD = [
    ("layer past the end", lambda p: ov_circuit(p, 4), r"layer must be an int in 0\.\.3 \(a block\), or -4\.\.-1.*4"),
    ("layer before the start", lambda p: qk_circuit(p, -5), r"layer must be an int in 0\.\.3.*got -5"),
    ("layer not an int", lambda p: full_ov_circuit(p, 1.0), r"layer must be an int.*got 1\.0"),
    ("head past the end", lambda p: ov_circuit(p, 0, 3), r"head must be an int in 0\.\.2 \(or -3\.\.-1\).*got 3"),
    ("head not an int", lambda p: full_qk_circuit(p, 0, "1"), r"head must be an int.*got '1'"),
    ("unknown kind", lambda p: composition_scores(p, "x"), r"kind must be one of 'q', 'k', 'v'.*got 'x'"),
    ("upper-case kind", lambda p: composition_scores(p, "K"), r"kind must be one of 'q', 'k', 'v'.*got 'K'"),
    ("unknown pair kind", lambda p: composition_score(ov_circuit(p, 0), qk_circuit(p, 1), "o"),
     r"kind must be one of"),
    ("unknown source", lambda p: full_ov_circuit(p, 0, source="emb"), r"source must be 'tok'.*or 'pos'.*'emb'"),
    ("unknown key side", lambda p: full_qk_circuit(p, 0, key="x"), r"key must be 'tok'.*or 'pos'.*'x'"),
    ("pair of mismatched widths", lambda p: composition_score(ov_circuit(p, 0), FactoredMatrix(
        torch.zeros(5, 2), torch.zeros(2, 5)), "q"), r"left \[3, 24, 24\] writes 24 columns but right \[5, 5\]"),
]


@pytest.mark.parametrize("checks", [True, False], ids=["checks", "no-checks"])
@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_a_value_error_naming_them(name, call, match, checks, device):
    params = gpt2fn.init_params(CFG, seed=0, device=device)
    with shape_checks(checks), pytest.raises(ValueError, match=match):
        call(params)


def test_something_other_than_params_or_circuits_is_a_type_error(params):
    with pytest.raises(TypeError, match="params must be a GPTParams tree.*dict"):
        ov_circuit({}, 0)
    with pytest.raises(TypeError, match="params must be a GPTParams tree"):
        composition_scores(gpt2fn.params_to_dict(params), "q")
    with pytest.raises(TypeError, match="must be FactoredMatrix circuits.*Tensor"):
        composition_score(ov_circuit(params, 0).AB, qk_circuit(params, 1), "q")

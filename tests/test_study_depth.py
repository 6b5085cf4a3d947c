"""The batched sweep engine (`batched_runs`) and the batched `patching_sweep`, each against a loop of single runs."""

import pytest
import torch

import gpt2fn
from gpt2fn.study import RowEdit, batched_runs, forward_with, logit_diff, patching_sweep, run_with_capture

SEQ, BATCH = 6, 2


@pytest.fixture
def params(tiny_config, device):
    p = gpt2fn.init_params(tiny_config, seed=0, device=device)
    g = torch.Generator().manual_seed(1)
    return torch.utils._pytree.tree_map(
        lambda t: t + 0.3 * torch.randn(t.shape, generator=g).to(t) if t.is_floating_point() else t, p)


def _ids(cfg, device, seed):
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)).to(device)


def test_batched_runs_equal_one_forward_per_row(params, device):
    cfg = params.config
    ids, other = _ids(cfg, device, 3), _ids(cfg, device, 4)
    last = cfg.n_layers - 1
    _, clean = run_with_capture(params, other, "blocks.*")
    pos = torch.zeros(SEQ, 1, dtype=torch.bool, device=device)
    pos[2] = True
    head = torch.zeros(cfg.n_heads, 1, 1, dtype=torch.bool, device=device)
    head[1] = True
    rows = [
        [RowEdit("blocks.0.resid_pre", pos, clean["blocks.0.resid_pre"])],
        [],  # no edit: the corrupt run itself
        [RowEdit(f"blocks.{last}.attn.z", head, 0.0)],  # zero-ablate one head
        [RowEdit(f"blocks.{last}.mlp.post", torch.ones(1, dtype=torch.bool, device=device), clean[
            f"blocks.{last}.mlp.post"])],
        [RowEdit("blocks.0.attn.pattern", head, clean["blocks.0.attn.pattern"])],  # the explicit attention path
        [RowEdit("blocks.0.attn.k", head & pos[None], clean["blocks.0.attn.k"]),  # two sites, two layers
         RowEdit(f"blocks.{last}.resid_mid", pos, clean[f"blocks.{last}.resid_mid"])],
    ]

    def metric(lg):
        return torch.stack([logit_diff(lg, 1, 2).mean(), lg[:, 0, 3].sum()])

    got = batched_runs(params, ids, rows, metric)
    assert got.shape == (len(rows), 2)

    def by_hand(row):
        edits: dict = {}
        for e in row:
            edits[e.site] = (lambda x, e=e: torch.where(e.mask, torch.as_tensor(e.value, dtype=x.dtype), x))
        with torch.no_grad():
            return metric(forward_with(params, ids, edit=edits)[0])

    want = torch.stack([by_hand(r) for r in rows])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], metric(gpt2fn.forward(params, ids)), rtol=1e-4, atol=1e-5)
    # chunks of any size, in any row order, give the same rows
    torch.testing.assert_close(batched_runs(params, ids, rows[::-1], metric, chunk_size=2), want.flip(0),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "attn.v", "mlp.out"])
def test_batched_patching_sweep_equals_the_loop_in_chunks_and_under_a_memory_limit(params, device, site):
    cfg = params.config
    ids, other = _ids(cfg, device, 5), _ids(cfg, device, 6)

    def metric(lg):
        return logit_diff(lg, 5, 11).mean()

    loop = patching_sweep(params, other, ids, metric, site=site, vectorize=False)
    assert loop.shape == (cfg.n_layers, SEQ)
    torch.testing.assert_close(patching_sweep(params, other, ids, metric, site=site), loop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patching_sweep(params, other, ids, metric, site=site, chunk_size=5), loop,
                               rtol=1e-4, atol=1e-5)
    # a limit that fits three rows at a time
    one_row = cfg.n_tokens  # any limit under one row's estimate raises; read the estimate from the error
    with pytest.raises(ValueError, match="memory_limit") as err:
        patching_sweep(params, other, ids, metric, site=site, memory_limit=one_row)
    need = int(str(err.value).split("memory_limit >= ")[1].split()[0])
    torch.testing.assert_close(patching_sweep(params, other, ids, metric, site=site, memory_limit=3 * need), loop,
                               rtol=1e-4, atol=1e-5)
    sub = patching_sweep(params, other, ids, metric, site=site, layers=[1], positions=[-1, 0])
    torch.testing.assert_close(sub, loop[1:2, [SEQ - 1, 0]], rtol=1e-4, atol=1e-5)


def test_batched_runs_and_sweeps_reject_bad_input(params, device):
    cfg = params.config
    ids = _ids(cfg, device, 7)
    mask = torch.ones(1, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"rows\[0\].*embed.*0\.\.1"):
        batched_runs(params, ids, [[RowEdit("embed", mask, 0.0)]], lambda lg: lg.sum())
    with pytest.raises(ValueError, match=r"rows\[1\].*blocks\.9"):
        batched_runs(params, ids, [[], [RowEdit("blocks.9.resid_pre", mask, 0.0)]], lambda lg: lg.sum())
    with pytest.raises(ValueError, match="chunk_size"):
        batched_runs(params, ids, [[]], lambda lg: lg.sum(), chunk_size=0)
    with pytest.raises(ValueError, match=f"positions.*-{SEQ}..{SEQ - 1}"):
        patching_sweep(params, ids, ids, lambda lg: lg.sum(), positions=[SEQ])


# --------------------------------------------------------------------------------------------------------------
# Sites: per-head results, layer-norm scale and normalised value


def test_head_results_and_layer_norm_parts_match_their_definitions(params, device):
    cfg = params.config
    ids = _ids(cfg, device, 8)
    plain = gpt2fn.forward(params, ids)
    names = [f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in (
        "resid_pre", "resid_mid", "attn.z", "attn.result", "attn.out", "ln1.scale", "ln1.normalized", "ln2.scale",
        "ln2.normalized", "ln1", "ln2")]
    logits, acts = run_with_capture(params, ids, names)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # computing the parts changes nothing
    hd = cfg.head_dim
    for i, bp in enumerate(params.blocks):
        z, result = acts[f"blocks.{i}.attn.z"], acts[f"blocks.{i}.attn.result"]
        assert result.shape == (BATCH, SEQ, cfg.n_heads, cfg.emb_dim)
        for h in range(cfg.n_heads):  # head h's slice of z through its rows of w_out
            torch.testing.assert_close(result[:, :, h], z[:, h] @ bp.attn.w_out[h * hd:(h + 1) * hd],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.sum(2) + bp.attn.b_out, acts[f"blocks.{i}.attn.out"], rtol=1e-5,
                                   atol=1e-5)
        for n, x in (("ln1", acts[f"blocks.{i}.resid_pre"]), ("ln2", acts[f"blocks.{i}.resid_mid"])):
            x64 = x.double()
            scale = (x64.var(-1, unbiased=False, keepdim=True) + cfg.ln_eps).sqrt()
            torch.testing.assert_close(acts[f"blocks.{i}.{n}.scale"].double(), scale, rtol=1e-5, atol=1e-6)
            normed = (x64 - x64.mean(-1, keepdim=True)) / scale
            torch.testing.assert_close(acts[f"blocks.{i}.{n}.normalized"].double(), normed, rtol=1e-4, atol=1e-5)
            p = bp.norm1 if n == "ln1" else bp.norm2
            torch.testing.assert_close(acts[f"blocks.{i}.{n}"], normed.to(x.dtype) * p.scale + p.shift,
                                       rtol=1e-4, atol=1e-5)
    # editing a head's result is zero-ablating it at z; freezing ln1's scale leaves the run unchanged
    zero_result, _ = forward_with(params, ids, edit={"blocks.0.attn.result": lambda r: r.index_fill(
        2, torch.tensor([1], device=device), 0.0)})
    zero_z, _ = forward_with(params, ids, edit={"blocks.0.attn.z": lambda z: z.index_fill(
        1, torch.tensor([1], device=device), 0.0)})
    torch.testing.assert_close(zero_result, zero_z, rtol=1e-5, atol=1e-5)
    frozen = acts["blocks.1.ln1.scale"]
    same, _ = forward_with(params, ids, edit={"blocks.1.ln1.scale": lambda s: frozen})
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)


def test_patching_sweep_over_head_results_equals_the_loop(params, device):
    cfg = params.config
    ids, other = _ids(cfg, device, 9), _ids(cfg, device, 10)

    def metric(lg):
        return logit_diff(lg, 3, 4).mean()

    fast = patching_sweep(params, other, ids, metric, site="attn.result")
    torch.testing.assert_close(fast, patching_sweep(params, other, ids, metric, site="attn.result",
                                                    vectorize=False), rtol=1e-4, atol=1e-5)
    # patching every head's result at a position is patching attn.out there
    torch.testing.assert_close(fast, patching_sweep(params, other, ids, metric, site="attn.out"), rtol=1e-4,
                               atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Per-head weight views


def test_per_head_weights_are_views_that_reproduce_q_k_v_and_the_output(params, device):
    from gpt2fn.study import W_E, W_U, W_pos, attn_weights
    cfg = params.config
    ids = _ids(cfg, device, 11)
    names = ["blocks.1.ln1", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.result"]
    _, acts = run_with_capture(params, ids, names)
    w = attn_weights(params, 1)
    p = params.blocks[1].attn
    for t in w:
        assert t._base is not None or t.data_ptr() == p.b_out.data_ptr()  # views, not copies
        assert t.untyped_storage().data_ptr() in {p.w_qkv.untyped_storage().data_ptr(),
                                                  p.w_out.untyped_storage().data_ptr(),
                                                  p.b_qkv.untyped_storage().data_ptr(),
                                                  p.b_out.untyped_storage().data_ptr()}
    assert w.W_Q.shape == (cfg.n_heads, cfg.emb_dim, cfg.head_dim) and w.W_O.shape == (cfg.n_heads, cfg.head_dim,
                                                                                         cfg.emb_dim)
    x = acts["blocks.1.ln1"]
    for name, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
        for h in range(cfg.n_heads):  # head by head, with explicit products
            torch.testing.assert_close(x @ W[h] + b[h], acts[f"blocks.1.attn.{name}"][:, h], rtol=1e-5, atol=1e-5)
    _, z = run_with_capture(params, ids, "blocks.1.attn.z")
    for h in range(cfg.n_heads):
        torch.testing.assert_close(z["blocks.1.attn.z"][:, h] @ w.W_O[h], acts["blocks.1.attn.result"][:, :, h],
                                   rtol=1e-5, atol=1e-5)
    assert W_E(params) is params.tok_emb and W_pos(params) is params.pos_emb
    assert W_U(params).shape == (cfg.emb_dim, cfg.vocab_size)
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.1"):
        attn_weights(params, cfg.n_layers)


def test_positions_and_heads_mean_the_same_axes_on_attn_result():
    """`attn.result` is `[batch seq heads d_model]` (positions on axis 1): `patch`/`ablate_head`/`steer` with
    `positions=`/`heads=` select the query positions and heads there as at every other site."""
    from gpt2fn import init_params, preset
    from gpt2fn.study import ablate_head, forward_with, patch, run_with_capture, steer

    params = init_params(preset("tiny"), seed=0)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    site = "blocks.0.attn.result"
    clean = run_with_capture(params, other, site)[1][site]
    base = run_with_capture(params, ids, site)[1][site]
    cases = {
        "patch": (patch(clean, positions=[2, 4], heads=[1]),
                  lambda r: [r[:, t, 1].copy_(clean[:, t, 1]) for t in (2, 4)]),
        "ablate": (ablate_head(0, positions=3), lambda r: r[:, 3, 0].zero_()),
        "steer": (steer(torch.ones(24), positions=[5]), lambda r: r[:, 5].add_(1.0)),
    }
    for name, (edit, expect) in cases.items():
        got = forward_with(params, ids, edit={site: edit}, capture=site)[1][site]
        want = base.clone()
        expect(want)
        torch.testing.assert_close(got, want, msg=name)

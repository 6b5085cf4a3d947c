"""Per-head patching sweeps and path patching, each against the loop of `forward_with(edit=...)` runs it replaces."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn.study import (
    Receiver,
    forward_with,
    head_patching_sweep,
    logit_diff,
    patch,
    path_patch,
    path_patching_sweep,
    run_with_capture,
)

TOL = dict(rtol=1e-4, atol=1e-5)


def _params(n_layers: int, n_heads: int, head_dim: int, seed: int = 0, vocab: int = 23):
    cfg = gpt2fn.GPTConfig(vocab_size=vocab, context_length=16, emb_dim=n_heads * head_dim, n_heads=n_heads,
                           n_layers=n_layers, drop_rate=0.0, qkv_bias=True, mlp_dim=11)
    p = gpt2fn.init_params(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)  # large weights, so that patches move the metric visibly
    return torch.utils._pytree.tree_map(lambda t: t + 0.5 * torch.randn(t.shape, generator=g), p)


def _pair(cfg, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(2))


def _metric(lg):
    return torch.stack([logit_diff(lg, 1, 2).mean(), lg[:, 0].logsumexp(-1).sum()])  # a [2] metric


def _head_edit(site: str, value: torch.Tensor, head: int, positions: list[int]):
    if site.endswith("attn.result"):  # [batch seq heads d_model]: heads on axis 2
        def edit(x):
            m = torch.zeros(x.shape[1], x.shape[2], 1, dtype=torch.bool)
            m[positions, head] = True
            return torch.where(m, value, x)
        return edit
    return patch(value, heads=head, positions=positions)


SITES = ["attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.scores", "attn.result"]


@given(n_layers=st.integers(1, 3), n_heads=st.integers(1, 3), head_dim=st.integers(2, 5), batch=st.integers(1, 2),
       seq=st.integers(2, 5), site=st.sampled_from(SITES), by_position=st.booleans(), chunk=st.integers(1, 7),
       seed=st.integers(0, 1000))
def test_head_patching_sweep_equals_the_loop_of_single_head_patches(n_layers, n_heads, head_dim, batch, seq, site,
                                                                    by_position, chunk, seed):
    params = _params(n_layers, n_heads, head_dim, seed)
    clean, corrupt = _pair(params.config, batch, seq, seed)
    _, acts = run_with_capture(params, clean, f"blocks.*.{site}")
    spots = [[p] for p in range(seq)] if by_position else [list(range(seq))]
    with torch.no_grad():
        want = torch.stack([torch.stack([torch.stack([_metric(forward_with(params, corrupt, edit={
            f"blocks.{i}.{site}": _head_edit(site, acts[f"blocks.{i}.{site}"], h, s)})[0]) for s in spots])
            for h in range(n_heads)]) for i in range(n_layers)])
    if not by_position:
        want = want[:, :, 0]
    got = head_patching_sweep(params, clean, corrupt, _metric, site=site, by_position=by_position, chunk_size=chunk)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(head_patching_sweep(params, clean, corrupt, _metric, site=site,
                                                   by_position=by_position, vectorize=False), want, **TOL)


def test_head_patching_sweep_selects_layers_heads_and_positions_and_fits_a_memory_limit():
    params = _params(3, 3, 4, seed=5)
    clean, corrupt = _pair(params.config, 2, 5, seed=5)
    full = head_patching_sweep(params, clean, corrupt, _metric, site="attn.v", by_position=True)
    assert full.shape == (3, 3, 5, 2)
    sub = head_patching_sweep(params, clean, corrupt, _metric, site="attn.v", by_position=True, layers=[2, 0],
                              heads=[1], positions=[-1, 1])
    torch.testing.assert_close(sub, full[[2, 0]][:, [1]][:, :, [4, 1]], **TOL)
    as_tensors = head_patching_sweep(params, clean, corrupt, _metric, site="attn.v", by_position=True,
                                     layers=[torch.tensor(2)], heads=torch.tensor([1]), positions=[-1])
    torch.testing.assert_close(as_tensors, full[2:, 1:2, 4:], **TOL)  # 0-d tensors and numpy ints index too
    # patching a head at every position at once, every head: the whole layer's z, i.e. patching attn.z there
    every = head_patching_sweep(params, clean, corrupt, _metric, site="attn.z", positions=[0, 2])
    _, acts = run_with_capture(params, clean, "blocks.1.attn.z")
    head0, _ = forward_with(params, corrupt, edit={"blocks.1.attn.z": patch(acts["blocks.1.attn.z"], heads=0,
                                                                              positions=[0, 2])})
    torch.testing.assert_close(every[1, 0], _metric(head0), **TOL)
    with pytest.raises(ValueError, match="memory_limit") as err:
        head_patching_sweep(params, clean, corrupt, _metric, memory_limit=1)
    need = int(str(err.value).split("memory_limit >= ")[1].split()[0])
    torch.testing.assert_close(head_patching_sweep(params, clean, corrupt, _metric, site="attn.v", by_position=True,
                                                   memory_limit=4 * need), full, **TOL)


def test_head_patching_sweep_rejects_bad_sites_layers_heads_and_positions():
    params = _params(2, 3, 4)
    clean, corrupt = _pair(params.config, 1, 4, seed=0)
    with pytest.raises(ValueError, match="heads axis.*attn.z.*got 'resid_pre'"):
        head_patching_sweep(params, clean, corrupt, _metric, site="resid_pre")
    with pytest.raises(ValueError, match=r"layers must be .* 0\.\.1.*\[2\]"):
        head_patching_sweep(params, clean, corrupt, _metric, layers=[2])
    with pytest.raises(ValueError, match=r"heads must be .* 0\.\.2.*\[0, 3\]"):
        head_patching_sweep(params, clean, corrupt, _metric, heads=[0, 3])
    with pytest.raises(ValueError, match=r"positions \[4\] out of range.*-4\.\.3"):
        head_patching_sweep(params, clean, corrupt, _metric, positions=[4])
    with pytest.raises(ValueError, match="same shape"):
        head_patching_sweep(params, clean, corrupt[:, :3], _metric)


# --------------------------------------------------------------------------------------------------------------
# Path patching


def _naive_path_patch(params, clean_ids, corrupt_ids, metric, sender, receivers, positions):
    """The recipe written out with other edits than the library's loop: freeze every head at `attn.result` (each
    head's write) and every MLP at `mlp.out`, the sender taking its corrupt value at `positions`; capture what the
    receivers see; then patch exactly that into a clean run."""
    cfg = params.config
    layer, head = sender
    outs = [f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ("attn.result", "mlp.out")]
    _, clean = run_with_capture(params, clean_ids, outs)
    _, corrupt = run_with_capture(params, corrupt_ids, outs)
    seq = clean_ids.shape[1]
    pos = torch.zeros(seq, dtype=torch.bool)
    pos[positions] = True
    edits = {}
    for site in outs:
        frozen = clean[site].clone()
        if site == f"blocks.{layer}.attn.result" and head != "mlp":
            frozen[:, pos, head] = corrupt[site][:, pos, head]
        if site == f"blocks.{layer}.mlp.out" and head == "mlp":
            frozen[:, pos] = corrupt[site][:, pos]
        edits[site] = (lambda x, f=frozen: f)
    sites = [r.site for r in receivers]
    _, seen = forward_with(params, clean_ids, capture=sites, edit=edits)
    final = {}
    for r in receivers:
        final[r.site] = (patch(seen[r.site], heads=r.heads) if r.heads is not None else patch(seen[r.site]))
    with torch.no_grad():
        return metric(forward_with(params, clean_ids, edit=final)[0])


RECEIVERS = ["attn.q", "attn.k", "attn.v", "ln1", "ln2", "resid_pre", "resid_mid", "resid_post"]


@st.composite
def _receivers(draw, n_layers, n_heads):
    kinds = draw(st.lists(st.tuples(st.integers(0, n_layers - 1), st.sampled_from(RECEIVERS)), min_size=1,
                          max_size=3, unique=True))
    out = []
    for layer, kind in kinds:
        heads = draw(st.lists(st.integers(0, n_heads - 1), min_size=1, max_size=n_heads, unique=True)) \
            if kind.startswith("attn.") else None
        out.append(Receiver(f"blocks.{layer}.{kind}", heads))
    return out


@given(data=st.data(), n_layers=st.integers(1, 3), n_heads=st.integers(1, 3), head_dim=st.integers(2, 4),
       batch=st.integers(1, 2), seq=st.integers(2, 5), seed=st.integers(0, 1000))
def test_path_patching_sweep_equals_the_recipe_run_one_sender_at_a_time(data, n_layers, n_heads, head_dim, batch,
                                                                        seq, seed):
    params = _params(n_layers, n_heads, head_dim, seed)
    clean, corrupt = _pair(params.config, batch, seq, seed)
    receivers = data.draw(_receivers(n_layers, n_heads))
    senders = [(i, h) for i in range(n_layers) for h in [*range(n_heads), "mlp"]]
    positions = data.draw(st.lists(st.integers(0, seq - 1), min_size=1, max_size=seq, unique=True))
    chunk = data.draw(st.integers(1, 5))
    want = torch.stack([_naive_path_patch(params, clean, corrupt, _metric, s, receivers, positions)
                        for s in senders])
    got = path_patching_sweep(params, clean, corrupt, _metric, receivers=receivers, senders=senders,
                              positions=positions, chunk_size=chunk)
    torch.testing.assert_close(got, want, **TOL)
    loop = path_patching_sweep(params, clean, corrupt, _metric, receivers=receivers, senders=senders,
                               positions=positions, vectorize=False)
    torch.testing.assert_close(loop, want, **TOL)


def test_path_to_the_final_stream_is_the_direct_effect_and_an_mlp_path_is_activation_patching():
    params = _params(3, 3, 4, seed=2)
    cfg = params.config
    clean, corrupt = _pair(cfg, 2, 5, seed=2)
    last = f"blocks.{cfg.n_layers - 1}.resid_post"
    _, c = run_with_capture(params, clean, [last, "blocks.0.attn.result", "blocks.2.mlp.out"])
    _, d = run_with_capture(params, corrupt, ["blocks.0.attn.result", "blocks.2.mlp.out"])
    sweep = path_patching_sweep(params, clean, corrupt, _metric, receivers=last)
    assert sweep.shape == (cfg.n_layers, cfg.n_heads, 2)
    for h in range(cfg.n_heads):  # head 0.h's change added to the final stream, read through ln_f and the head
        stream = c[last] + d["blocks.0.attn.result"][:, :, h] - c["blocks.0.attn.result"][:, :, h]
        logits = gpt2fn.layer_norm(params.final_norm, stream, eps=cfg.ln_eps) @ params.head
        torch.testing.assert_close(sweep[0, h], _metric(logits), **TOL)
    # the last MLP's only path to the logits is direct: path patching it is patching its output
    mlp = path_patch(params, clean, corrupt, _metric, sender=(2, "mlp"), receivers=last)
    patched, _ = forward_with(params, clean, edit={"blocks.2.mlp.out": patch(d["blocks.2.mlp.out"])})
    torch.testing.assert_close(mlp, _metric(patched), **TOL)
    # heads of the last layer reach its resid_post; a prompt patched with itself changes nothing
    same = path_patching_sweep(params, clean, clean, _metric, receivers=[last, "blocks.1.ln1"])
    torch.testing.assert_close(same, _metric(gpt2fn.forward(params, clean)).expand_as(same), **TOL)


def test_a_sender_that_reaches_no_receiver_gives_the_clean_metric():
    params = _params(2, 3, 4, seed=3)
    clean, corrupt = _pair(params.config, 1, 4, seed=3)
    base = _metric(gpt2fn.forward(params, clean))
    k1 = Receiver("blocks.1.attn.k", heads=[1])
    sweep = path_patching_sweep(params, clean, corrupt, _metric, receivers=[k1])
    torch.testing.assert_close(sweep[1], base.expand(3, 2), **TOL)  # layer 1's own heads cannot reach its keys
    assert not torch.allclose(sweep[0], base.expand(3, 2))
    with pytest.raises(ValueError, match="after every receiver"):
        path_patch(params, clean, corrupt, _metric, sender=(1, 0), receivers=k1)


def test_path_patching_rejects_bad_senders_receivers_and_memory_limits():
    params = _params(2, 3, 4)
    clean, corrupt = _pair(params.config, 1, 4, seed=0)
    rec = "blocks.1.resid_pre"
    with pytest.raises(ValueError, match=r"sender \(2, 0\): layer must be an int in 0\.\.1"):
        path_patching_sweep(params, clean, corrupt, _metric, receivers=rec, senders=[(2, 0)])
    for bad in [(0, 3), (0, "attn"), 0]:
        with pytest.raises(ValueError, match=r"sender .* must be \(layer, head\) with layer in 0\.\.1"):
            path_patching_sweep(params, clean, corrupt, _metric, receivers=rec, senders=[bad])
    for bad in ["blocks.1.attn.z", "blocks.2.ln1", "resid_pre", "blocks.x.ln2"]:
        with pytest.raises(ValueError, match=r"receiver .* blocks\.\{i\}\.<attn\.q, attn\.k"):
            path_patching_sweep(params, clean, corrupt, _metric, receivers=bad)
    with pytest.raises(ValueError, match="only attn.q/k/v receivers take heads"):
        path_patching_sweep(params, clean, corrupt, _metric, receivers=Receiver(rec, heads=[0]))
    with pytest.raises(ValueError, match=r"heads \[3\] must be ints in 0\.\.2"):
        path_patching_sweep(params, clean, corrupt, _metric, receivers=Receiver("blocks.1.attn.q", heads=3))
    with pytest.raises(ValueError, match="receivers is empty"):
        path_patching_sweep(params, clean, corrupt, _metric, receivers=[])
    with pytest.raises(ValueError, match="memory_limit") as err:
        path_patching_sweep(params, clean, corrupt, _metric, receivers=rec, memory_limit=10)
    need = int(str(err.value).split("memory_limit >= ")[1].split()[0])
    torch.testing.assert_close(path_patching_sweep(params, clean, corrupt, _metric, receivers=rec,
                                                   memory_limit=2 * need),
                               path_patching_sweep(params, clean, corrupt, _metric, receivers=rec), **TOL)
    with pytest.raises(ValueError, match="chunk_size"):
        path_patching_sweep(params, clean, corrupt, _metric, receivers=rec, chunk_size=0)

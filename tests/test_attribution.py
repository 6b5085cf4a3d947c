"""Attribution patching (AtP), edge attribution patching (EAP) and EAP-IG against an independent reference: a
GPT-2 forward written here from the leaves, with a zero added at each named point and `torch.autograd.grad`; and
AtP against the exact patching sweeps it estimates."""

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import gpt2fn
from gpt2fn.study import (
    attribution_dims,
    attribution_patching,
    edge_attribution_patching,
    forward_with,
    head_patching_sweep,
    logit_diff,
    patching_sweep,
)


def _params(name: str = "tiny", seed: int = 0) -> gpt2fn.GPTParams:
    """Random weights with every bias and norm gain away from its initial value, so none can be dropped unseen."""
    p = gpt2fn.init_params(gpt2fn.preset(name), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return pytree.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g), p)


def _pair(vocab: int, batch: int = 2, seq: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, vocab, (batch,), generator=g)
    corrupt[:, 4] = torch.randint(0, vocab, (batch,), generator=g)
    return clean, corrupt


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logit_diff(logits, 5, 11).mean()


def reference(p: gpt2fn.GPTParams, ids: torch.Tensor, deltas: dict | None = None,
              embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GPT-2 from the leaves, adding `deltas[name]` at each named point; returns (logits, values). Names are
    gpt2fn's sites plus `blocks.{i}.mlp_in` (the stream as MLP i reads it) and `final_in` (as the final norm
    reads it), so that an addition there reaches only that reader."""
    cfg = p.config
    n_heads, d = cfg.n_heads, cfg.emb_dim
    hd = d // n_heads
    deltas = deltas or {}
    values: dict = {}

    def at(name: str, x: torch.Tensor) -> torch.Tensor:
        x = x + deltas[name] if name in deltas else x
        values[name] = x
        return x

    def ln(norm, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.ln_eps) * norm.scale + norm.shift

    seq = ids.shape[1]
    x = p.tok_emb[ids] + p.pos_emb[:seq] if embeds is None else embeds
    x = at("embed", x)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i, b in enumerate(p.blocks):
        x = at(f"blocks.{i}.resid_pre", x)
        qkv = []
        for j, n in enumerate("qkv"):
            xin = at(f"blocks.{i}.attn.{n}_input", x[:, None].expand(-1, n_heads, -1, -1))
            w = b.attn.w_qkv[:, j * d:(j + 1) * d].reshape(d, n_heads, hd)
            bias = b.attn.b_qkv[j * d:(j + 1) * d].reshape(n_heads, 1, hd)
            qkv.append(at(f"blocks.{i}.attn.{n}", torch.einsum("bhsm,mhe->bhse", ln(b.norm1, xin), w) + bias))
        q, k, v = qkv
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        pattern = at(f"blocks.{i}.attn.pattern", scores.softmax(-1))
        z = at(f"blocks.{i}.attn.z", pattern @ v)
        result = at(f"blocks.{i}.attn.result", torch.einsum("bhsd,hdm->bshm", z, b.attn.w_out.reshape(n_heads, hd, d)))
        mid = at(f"blocks.{i}.resid_mid", x + result.sum(2) + b.attn.b_out)
        h = at(f"blocks.{i}.ln2", ln(b.norm2, at(f"blocks.{i}.mlp_in", mid)))
        pre = at(f"blocks.{i}.mlp.pre", h @ b.mlp.w_fc + b.mlp.b_fc)
        post = at(f"blocks.{i}.mlp.post", F.gelu(pre, approximate="tanh"))
        out = at(f"blocks.{i}.mlp.out", post @ b.mlp.w_proj + b.mlp.b_proj)
        x = at(f"blocks.{i}.resid_post", mid + out)
    head = p.tok_emb.T if p.head is None else p.head
    return ln(p.final_norm, at("final_in", x)) @ head, values


def _ref_grads(p, ids, names, embeds=None):
    """d metric / d (a zero added at each name) on `ids`, and the values there."""
    with torch.no_grad():
        _, shapes = reference(p, ids, embeds=embeds)
    zeros = {n: torch.zeros_like(shapes[n], requires_grad=True) for n in names}
    logits, values = reference(p, ids, zeros, embeds=embeds)
    grads = torch.autograd.grad(metric(logits), [zeros[n] for n in names])
    return dict(zip(names, grads, strict=True)), values


SITES = ["blocks.0.resid_pre", "blocks.1.resid_mid", "blocks.1.attn.z", "blocks.0.attn.result", "blocks.1.mlp.post",
         "blocks.0.attn.pattern", "blocks.1.attn.k_input", "blocks.0.mlp.out", "blocks.1.attn.v"]


def test_attribution_patching_equals_gradient_times_difference_of_an_independent_forward():
    p = _params()
    clean, corrupt = _pair(p.config.vocab_size)
    got = attribution_patching(p, clean, corrupt, metric, SITES)
    grads, corrupt_vals = _ref_grads(p, corrupt, SITES)
    _, clean_vals = reference(p, clean)
    for s in SITES:
        product = grads[s] * (clean_vals[s] - corrupt_vals[s]).detach()
        want = product if s.endswith(("mlp.post", "attn.pattern")) else product.sum(-1)
        assert got[s].shape == want.shape, s
        assert len(attribution_dims(s).split()) == want.ndim
        torch.testing.assert_close(got[s], want, atol=1e-7, rtol=1e-4, msg=s)
    assert got["blocks.0.resid_pre"].abs()[:, [2, 4]].min() > 0  # the swapped tokens carry attribution
    assert torch.equal(got["blocks.0.resid_pre"][:, [0, 1, 3]], torch.zeros(2, 3))  # the same tokens carry none


def test_attribution_patching_with_steps_integrates_gradients_along_the_embeddings():
    p = _params()
    clean, corrupt = _pair(p.config.vocab_size)
    steps = 4
    sites = ["blocks.0.resid_pre", "blocks.1.attn.z"]
    got = attribution_patching(p, clean, corrupt, metric, sites, steps=steps)
    with torch.no_grad():
        e_clean, e_corrupt = reference(p, clean)[1]["embed"], reference(p, corrupt)[1]["embed"]
    mean = {s: 0.0 for s in sites}
    for k in range(steps):
        g, _ = _ref_grads(p, corrupt, sites, embeds=e_corrupt + k / steps * (e_clean - e_corrupt))
        mean = {s: mean[s] + g[s] / steps for s in sites}
    _, clean_vals = reference(p, clean)
    _, corrupt_vals = reference(p, corrupt)
    for s in sites:
        torch.testing.assert_close(got[s], (mean[s] * (clean_vals[s] - corrupt_vals[s])).sum(-1).detach(),
                                   atol=1e-7, rtol=1e-4, msg=s)


def _ref_edges(p, clean, corrupt, steps=None):
    cfg = p.config
    n, h = cfg.n_layers, cfg.n_heads
    inputs = [f"blocks.{i}.attn.{q}_input" for i in range(n) for q in "qkv"] + [
        f"blocks.{i}.mlp_in" for i in range(n)] + ["final_in"]
    with torch.no_grad():
        _, cv = reference(p, clean)
        _, xv = reference(p, corrupt)
    if steps is None:
        grads, _ = _ref_grads(p, corrupt, inputs)
    else:
        grads = {s: 0.0 for s in inputs}
        for k in range(steps):
            g, _ = _ref_grads(p, corrupt, inputs, embeds=xv["embed"] + k / steps * (cv["embed"] - xv["embed"]))
            grads = {s: grads[s] + g[s] / steps for s in inputs}
    sent = {"input": cv["embed"] - xv["embed"]}
    for i in range(n):
        for j in range(h):
            sent[f"a{i}.h{j}"] = (cv[f"blocks.{i}.attn.result"] - xv[f"blocks.{i}.attn.result"])[:, :, j]
        sent[f"m{i}"] = cv[f"blocks.{i}.mlp.out"] - xv[f"blocks.{i}.mlp.out"]
    read = {"logits": grads["final_in"]}
    for i in range(n):
        for q in "qkv":
            for j in range(h):
                read[f"a{i}.h{j}<{q}>"] = grads[f"blocks.{i}.attn.{q}_input"][:, j]
        read[f"m{i}"] = grads[f"blocks.{i}.mlp_in"]
    return sent, read


def _layer(name: str) -> tuple[int, int]:
    """(layer, 0 for a head / 1 for an MLP) of a node name; input is before everything, logits after."""
    if name == "input":
        return (-1, 1)
    if name == "logits":
        return (10**6, 0)
    return (int(name[1:].split(".")[0]), 0 if name.startswith("a") else 1)


@pytest.mark.parametrize("steps", [None, 3])
def test_edge_attribution_patching_scores_every_edge_as_an_independent_reference_does(steps):
    p = _params()
    clean, corrupt = _pair(p.config.vocab_size)
    got = edge_attribution_patching(p, clean, corrupt, metric, steps=steps)
    sent, read = _ref_edges(p, clean, corrupt, steps)
    assert set(got.senders) == set(sent) and set(got.receivers) == set(read)
    n_valid = 0
    for i, s in enumerate(got.senders):
        for j, r in enumerate(got.receivers):
            sl, rl = _layer(s), _layer(r)
            reaches = sl[0] < rl[0] or (sl[0] == rl[0] and sl[1] < rl[1])  # a head reaches its layer's MLP
            assert bool(got.valid[i, j]) == reaches, (s, r)
            want = (sent[s] * read[r]).sum((1, 2)).detach() if reaches else torch.zeros(2)
            torch.testing.assert_close(got.scores[:, i, j], want, atol=1e-7, rtol=1e-4, msg=f"{s} -> {r}")
            n_valid += reaches
    assert n_valid > 0 and got.scores.abs().max() > 0


def test_eap_ig_with_one_step_is_eap_and_top_lists_the_largest_edges():
    p = _params()
    clean, corrupt = _pair(p.config.vocab_size)
    plain = edge_attribution_patching(p, clean, corrupt, metric)
    one = edge_attribution_patching(p, clean, corrupt, metric, steps=1)
    torch.testing.assert_close(one.scores, plain.scores)
    top = plain.top(3)
    assert [abs(t[2]) for t in top] == sorted((abs(t[2]) for t in top), reverse=True)
    assert abs(top[0][2]) == pytest.approx(float(plain.total().abs().max()))


def test_atp_correlates_with_exact_patching_on_a_small_model():
    """The numbers quoted in gpt2fn.study.attribution: per head and (with integrated gradients) per residual
    position, AtP ranks components as activation patching does; plain AtP misjudges the swapped token's embedding."""
    p = gpt2fn.init_params(gpt2fn.preset("mini"), seed=0)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, 10), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, 1000, (2,), generator=g)
    n = p.config.n_layers
    with torch.no_grad():
        base = metric(forward_with(p, corrupt)[0])

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    heads = head_patching_sweep(p, clean, corrupt, metric) - base
    atp = attribution_patching(p, clean, corrupt, metric, ["blocks.*.attn.z", "blocks.*.resid_pre"])
    assert corr(heads, torch.stack([atp[f"blocks.{i}.attn.z"].sum((0, 2)) for i in range(n)])) > 0.99
    resid = patching_sweep(p, clean, corrupt, metric) - base
    plain = torch.stack([atp[f"blocks.{i}.resid_pre"].sum(0) for i in range(n)])
    ig = attribution_patching(p, clean, corrupt, metric, "blocks.*.resid_pre", steps=10)
    integrated = torch.stack([ig[f"blocks.{i}.resid_pre"].sum(0) for i in range(n)])
    assert corr(resid, integrated) > 0.99
    assert corr(resid, integrated) >= corr(resid, plain)
    # the swapped token's embedding (layer 0, position 2): integrated gradients get closer than first order
    assert abs(integrated[0, 2] - resid[0, 2]) < abs(plain[0, 2] - resid[0, 2])


def test_attribution_refuses_bad_arguments_by_name():
    p = _params()
    clean, corrupt = _pair(p.config.vocab_size)
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(p, clean, corrupt[:, :-1], metric, "blocks.0.resid_pre")
    with pytest.raises(ValueError, match="steps"):
        edge_attribution_patching(p, clean, corrupt, metric, steps=0)
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(p, clean, corrupt, lambda lg: logit_diff(lg, 5, 11), "blocks.0.resid_pre")
    with pytest.raises(ValueError, match="no site matches"):
        attribution_patching(p, clean, corrupt, metric, "blocks.9.resid_pre")

"""Study at TransformerLens depth: per-head q/k/v input sites, the final norm's parts, running part of the model
(`start_at_layer`/`stop_at_layer`), and the residual-stream decompositions of `gpt2fn.study.decompose`, each
against its definition computed another way."""

import pytest
import torch
import torch.utils._pytree as pytree

import gpt2fn
from gpt2fn.study import (
    DECOMPOSE_SITES,
    Components,
    accumulated_resid,
    apply_ln_to_stack,
    attn_weights,
    decompose_logit,
    decompose_resid,
    forward_with,
    logit_attribution,
    logit_lens,
    patch,
    run_for_decompose,
    run_with_capture,
    site_grads,
    stack_head_results,
    stack_neuron_results,
)

BATCH, SEQ = 5, 7  # distinct from the tiny config's sizes (d_model 24, 3 heads of 8, d_mlp 96, 2 layers)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def params(tiny_config, device):
    """Every leaf moved off its initial value, so norm gains/shifts and biases are all non-trivial."""
    p = gpt2fn.init_params(tiny_config, seed=0, device=device)
    g = torch.Generator().manual_seed(1)
    return pytree.tree_map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g).to(t), p)


def _ids(cfg, device, seed=3, batch=BATCH, seq=SEQ):
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.fixture
def ids(params, device):
    return _ids(params.config, device)


@pytest.fixture
def run(params, ids):
    return run_for_decompose(params, ids)


def _stream(acts, cfg, layer, mlp_input=False):
    if mlp_input:
        return acts[f"blocks.{layer}.resid_mid"]
    return acts[f"blocks.{layer}.resid_pre"] if layer < cfg.n_layers else acts[f"blocks.{cfg.n_layers - 1}.resid_post"]


POINTS = [(0, False), (0, True), (1, False), (1, True), (2, False)]  # every point of the 2-layer tiny model


# --------------------------------------------------------------------------------------------------------------
# Sites: each head's q/k/v input, the final norm's parts


def test_head_inputs_and_final_norm_parts_match_their_definitions_and_change_no_logits(params, ids):
    cfg = params.config
    sites = [f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in ("resid_pre", "attn.q_input", "attn.k_input",
                                                                       "attn.v_input")]
    sites += [f"blocks.{cfg.n_layers - 1}.resid_post", "final_norm.scale", "final_norm.normalized", "final_norm"]
    logits, acts = run_with_capture(params, ids, sites)
    assert torch.equal(logits, gpt2fn.forward(params, ids))  # reading them changes no bits
    assert list(acts) == sites  # the order a forward meets them
    for i in range(cfg.n_layers):
        for n in "qkv":
            x = acts[f"blocks.{i}.attn.{n}_input"]
            assert x.shape == (BATCH, cfg.n_heads, SEQ, cfg.emb_dim)
            for h in range(cfg.n_heads):  # every head reads the residual stream entering the block
                assert torch.equal(x[:, h], acts[f"blocks.{i}.resid_pre"])
    x = acts[f"blocks.{cfg.n_layers - 1}.resid_post"].double()
    scale = (x.var(-1, unbiased=False, keepdim=True) + cfg.ln_eps).sqrt()
    assert acts["final_norm.scale"].shape == (BATCH, SEQ, 1)
    torch.testing.assert_close(acts["final_norm.scale"].double(), scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(acts["final_norm.normalized"].double(), (x - x.mean(-1, keepdim=True)) / scale,
                               rtol=1e-5, atol=1e-6)
    fn = params.final_norm
    torch.testing.assert_close(acts["final_norm.normalized"] * fn.scale + fn.shift, acts["final_norm"], **TOL)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_editing_one_heads_input_changes_only_that_heads_projection(params, ids, which):
    cfg = params.config
    layer, head = 1, 2
    other = torch.randn(BATCH, SEQ, cfg.emb_dim, generator=torch.Generator().manual_seed(9)).to(ids.device)
    names = [f"blocks.{layer}.attn.{n}" for n in "qkv"]
    logits, clean = run_with_capture(params, ids, names)
    edited, acts = forward_with(params, ids, capture=names, edit={
        f"blocks.{layer}.attn.{which}_input": patch(other[:, None], heads=head)})
    w = attn_weights(params, layer)
    W, b = {"q": (w.W_Q, w.b_Q), "k": (w.W_K, w.b_K), "v": (w.W_V, w.b_V)}[which]
    # that head now reads the other stream, through ln1 on its own and its own columns of w_qkv
    normed = gpt2fn.layer_norm(params.blocks[layer].norm1, other, eps=cfg.ln_eps)
    torch.testing.assert_close(acts[f"blocks.{layer}.attn.{which}"][:, head], normed @ W[head] + b[head], **TOL)
    for n in "qkv":  # every other head, and the other two projections, keep their exact bits
        for h in range(cfg.n_heads):
            if (n, h) != (which, head):
                assert torch.equal(acts[f"blocks.{layer}.attn.{n}"][:, h], clean[f"blocks.{layer}.attn.{n}"][:, h])
    assert not torch.allclose(edited, logits)


def test_editing_every_heads_q_k_v_input_alike_is_editing_ln1(params, ids):
    cfg = params.config
    other = torch.randn(BATCH, SEQ, cfg.emb_dim, generator=torch.Generator().manual_seed(10)).to(ids.device)
    per_head, _ = forward_with(params, ids, edit={f"blocks.0.attn.{n}_input": patch(other[:, None]) for n in "qkv"})
    normed = gpt2fn.layer_norm(params.blocks[0].norm1, other, eps=cfg.ln_eps)
    whole, _ = forward_with(params, ids, edit={"blocks.0.ln1": patch(normed)})
    torch.testing.assert_close(per_head, whole, **TOL)


def test_gradient_wrt_one_heads_key_input_matches_finite_differences(tiny_config, device):
    if device.type == "mps":
        pytest.skip("finite differences need float64, which MPS lacks")
    params = gpt2fn.init_params(tiny_config, seed=0, device=device, dtype=torch.float64)
    ids = _ids(tiny_config, device, batch=2)
    site = "blocks.1.attn.k_input"

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 4]).sum()

    g = site_grads(params, ids, [site], metric)[site]
    assert g.shape == (2, tiny_config.n_heads, SEQ, tiny_config.emb_dim)
    direction = torch.randn(g.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
    direction[:, 0] = 0  # heads 1 and 2 only

    def at(t):
        return metric(forward_with(params, ids, edit={site: lambda x: x + t * direction})[0])

    numeric = (at(1e-6) - at(-1e-6)) / 2e-6
    torch.testing.assert_close((g * direction).sum(), numeric, rtol=1e-5, atol=1e-8)
    assert g[:, 1:].abs().sum() > 0


def test_an_edited_head_input_decodes_like_the_full_forward(params, ids):
    cfg = params.config
    edit = {"blocks.1.attn.k_input": patch(0.0, heads=1), "final_norm.scale": lambda s: 2 * s}
    full, _ = forward_with(params, ids, edit=edit)
    cache = gpt2fn.init_cache(cfg, BATCH, SEQ, device=ids.device)
    (prefill, cache), _ = forward_with(params, ids[:, :4], edit=edit, cache=cache)
    (step, _), _ = forward_with(params, ids[:, 4:], edit=edit, cache=cache)
    torch.testing.assert_close(torch.cat([prefill, step], 1), full, **TOL)
    assert not torch.allclose(full, gpt2fn.forward(params, ids))


# --------------------------------------------------------------------------------------------------------------
# Running part of the model


def test_splitting_a_forward_at_any_layer_gives_its_logits(params, ids):
    cfg, n = params.config, params.config.n_layers
    full, acts = run_with_capture(params, ids, ["blocks.*.resid_pre", f"blocks.{n - 1}.resid_post"])
    for layer in range(n + 1):
        x = gpt2fn.forward(params, ids, stop_at_layer=layer)
        assert torch.equal(x, _stream(acts, cfg, layer))  # the stream entering block `layer`
        assert torch.equal(gpt2fn.forward(params, x, start_at_layer=layer), full)
        assert torch.equal(gpt2fn.forward(params, x, start_at_layer=layer, stop_at_layer=layer), x)
    # negative layers count from the end; a middle part alone maps one stream to the next
    x0 = gpt2fn.forward(params, ids, stop_at_layer=0)
    assert torch.equal(gpt2fn.forward(params, x0, start_at_layer=0, stop_at_layer=-1), acts["blocks.1.resid_pre"])
    assert torch.equal(gpt2fn.forward(params, acts["blocks.1.resid_pre"], start_at_layer=-1), full)


def test_a_part_run_captures_and_edits_like_the_full_run(params, ids):
    site = "blocks.1.attn.z"
    edit = {site: lambda z: z * 0.5, "blocks.1.attn.q_input": patch(0.0, heads=0)}
    full, full_acts = forward_with(params, ids, capture=[site, "blocks.1.mlp.out"], edit=edit)
    x, first = forward_with(params, ids, stop_at_layer=1, capture="blocks.*.resid_pre")
    assert list(first) == ["blocks.0.resid_pre"]  # block 1 never ran
    part, acts = forward_with(params, x, start_at_layer=1, capture=[site, "blocks.1.mlp.out"], edit=edit)
    assert torch.equal(part, full)
    for s in (site, "blocks.1.mlp.out"):
        assert torch.equal(acts[s], full_acts[s])
    # with left padding the part still hides padded keys
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :2] = False
    padded = gpt2fn.forward(params, ids, pad_mask=mask)
    x = gpt2fn.forward(params, ids, pad_mask=mask, stop_at_layer=1)
    torch.testing.assert_close(gpt2fn.forward(params, x, start_at_layer=1, pad_mask=mask), padded, rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "make", "error", "message"), [
    (dict(start_at_layer=3), "resid", ValueError, r"start_at_layer must be None or an int in 0\.\.2 .*got 3"),
    (dict(stop_at_layer=-3), "ids", ValueError, r"stop_at_layer must be None or an int in 0\.\.2 .*-2\.\.-1.*-3"),
    (dict(start_at_layer=True), "resid", ValueError, r"start_at_layer .*got True"),
    (dict(start_at_layer=2, stop_at_layer=1), "resid", ValueError, r"start_at_layer=2 .*after stop_at_layer=1"),
    (dict(start_at_layer=1), "ids", ValueError, r"start_at_layer=1 the input is the residual stream.*token ids"),
    (dict(start_at_layer=1), "narrow", ValueError, r"\[batch, seq, d_model=24\].*got shape \[5, 7, 5\]"),
    (dict(start_at_layer=1), "list", TypeError, r"start_at_layer=1 .*torch\.Tensor.*got list"),
    (dict(), "resid", ValueError, r"ids must be \[batch, seq\].*start_at_layer=L"),
    (dict(stop_at_layer=1, last_only=True), "ids", ValueError, r"last_only .*stop_at_layer"),
    (dict(start_at_layer=1, positions="arange"), "resid", ValueError, r"positions .*start_at_layer"),
    (dict(start_at_layer=1, cache="cache"), "resid", ValueError, r"do not combine with cache="),
])
def test_bad_partial_runs_raise_one_documented_error(params, ids, kwargs, make, error, message):
    cfg = params.config
    x = {"ids": ids, "resid": torch.zeros(BATCH, SEQ, cfg.emb_dim, device=ids.device),
         "narrow": torch.zeros(BATCH, SEQ, 5, device=ids.device), "list": [[0.0] * cfg.emb_dim]}[make]
    if kwargs.get("positions") == "arange":
        kwargs = {**kwargs, "positions": torch.arange(SEQ, device=ids.device).expand(BATCH, SEQ)}
    if kwargs.get("cache") == "cache":
        kwargs = {**kwargs, "cache": gpt2fn.init_cache(cfg, BATCH, device=ids.device)}
    with gpt2fn.shape_checks(False), pytest.raises(error, match=message):  # our own checks, whatever the switch
        gpt2fn.forward(params, x, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Decompositions sum to the stream


@pytest.mark.parametrize(("layer", "mlp_input"), POINTS)
def test_decompositions_sum_to_the_stream_at_every_point(params, run, layer, mlp_input):
    cfg = params.config
    _, acts = run
    stream = _stream(acts, cfg, layer, mlp_input)
    plain = decompose_resid(params, acts, layer, mlp_input=mlp_input)
    torch.testing.assert_close(plain.total(), stream, **TOL)
    attn_layers = layer + 1 if mlp_input else layer
    assert plain.labels == ("embed.tok", "embed.pos", *[
        f"blocks.{i}.{s}" for i in range(attn_layers) for s in ("attn.out", "mlp.out") if s == "attn.out" or i < layer])
    assert plain.stack.shape == (len(plain), BATCH, SEQ, cfg.emb_dim)
    # every granularity is a decomposition of the same stream
    for options in (dict(heads=True), dict(neurons=True), dict(split_biases=True), dict(heads=True, neurons=[3, 50]),
                    dict(neurons={0: [1, 2]})):
        parts = decompose_resid(params, acts, layer, mlp_input=mlp_input, **options)
        torch.testing.assert_close(parts.total(), stream, **TOL, msg=str(options))
    # the modes split the stream between the embeddings, attention and MLPs
    if layer > 0:
        attn = decompose_resid(params, acts, layer, mlp_input=mlp_input, mode="attn", incl_embeds=False)
        mlp = decompose_resid(params, acts, layer, mlp_input=mlp_input, mode="mlp")
        torch.testing.assert_close(attn.total() + mlp.total(), stream, **TOL)
        assert all(".attn" in label for label in attn.labels) and not any(".attn" in label for label in mlp.labels)


def test_the_decomposition_components_are_the_captured_writes(params, run):
    cfg = params.config
    _, acts = run
    parts = decompose_resid(params, acts, heads=True, neurons=True).named()
    assert torch.equal(parts["embed.tok"], acts["embed.tok"])
    assert torch.equal(parts["embed.pos"], acts["embed.pos"].expand(BATCH, SEQ, cfg.emb_dim))
    hd = cfg.head_dim
    for i, bp in enumerate(params.blocks):
        z, post = acts[f"blocks.{i}.attn.z"], acts[f"blocks.{i}.mlp.post"]
        for h in range(cfg.n_heads):
            torch.testing.assert_close(parts[f"blocks.{i}.attn.head{h}"], z[:, h] @ bp.attn.w_out[h * hd:(h + 1) * hd],
                                       **TOL)
        for n in (0, 41, cfg.d_mlp - 1):
            torch.testing.assert_close(parts[f"blocks.{i}.mlp.neuron{n}"], post[..., n, None] * bp.mlp.w_proj[n], **TOL)
        assert torch.equal(parts[f"blocks.{i}.attn.bias"], bp.attn.b_out.expand(BATCH, SEQ, -1))
        assert f"blocks.{i}.mlp.rest" not in parts  # every neuron is its own component
    some = decompose_resid(params, acts, neurons=[5, 5, -1]).named()  # repeats count once
    assert [k for k in some if k.startswith("blocks.0.mlp")] == [
        "blocks.0.mlp.neuron5", f"blocks.0.mlp.neuron{cfg.d_mlp - 1}", "blocks.0.mlp.rest", "blocks.0.mlp.bias"]
    post, w = acts["blocks.0.mlp.post"], params.blocks[0].mlp.w_proj
    torch.testing.assert_close(some["blocks.0.mlp.rest"], post[..., :5] @ w[:5] + post[..., 6:-1] @ w[6:-1], **TOL)


def test_accumulated_resid_stacks_the_captured_streams(params, run, ids):
    cfg, n = params.config, params.config.n_layers
    _, acts = run
    acc = accumulated_resid(params, acts)
    assert acc.labels == ("blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post")
    for label, value in acc.named().items():
        assert torch.equal(value, acts[label])
    mid = accumulated_resid(params, acts, 1, incl_mid=True)
    assert mid.labels == ("blocks.0.resid_pre", "blocks.0.resid_mid", "blocks.1.resid_pre")
    assert accumulated_resid(params, acts, 1, mlp_input=True).labels == (
        "blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_mid")
    assert accumulated_resid(params, acts, -1).labels == acc.labels  # -1: after the last block, as None
    some = accumulated_resid(params, acts, pos=[-1, 2])
    assert torch.equal(some.stack, acc.stack[:, :, [SEQ - 1, 2]]) and some.pos == (SEQ - 1, 2)
    one = accumulated_resid(params, acts, pos=-1)
    assert torch.equal(one.stack, acc.stack[:, :, -1]) and one.stack.shape == (n + 1, BATCH, cfg.emb_dim)
    assert torch.equal(accumulated_resid(params, acts, pos=slice(1, 4)).stack, acc.stack[:, :, 1:4])
    # with apply_ln, each row is its own norm's normalized value; the frozen scale of one point is apply_ln_to_stack
    mid = accumulated_resid(params, acts, incl_mid=True)
    normed = accumulated_resid(params, acts, incl_mid=True, apply_ln=True)
    assert normed.space == "normalized" and normed.labels == mid.labels
    x = mid.stack.double()
    own = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + cfg.ln_eps).sqrt()
    torch.testing.assert_close(normed.stack.double(), own, rtol=1e-5, atol=1e-5)
    _, norms = run_with_capture(params, ids, ["blocks.1.ln2.normalized", "final_norm.normalized"])
    torch.testing.assert_close(normed.named()["blocks.1.resid_mid"], norms["blocks.1.ln2.normalized"], **TOL)
    torch.testing.assert_close(normed.named()["blocks.1.resid_post"], norms["final_norm.normalized"], **TOL)
    frozen = apply_ln_to_stack(params, acc, acts)
    torch.testing.assert_close(frozen.stack, (acc.stack - acc.stack.mean(-1, keepdim=True))
                               / acts["final_norm.scale"], **TOL)
    # a capture of `embed` and the `resid_post`s (the logit lens's) serves as well
    _, lens_acts = run_with_capture(params, torch.zeros(BATCH, SEQ, dtype=torch.long, device=x.device),
                                    ["embed", "blocks.*.resid_post"])
    assert accumulated_resid(params, lens_acts).stack.shape == acc.stack.shape


def test_head_and_neuron_stacks_sum_to_the_outputs_and_with_the_remainder_to_the_stream(params, run, ids):
    cfg = params.config
    _, acts = run
    heads = stack_head_results(params, acts, incl_biases=True)
    assert len(heads) == cfg.n_layers * (cfg.n_heads + 1)
    per_layer = heads.stack.view(cfg.n_layers, cfg.n_heads + 1, BATCH, SEQ, cfg.emb_dim)
    neurons = stack_neuron_results(params, acts, incl_biases=True)
    assert neurons.labels[:2] == ("blocks.0.mlp.neuron0", "blocks.0.mlp.neuron1")
    per_mlp = neurons.stack.view(cfg.n_layers, cfg.d_mlp + 1, BATCH, SEQ, cfg.emb_dim)
    for i in range(cfg.n_layers):
        torch.testing.assert_close(per_layer[i].sum(0), acts[f"blocks.{i}.attn.out"], **TOL)
        torch.testing.assert_close(per_mlp[i].sum(0), acts[f"blocks.{i}.mlp.out"], **TOL)
    # attn.result, where captured, is used as is and agrees with the heads computed from z
    _, res = run_with_capture(params, ids, ["blocks.*.attn.result", "blocks.*.resid_pre", "blocks.*.resid_mid"])
    torch.testing.assert_close(stack_head_results(params, res).stack, stack_head_results(params, acts).stack, **TOL)
    for layer, mlp_input in POINTS:
        stream = _stream(acts, cfg, layer, mlp_input)
        if layer > 0 or mlp_input:
            h = stack_head_results(params, acts, layer, mlp_input=mlp_input, incl_remainder=True)
            assert h.labels[-1] == "remainder"
            torch.testing.assert_close(h.total(), stream, **TOL)
        if layer > 0:
            nr = stack_neuron_results(params, acts, layer, mlp_input=mlp_input, incl_remainder=True)
            torch.testing.assert_close(nr.total(), stream, **TOL)
    chosen = stack_neuron_results(params, acts, neurons={1: [5, -1]}, pos=-1)
    assert chosen.labels == ("blocks.1.mlp.neuron5", f"blocks.1.mlp.neuron{cfg.d_mlp - 1}")
    torch.testing.assert_close(chosen.stack[1], acts["blocks.1.mlp.post"][:, -1, -1:] * params.blocks[1].mlp.w_proj[-1],
                               **TOL)


# --------------------------------------------------------------------------------------------------------------
# Through the layer norm and the unembedding


@pytest.mark.parametrize(("layer", "mlp_input"), POINTS)
def test_the_frozen_norm_of_a_decomposition_sums_to_the_norms_normalized_value_and_output(params, ids, layer,
                                                                                          mlp_input):
    cfg = params.config
    norm = "final_norm" if layer == cfg.n_layers else f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}"
    _, acts = forward_with(params, ids, capture=[*DECOMPOSE_SITES, f"{norm}.normalized", norm])
    parts = decompose_resid(params, acts, layer, mlp_input=mlp_input, heads=True, neurons=[0, 7])
    normed = apply_ln_to_stack(params, parts, acts)
    assert normed.space == "normalized" and normed.norm == norm and normed.labels == parts.labels
    torch.testing.assert_close(normed.total(), acts[f"{norm}.normalized"], **TOL)
    p = params.final_norm if norm == "final_norm" else getattr(params.blocks[layer], "norm2" if mlp_input else "norm1")
    torch.testing.assert_close(normed.total() * p.scale + p.shift, acts[norm], **TOL)  # the gain, then the shift
    assert torch.allclose(normed.stack.mean(-1), torch.zeros(()), atol=1e-6)  # each component centred
    # the same from apply_ln=True, from a tensor stack with the point named, and without the captured scale
    assert torch.equal(decompose_resid(params, acts, layer, mlp_input=mlp_input, heads=True, neurons=[0, 7],
                                       apply_ln=True).stack, normed.stack)
    assert torch.equal(apply_ln_to_stack(params, parts.stack, acts, layer, mlp_input=mlp_input), normed.stack)
    no_scale = {k: v for k, v in acts.items() if not k.endswith(".scale")}
    torch.testing.assert_close(apply_ln_to_stack(params, parts, no_scale).stack, normed.stack, **TOL)
    last = apply_ln_to_stack(params, parts.stack[:, :, -1], acts, layer, mlp_input=mlp_input, pos=-1)
    torch.testing.assert_close(last, normed.stack[:, :, -1], **TOL)


def test_neuron_logit_attribution_sums_to_the_logit_difference_and_chunks_change_nothing(params, run, ids):
    cfg = params.config
    logits, acts = run
    good, bad = 11, 40
    want = logits[:, -1, good] - logits[:, -1, bad]
    fine = decompose_logit(params, acts, good, bad, heads=True, neurons=True, chunk_size=10)
    assert fine.space == "logit" and fine.labels[-1] == "final_norm.shift"
    assert fine.stack.shape == (len(fine), BATCH)
    torch.testing.assert_close(fine.total(), want, rtol=1e-4, atol=1e-4)
    whole = decompose_logit(params, acts, good, bad, heads=True, neurons=True, chunk_size=cfg.d_mlp)
    assert whole.labels == fine.labels
    torch.testing.assert_close(whole.stack, fine.stack, **TOL)
    # = the stack route: decompose, freeze the norm, attribute; plus the shift term
    stack = decompose_resid(params, acts, heads=True, neurons=True, pos=-1, apply_ln=True)
    via = logit_attribution(params, stack, good, bad)
    torch.testing.assert_close(via.stack, fine.stack[:-1], **TOL)
    w_u = params.tok_emb.T
    torch.testing.assert_close(fine.stack[-1], (w_u[:, good] - w_u[:, bad]) @ params.final_norm.shift
                               .expand(BATCH, -1).T, **TOL)
    # a neuron's share by hand: its write, centred, over the frozen scale, through gamma and the unembedding
    i, n = 1, 17
    write = acts[f"blocks.{i}.mlp.post"][:, -1, n, None] * params.blocks[i].mlp.w_proj[n]
    by_hand = ((write - write.mean(-1, keepdim=True)) / acts["final_norm.scale"][:, -1] * params.final_norm.scale
               ) @ (w_u[:, good] - w_u[:, bad])
    torch.testing.assert_close(fine.named()[f"blocks.{i}.mlp.neuron{n}"], by_hand, **TOL)
    # the neurons of an MLP plus its bias share are the MLP's share (direct_logit_attribution's `mlp` + `mlp_bias`)
    dla = gpt2fn.direct_logit_attribution(params, ids, good, bad)
    named = fine.named()
    mlp_share = sum(named[f"blocks.{i}.mlp.neuron{k}"] for k in range(cfg.d_mlp)) + named[f"blocks.{i}.mlp.bias"]
    torch.testing.assert_close(mlp_share, dla.mlp[:, i] + dla.mlp_bias[:, i], rtol=1e-4, atol=1e-5)


def test_logit_attribution_at_an_earlier_point_is_the_logit_lens_there(params, run, ids):
    _, acts = run
    lens = logit_lens(params, ids)  # rows: embed (= resid_pre 0), then each block's resid_post
    tokens = torch.tensor([3, 9, 27, 81, 4], device=ids.device)  # one per example
    for layer in range(params.config.n_layers + 1):
        shares = decompose_logit(params, acts, tokens, layer=layer, pos=[1, -1])
        torch.testing.assert_close(shares.total(), lens[layer][:, [1, SEQ - 1]].gather(-1, tokens[:, None, None]
                                   .expand(-1, 2, 1))[..., 0], rtol=1e-4, atol=1e-4)
    per_position = torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(2)).to(ids.device)
    everywhere = decompose_logit(params, acts, per_position, pos=None)
    torch.testing.assert_close(everywhere.total(), lens[-1].gather(-1, per_position[..., None])[..., 0],
                               rtol=1e-4, atol=1e-4)


def test_components_are_a_pytree_of_the_stack_alone(params, run):
    _, acts = run
    parts = decompose_resid(params, acts, pos=-1)
    leaves, spec = pytree.tree_flatten(parts)
    assert len(leaves) == 1 and leaves[0] is parts.stack
    doubled = pytree.tree_map(lambda t: 2 * t, parts)
    assert isinstance(doubled, Components) and doubled.labels == parts.labels and doubled.norm == "final_norm"
    assert torch.equal(doubled.stack, 2 * parts.stack)
    assert "read by final_norm" in repr(parts)


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_decomposition_input_raises_errors_that_name_it(params, run):
    _, acts = run
    with pytest.raises(ValueError, match=r"mode must be one of 'all', 'attn', 'mlp'; got 'heads'"):
        decompose_resid(params, acts, mode="heads")
    with pytest.raises(ValueError, match=r"layer must be None or an int in 0\.\.2 .*got 3"):
        accumulated_resid(params, acts, 3)
    with pytest.raises(ValueError, match=r"layer must be .*got -4"):
        stack_head_results(params, acts, -4)
    with pytest.raises(ValueError, match=r"mlp_input=True .*0\.\.1; got 2"):
        decompose_resid(params, acts, mlp_input=True)
    no_mlp = {k: v for k, v in acts.items() if "mlp" not in k}
    with pytest.raises(ValueError, match=r"decompose_resid needs site 'blocks.0.mlp.out'.*run_for_decompose"):
        decompose_resid(params, no_mlp)
    with pytest.raises(ValueError, match=r"stack_neuron_results needs site 'blocks.0.mlp.post'.*capture"):
        stack_neuron_results(params, no_mlp)
    bare = {k: v for k, v in acts.items() if k.startswith("embed")}
    with pytest.raises(ValueError, match=r"needs site 'final_norm.scale' \(or 'blocks.1.resid_post'\)"):
        apply_ln_to_stack(params, decompose_resid(params, bare, 0).stack, bare)
    with pytest.raises(ValueError, match=r"pos \[7\] out of range for seq = 7"):
        decompose_resid(params, acts, pos=7)
    with pytest.raises(ValueError, match=r"neurons \[96\] out of range.*d_mlp = 96"):
        stack_neuron_results(params, acts, neurons=[96])
    with pytest.raises(ValueError, match=r"neurons maps layers \[5\]"):
        decompose_resid(params, acts, neurons={5: [0]})
    normed = decompose_resid(params, acts, apply_ln=True, pos=-1)
    with pytest.raises(ValueError, match=r"already 'normalized'"):
        apply_ln_to_stack(params, normed, acts)
    with pytest.raises(ValueError, match=r"normalise it first"):
        logit_attribution(params, decompose_resid(params, acts, pos=-1), 1)
    with pytest.raises(ValueError, match=r"tokens of shape \[3\] do not match.*\[5\]"):
        logit_attribution(params, normed, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"tokens hold token id 97, outside this model's vocabulary \[0, 97\)"):
        logit_attribution(params, normed, 97)
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1"):
        decompose_logit(params, acts, 1, chunk_size=0)
    with pytest.raises(TypeError, match=r"acts must be the Activations"):
        decompose_resid(params, torch.zeros(3))
    with pytest.raises(ValueError, match=r"nothing to stack"):
        decompose_resid(params, acts, 0, incl_embeds=False)

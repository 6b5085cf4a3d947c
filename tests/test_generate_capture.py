"""Activations while generating (`generate(..., capture=)`, `generate_tokens(..., capture=)`): each site stacked
along its sequence axis equals `forward_with` on the final ids at every position, with left padding, with edits,
with rows that stop at EOS; and compiled edited runs (`generate(..., compile=True, edit=)`, `torch.compile` of
`forward_with` with edits): one graph without breaks, the eager tokens and values."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import generate_tokens
from gpt2fn.model import left_pad
from gpt2fn.study import ablate_head, forward_with, patch, steer
from gpt2fn.tokenizer import encode

SITES = ["embed.pos", "blocks.*.resid_post", "blocks.0.attn.pattern", "blocks.1.attn.scores", "blocks.1.attn.result",
         "blocks.0.mlp.post", "blocks.1.attn.q_input", "blocks.0.ln1.scale", "final_norm", "logits"]


EDITS = {
    "none": lambda: None,
    "steer": lambda: {"blocks.0.resid_post": steer(torch.linspace(-3, 3, 24), scale=2.0)},
    "ablate a head": lambda: {"blocks.1.attn.z": ablate_head(2)},
    "patch mlp.post": lambda: {"blocks.0.mlp.post": patch(0.25)},
}


def _full_mask(mask, ids):
    """The prompt's pad mask followed by True for every new token."""
    if mask is None:
        return None
    return torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=torch.bool)], 1)


def _assert_equal_to_forward_with(params, out, acts, mask, edit, sites):
    _, ref = forward_with(params, out, capture=sites, edit=edit, pad_mask=mask)
    assert sorted(acts) == sorted(ref)
    for site in ref:
        want = ref[site]
        if site == "embed.pos" and want.ndim == 2:  # [seq d_model] without a pad mask; generation keeps a batch axis
            want = want.expand(out.shape[0], *want.shape)
        assert acts[site].shape == want.shape, site
        torch.testing.assert_close(acts[site], want, atol=1e-4, rtol=1e-4, msg=site)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       new=st.integers(1, 6), edit=st.sampled_from(list(EDITS)), sample=st.booleans())
def test_captures_while_generating_equal_forward_with_on_the_final_ids(sharp, seed, lengths, new, edit, sample):
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths])
    mask = None if bool(mask.all()) else mask
    kw = dict(temperature=0.9, top_k=20, seed=seed) if sample else {}
    out, acts = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=new, capture=SITES, edit=EDITS[edit](), **kw)
    assert out.shape == (len(lengths), ids.shape[1] + new)
    assert torch.equal(out, generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=new, edit=EDITS[edit](), **kw))
    _assert_equal_to_forward_with(sharp, out, acts, _full_mask(mask, out), EDITS[edit](), SITES)


def test_captures_with_edits_at_absolute_positions_hold_the_edited_values(sharp):
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    edit = {"blocks.0.resid_mid": steer(torch.ones(24) * 4, positions=[1, 6, 9])}
    out, acts = generate_tokens(sharp, ids, max_new_tokens=8, edit=edit, capture=["blocks.0.resid_mid"])
    _assert_equal_to_forward_with(sharp, out, acts, None, edit, ["blocks.0.resid_mid"])
    _, plain = generate_tokens(sharp, ids, max_new_tokens=8, capture=["blocks.0.resid_mid"])
    moved = (acts["blocks.0.resid_mid"] - plain["blocks.0.resid_mid"]).abs().amax((0, 2))
    # the steered positions move; the prompt's others do not (a resid_mid edit reaches later positions only
    # through the next block, and the tokens from position 4 on may differ)
    assert moved[[1, 6, 9]].min() > 1.0 and moved[[0, 2, 3]].max() == 0


def test_rows_that_stop_at_eos_hold_the_run_over_the_eos_fill(sharp):
    ids, mask = left_pad([[3, 4, 5], [6, 7]])
    first = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=1)[:, -1]
    eos = int(first[0])  # row 0 stops at its first token; the other row runs on until it is produced (or the end)
    out, lp, acts = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=6, eos=eos, return_logprobs=True,
                                    capture=["blocks.1.resid_post", "logits"])
    assert (out[0, ids.shape[1]:] == eos).all() and lp.shape == (2, out.shape[1] - ids.shape[1])
    assert acts["logits"].shape[1] == out.shape[1]
    _assert_equal_to_forward_with(sharp, out, acts, _full_mask(mask, out), None, ["blocks.1.resid_post", "logits"])


def test_no_new_tokens_captures_the_prompts_forward(sharp):
    ids, mask = left_pad([[3, 4, 5], [6]])
    out, acts = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=0, capture="blocks.0.attn.pattern")
    assert torch.equal(out, ids)
    _assert_equal_to_forward_with(sharp, out, acts, mask, None, ["blocks.0.attn.pattern"])


def test_generate_text_returns_the_captures_of_the_left_padded_ids(wordy):
    prompts = ["Hello there", "A"]
    kw = dict(max_new_tokens=5, eos=False)
    texts, acts = gpt2fn.generate(wordy, prompts, capture=["blocks.1.resid_pre", "blocks.0.attn.pattern"], **kw)
    assert texts == gpt2fn.generate(wordy, prompts, **kw)
    ids, mask = left_pad([encode(p) for p in prompts])
    out = generate_tokens(wordy, ids, pad_mask=mask, **kw)
    _assert_equal_to_forward_with(wordy, out, acts, _full_mask(mask, out), None,
                                  ["blocks.1.resid_pre", "blocks.0.attn.pattern"])
    # a stop string ends the text, not the tokens: the captures still cover every generated position
    text, lps, one = gpt2fn.generate(wordy, "Hello there", stop=texts[0][:1] or None, return_logprobs=True,
                                     capture="blocks.1.resid_pre", **kw)
    assert isinstance(text, str) and one["blocks.1.resid_pre"].shape[:2] == (1, len(encode("Hello there")) + 5)


@pytest.mark.parametrize(("call", "kwargs", "message"), [
    ("tokens", dict(max_new_tokens=40), "capture= needs the whole sequence inside the context window"),
    ("tokens", dict(compile=True), "drop one of them"),
    ("tokens", dict(num_beams=2), "capture="),
    ("tokens", dict(capture=["blocks.7.resid_pre"]), "0..1"),
    ("stream", dict(), "stream yields text pieces only"),
])
def test_bad_captures_name_the_problem_and_the_fix(sharp, wordy, call, kwargs, message):
    kwargs = {"capture": ["blocks.0.resid_pre"], **kwargs}
    with pytest.raises(ValueError, match=message):
        if call == "stream":
            list(gpt2fn.stream(wordy, "abc", max_new_tokens=2, **kwargs))
        else:
            generate_tokens(sharp, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Compiled edited runs


COMPILED_EDITS = {
    "steer": lambda: {"blocks.0.resid_post": steer(torch.linspace(-3, 3, 24), scale=2.0, positions=[1, 5, 8])},
    "patch": lambda: {"blocks.1.mlp.post": patch(torch.full((96,), 0.5), positions=[0, 7])},
    "ablate": lambda: {"blocks.0.attn.z": ablate_head([0, 2])},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPILED_EDITS))
def test_forward_with_edits_compiles_to_one_graph_with_the_eager_values(sharp, name):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    edit = COMPILED_EDITS[name]()
    eager, _ = forward_with(sharp, ids, edit=edit)
    explained = torch._dynamo.explain(forward_with)(sharp, ids, edit=edit)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(forward_with, fullgraph=True, backend="aot_eager")
    got, _ = compiled(sharp, ids, edit=edit)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    assert not torch.equal(eager, forward_with(sharp, ids)[0])  # the edit does something


@pytest.mark.slow
def test_compiled_edited_generation_gives_the_eager_tokens_with_one_graph(sharp):
    from torch._dynamo.utils import counters

    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]])
    edit = {name: fn for make in COMPILED_EDITS.values() for name, fn in make().items()}
    eager = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12, edit=edit)
    assert not torch.equal(eager, generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12))
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12, edit=edit, compile=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # at most one new graph for every step ...
    assert sum(counters["graph_break"].values()) == breaks  # ... with no graph break
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12, edit=edit, compile=True)
        # a new edit of the same kind (other vector, scale and patch values): its tensors are inputs, same graph
        other = {"blocks.0.resid_post": steer(torch.linspace(3, -3, 24), scale=-1.5, positions=[1, 5, 8]),
                 "blocks.1.mlp.post": patch(torch.full((96,), -0.5), positions=[0, 7]),
                 "blocks.0.attn.z": ablate_head([0, 2])}
        moved = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12, edit=other, compile=True)
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(moved, generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=12, edit=other))

"""Generation beyond sampling: log-probabilities of the produced tokens, study edits applied while generating
(equal to recomputing the whole sequence with the edit at every step), the new filters through generate, and the
bad-input errors of the new options."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import forward, generate_tokens
from gpt2fn.model import left_pad
from gpt2fn.study import ablate_head, forward_with, patch, steer


def _ids(seed: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 8), new=st.integers(1, 10), sample=st.booleans())
def test_logprobs_are_the_full_forwards_log_softmax_at_the_produced_tokens(sharp, seed, prompt, new, sample):
    ids = _ids(seed, 2, prompt)
    kw = dict(temperature=0.9, top_k=30, seed=seed) if sample else {}
    out, lp = generate_tokens(sharp, ids, max_new_tokens=new, return_logprobs=True, **kw)
    assert lp.shape == (2, new)
    full = torch.log_softmax(forward(sharp, out[:, :-1]).float(), -1)
    expect = full[:, prompt - 1:].gather(-1, out[:, prompt:, None])[..., 0]
    torch.testing.assert_close(lp, expect, atol=1e-4, rtol=1e-4)


def test_text_generation_reports_one_logprob_per_produced_token(wordy):
    text, lps = gpt2fn.generate(wordy, "hello", max_new_tokens=5, eos=False, return_logprobs=True)
    assert isinstance(text, str) and len(lps) == 5 and all(lp <= 0 for lp in lps)
    texts, many = gpt2fn.generate(wordy, ["a", "b c"], max_new_tokens=3, eos=False, return_logprobs=True)
    assert len(texts) == 2 and [len(x) for x in many] == [3, 3]


def _reference_with_edit(params, ids, new, edit):
    """Recompute the whole sequence with the edit at every step (greedy)."""
    for _ in range(new):
        logits, _ = forward_with(params, ids, edit=edit)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


EDITS = {
    "steer resid_post": lambda: {"blocks.1.resid_post": steer(torch.linspace(-3, 3, 24), scale=2.0)},
    "steer at absolute positions": lambda: {"blocks.0.resid_mid": steer(torch.ones(24) * 4, positions=[1, 6, 9])},
    "ablate a head": lambda: {"blocks.0.attn.z": ablate_head(1)},
    "patch mlp.post at positions": lambda: {"blocks.1.mlp.post": patch(0.5, positions=[0, 7])},
    "patch a run's activations": lambda: {"blocks.0.resid_pre": patch(torch.randn(1, 40, 24,
                                                                      generator=torch.Generator().manual_seed(1)),
                                                                      positions=[2, 8])},
    "patch attn.result at a head and positions": lambda: {"blocks.0.attn.result": patch(
        torch.randn(1, 40, 3, 24, generator=torch.Generator().manual_seed(2)) * 3, positions=[1, 6], heads=2)},
}


@pytest.mark.parametrize("name", list(EDITS))
@pytest.mark.parametrize("prompt", [3, 5])
def test_edits_while_generating_equal_recomputing_the_sequence_with_the_edit(sharp, name, prompt):
    ids = _ids(prompt, 2, prompt)
    edit = EDITS[name]()
    out = generate_tokens(sharp, ids, max_new_tokens=8, edit=edit)
    assert torch.equal(out, _reference_with_edit(sharp, ids, 8, edit))


def test_a_strong_steer_changes_what_is_generated(sharp):
    ids = _ids(0, 2, 4)
    edit = {"blocks.1.resid_post": steer(torch.linspace(-40, 40, 24))}
    steered = generate_tokens(sharp, ids, max_new_tokens=8, edit=edit)
    assert not torch.equal(steered, generate_tokens(sharp, ids, max_new_tokens=8))


def test_edits_at_absolute_positions_follow_each_row_of_a_left_padded_batch(sharp):
    edit = {"blocks.1.resid_pre": steer(torch.ones(24) * 5, positions=[4, 6])}
    rows = [[3, 4, 5, 6], [7, 8]]
    ids, mask = left_pad(rows)
    out = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=5, edit=edit)
    for i, r in enumerate(rows):
        alone = _reference_with_edit(sharp, torch.tensor([r]), 5, edit)
        assert out[i, ids.shape[1]:].tolist() == alone[0, len(r):].tolist()


def test_stream_applies_edits_like_generate(wordy):
    edit = {"blocks.1.resid_post": steer(torch.linspace(-40, 40, 32))}
    kw = dict(max_new_tokens=6, eos=False, edit=edit)
    streamed = "".join(gpt2fn.stream(wordy, "abc", **kw))
    assert streamed == gpt2fn.generate(wordy, "abc", **kw) != gpt2fn.generate(wordy, "abc", max_new_tokens=6, eos=False)


def test_no_repeat_ngram_and_suppress_hold_through_generate(sharp):
    ids = _ids(3, 2, 4)
    out = generate_tokens(sharp, ids, max_new_tokens=20, no_repeat_ngram_size=2, suppress=[5, 6])
    for row in out.tolist():
        grams = list(zip(row, row[1:], strict=False))
        assert len(grams) == len(set(grams)), row
        assert not {5, 6} & set(row[4:])
    free = generate_tokens(sharp, ids, max_new_tokens=20)
    grams = [list(zip(r, r[1:], strict=False)) for r in free.tolist()]
    assert any(len(g) != len(set(g)) for g in grams)  # without the filter this model does repeat itself


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences must be an integer in \[1, num_beams=2\]"),
    (dict(num_beams=2, temperature=0.7), "temperature, top_k, top_p and min_p do not apply"),
    (dict(min_p=1.5), "min_p"),
    (dict(no_repeat_ngram_size=0), "no_repeat_ngram_size"),
    (dict(edit={"blocks.9.resid_post": steer(torch.ones(24))}), "blocks.9.resid_post"),
    (dict(capture=["blocks.0.resid_post"], compile=True), "compile"),
])
def test_bad_generation_options_name_the_argument_and_the_range(sharp, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_tokens(sharp, _ids(0, 1, 3), max_new_tokens=2, **kwargs)


def test_generate_with_beams_returns_beam_search_sequences(sharp, wordy):
    from gpt2fn.beam import beam_search

    ids, mask = left_pad([[3, 4, 5], [6, 7]])
    out = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    ref = beam_search(sharp, ids, pad_mask=mask, num_beams=3, max_new_tokens=6, num_return_sequences=2)
    assert torch.equal(out, ref) and out.shape[0] == 4
    texts = gpt2fn.generate(wordy, ["Hello", "The cat"], max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert [len(t) for t in texts] == [2, 2] and all(isinstance(x, str) for t in texts for x in t)
    one = gpt2fn.generate(wordy, "Hello", max_new_tokens=4, num_beams=2)
    assert isinstance(one, str) and one == texts[0][0]

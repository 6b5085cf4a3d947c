"""Processors (`gpt2fn.processors`): each equals its `transformers` logits-processor twin on the same logits and ids;
generation applies them after the built-in filters and in the order given; the built-in keywords and their
processors are one implementation (the same tokens); left padding reaches a processor as PAD and changes no row;
the rules hold over whole generations; bad arguments raise clear errors where they are given."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import GPTParams, generate_tokens, init_params, preset
from gpt2fn import processors as P
from gpt2fn.model import left_pad

VOCAB = 29

transformers_lp = pytest.importorskip(
    "transformers.generation.logits_process",
    reason="transformers (a dev extra: pip install gpt2fn[dev]) is the reference for the processor twins")


def _logits(seed: int, batch: int = 3, vocab: int = VOCAB) -> torch.Tensor:
    """Random logits with ties (rounded) and some -inf entries."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=g) * 3.0).round()
    return logits.masked_fill(torch.rand(batch, vocab, generator=g) < 0.15, float("-inf"))


def _history(seed: int, batch: int, seq: int, alphabet: int = 4) -> torch.Tensor:
    """Token histories over a small alphabet, so that sequences and n-grams repeat often."""
    return torch.randint(0, alphabet, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))


def _twins():
    """(our processor, transformers' twin), one pair per factory."""
    lp = transformers_lp
    return {
        "temperature": (P.temperature(0.7), lp.TemperatureLogitsWarper(0.7)),
        "top_k": (P.top_k(5), lp.TopKLogitsWarper(5)),
        "top_p": (P.top_p(0.8), lp.TopPLogitsWarper(0.8)),
        "min_p": (P.min_p(0.1), lp.MinPLogitsWarper(0.1)),
        "repetition_penalty": (P.repetition_penalty(1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
        "no_repeat_ngram": (P.no_repeat_ngram(2), lp.NoRepeatNGramLogitsProcessor(2)),
        "suppress": (P.suppress([1, 4]), lp.SuppressTokensLogitsProcessor([1, 4])),
        "bad_words": (P.bad_words([[3], [1, 2], [2, 2, 1]]),
                      lp.NoBadWordsLogitsProcessor([[3], [1, 2], [2, 2, 1]])),
        "sequence_bias": (P.sequence_bias({(3,): -1.5, (1, 2): 2.0, (2, 2, 1): 0.5, (0, 2): -3.0, (1, 0, 3): 1.0}),
                          lp.SequenceBiasLogitsProcessor([[[3], -1.5], [[1, 2], 2.0], [[2, 2, 1], 0.5],
                                                          [[0, 2], -3.0], [[1, 0, 3], 1.0]])),
        "min_new_tokens": (P.min_new_tokens(4, prompt_len=5, eos_id=7),
                           lp.MinNewTokensLengthLogitsProcessor(5, 4, 7)),
        "min_length": (P.min_length(8, eos_id=7), lp.MinLengthLogitsProcessor(8, 7)),
        "forced_eos_at_max": (P.forced_eos_at_max(9, eos_id=7), lp.ForcedEOSTokenLogitsProcessor(9, 7)),
    }


@pytest.mark.parametrize("name", list(_twins()))
@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1))
def test_each_processor_equals_its_transformers_twin(name, seed):
    for seq in range(1, 13):  # every length: the length rules switch at particular ones
        ours, theirs = _twins()[name]
        logits, ids = _logits(seed), _history(seed, 3, seq)
        got = ours(logits, ids)
        expected = theirs(ids, logits.clone())
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), (name, seq)
        torch.testing.assert_close(got, expected, msg=f"{name} at seq {seq}")
        assert torch.equal(logits, _logits(seed)), "a processor must not write into its input"


def test_apply_processors_runs_them_in_order():
    logits, ids = _logits(0), _history(0, 3, 5)
    double = lambda x, _: x * 2
    shift = P.sequence_bias({(2,): 5.0})
    torch.testing.assert_close(P.apply_processors([double, shift], logits, ids), shift(double(logits, ids), ids))
    torch.testing.assert_close(P.apply_processors([shift, double], logits, ids), double(shift(logits, ids), ids))
    assert not torch.equal(P.apply_processors([double, shift], logits, ids),
                           P.apply_processors([shift, double], logits, ids))


# ---------------------------------------------------------------------------------------------------------------
# In generation


def _sharp(seed: int = 0) -> GPTParams:
    """preset("tiny") with the token embedding scaled up: greedy choices far above float rounding."""
    params = init_params(preset("tiny"), seed=seed)
    return params.replace(tok_emb=params.tok_emb * 30)


@pytest.fixture(scope="module")
def sharp() -> GPTParams:
    return _sharp()


def _ids(seed: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _force(token: int):
    """A processor that makes `token` the only possible id."""
    def force(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, float("-inf")).index_fill(1, torch.tensor([token]), 0.0)
    return force


def test_processors_run_in_the_order_given_the_last_one_deciding(sharp):
    ids = _ids(1, 2, 5)
    assert (generate_tokens(sharp, ids, max_new_tokens=3, processors=[_force(3), _force(8)])[:, 5:] == 8).all()
    assert (generate_tokens(sharp, ids, max_new_tokens=3, processors=[_force(8), _force(3)])[:, 5:] == 3).all()


def test_processors_run_after_the_built_in_filters(sharp):
    # suppress=[8] bans 8; a processor after it can still force it (before it, every id would be -inf)
    out = generate_tokens(sharp, _ids(2, 1, 4), max_new_tokens=3, suppress=[8], processors=[_force(8)])
    assert out[0, 4:].tolist() == [8, 8, 8]


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), padded=st.booleans())
def test_built_in_keywords_and_their_processors_give_the_same_tokens(sharp, seed, padded):
    rows = [_ids(seed, 1, 6)[0].tolist(), _ids(seed + 1, 1, 3)[0].tolist()]
    ids, mask = left_pad(rows) if padded else (_ids(seed, 2, 5), None)
    common = dict(max_new_tokens=10, seed=seed, pad_mask=mask)
    keywords = generate_tokens(sharp, ids, temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                               no_repeat_ngram_size=2, suppress=[3], **common)
    listed = generate_tokens(sharp, ids, temperature=1.0, processors=[
        P.repetition_penalty(1.3), P.no_repeat_ngram(2), P.suppress([3]), P.temperature(0.8), P.top_k(12),
        P.top_p(0.9), P.min_p(0.05)], **common)
    assert torch.equal(keywords, listed)


@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 8), min_size=2, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_left_padding_reaches_processors_as_pad_and_changes_no_row(sharp, lengths, seed):
    rows = [_ids(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    seen: list[torch.Tensor] = []

    def spy(logits, so_far):
        seen.append(so_far.clone())
        return logits

    rules = [P.repetition_penalty(1.5), P.no_repeat_ngram(2), P.bad_words([[rows[0][-1], 5]]),
             P.sequence_bias({(rows[-1][-1],): -4.0})]
    batch = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=6, processors=[spy, *rules])
    first = seen[0]
    assert first.shape == ids.shape
    assert torch.equal(first, ids.masked_fill(~mask, P.PAD))
    assert torch.equal(seen[-1][:, ids.shape[1]:], batch[:, ids.shape[1]:-1])
    for i, r in enumerate(rows):
        alone = generate_tokens(sharp, torch.tensor([r]), max_new_tokens=6, processors=rules)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(r):].tolist()


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_bad_word_never_appears_in_the_generation(sharp, seed):
    ids = _ids(seed, 1, 4)
    free = generate_tokens(sharp, ids, max_new_tokens=12)[0].tolist()
    banned = free[4:6]  # the first two new tokens: the free generation produces this pair
    out = generate_tokens(sharp, ids, max_new_tokens=12, processors=[P.bad_words([banned])])[0].tolist()
    assert all(out[i:i + 2] != banned for i in range(3, len(out) - 1))  # from the prompt's last token on


def test_min_new_tokens_and_forced_eos_shape_where_a_row_ends(sharp):
    ids = _ids(5, 1, 4)
    free = generate_tokens(sharp, ids, max_new_tokens=8)[0, 4:].tolist()
    eos = free[0]
    assert generate_tokens(sharp, ids, max_new_tokens=8, eos=eos).shape[1] == 5  # stops at once without the rule
    held = generate_tokens(sharp, ids, max_new_tokens=8, eos=eos,
                           processors=[P.min_new_tokens(3, prompt_len=4, eos_id=eos)])[0, 4:].tolist()
    assert eos not in held[:3]
    end = 11 if 11 not in free[:3] else 12
    forced = generate_tokens(sharp, ids, max_new_tokens=8,
                             processors=[P.forced_eos_at_max(4 + 3, eos_id=end)])[0, 4:].tolist()
    assert forced[:3] == [*free[:2], end]  # the token that makes the row 7 long


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("make, error, message", [
    (lambda: P.bad_words([1, 2]), TypeError, "list of sequences"),
    (lambda: P.bad_words([]), TypeError, "non-empty list"),
    (lambda: P.bad_words([[1, -2]]), ValueError, "token ids"),
    (lambda: P.bad_words("ab"), TypeError, "token-id sequences"),
    (lambda: P.sequence_bias({}), TypeError, "non-empty dict"),
    (lambda: P.sequence_bias({(1,): "big"}), ValueError, "must be a number"),
    (lambda: P.sequence_bias({(): 1.0}), TypeError, "non-empty"),
    (lambda: P.temperature(0), ValueError, "t > 0"),
    (lambda: P.temperature(-1.0), ValueError, "temperature"),
    (lambda: P.top_k(0), ValueError, "top_k"),
    (lambda: P.top_p(1.5), ValueError, "top_p"),
    (lambda: P.min_p(-0.1), ValueError, "min_p"),
    (lambda: P.repetition_penalty(0), ValueError, "repetition_penalty"),
    (lambda: P.no_repeat_ngram(0), ValueError, "no_repeat_ngram_size"),
    (lambda: P.suppress([1.5]), ValueError, "suppress"),
    (lambda: P.min_new_tokens(-1, prompt_len=3), ValueError, "min_new_tokens"),
    (lambda: P.min_new_tokens(2, prompt_len=3, eos_id=True), ValueError, "eos_id"),
    (lambda: P.forced_eos_at_max("9"), ValueError, "max_length"),
])
def test_bad_factory_arguments_raise_where_they_are_given(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_processors_raise_at_the_entry_point(sharp):
    ids = _ids(0, 1, 3)
    with pytest.raises(TypeError, match="wrap a single processor in a list"):
        generate_tokens(sharp, ids, processors=_force(3))
    with pytest.raises(TypeError, match=r"processors\[1\] is a int"):
        generate_tokens(sharp, ids, processors=[_force(3), 7])
    with pytest.raises(ValueError, match=r"processors\[0\] \(bad_words.*outside this model's vocabulary \[0, 97\)"):
        generate_tokens(sharp, ids, processors=[P.bad_words([[3, 500]])])
    with pytest.raises(ValueError, match=r"processors\[0\] \(wrong\) returned torch.float32 \[1, 5\]"):
        def wrong(logits, so_far):
            return logits[:, :5]
        generate_tokens(sharp, ids, processors=[wrong])


def test_a_processor_called_directly_checks_its_inputs():
    rule = P.suppress([40])
    with pytest.raises(ValueError, match=r"names token id 40, outside these logits' vocabulary \[0, 29\)"):
        rule(_logits(0), _history(0, 3, 2))
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        P.top_k(3)(_logits(0), _history(0, 3, 2).float())
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        P.top_k(3)(_logits(0)[0], _history(0, 3, 2))
    with pytest.raises(TypeError, match=r"two torch.Tensors; got \(torch.float32 \[3, 29\], list\)"):
        P.top_k(3)(_logits(0), [[1, 2]])

"""min-p, no-repeat-n-gram and suppressed ids: each filter equals its `transformers` logits processor, on random
logits (with ties and -inf entries) and random histories, padded or not; the pipeline applies them in
`transformers`' order; bad options raise ValueErrors naming the option and its range."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from gpt2fn.sampling import (
    SamplingOptions,
    min_p_filter,
    next_token,
    no_repeat_ngram,
    row_generators,
    sample,
    suppress_tokens,
)

VOCAB = 29


def _logits(seed: int, batch: int = 3, vocab: int = VOCAB, *, ties: bool = False, inf_frac: float = 0.0,
            device="cpu") -> torch.Tensor:
    """Random logits; `ties` rounds them to integers (many equal values), `inf_frac` sets entries to -inf
    (with the last row entirely -inf when inf_frac is 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3.0
    if ties:
        logits = logits.round()
    if inf_frac:
        logits = logits.masked_fill(torch.rand(batch, vocab, generator=g) < inf_frac, float("-inf"))
    return logits.to(device)


def _history(seed: int, batch: int, seq: int, alphabet: int) -> torch.Tensor:
    """Token histories over a small alphabet, so that n-grams repeat often."""
    return torch.randint(0, alphabet, (batch, seq), generator=torch.Generator().manual_seed(seed))


@given(seed=st.integers(0, 2**31 - 1), min_p=st.floats(0.0, 1.0), ties=st.booleans(),
       inf_frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_min_p_equals_transformers_min_p_warper(seed, min_p, ties, inf_frac):
    logits = _logits(seed, ties=ties, inf_frac=inf_frac)
    ids = torch.zeros(3, 1, dtype=torch.long)
    expected = MinPLogitsWarper(min_p)(ids, logits.clone())
    got = min_p_filter(logits, min_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    torch.testing.assert_close(got, expected, equal_nan=True)
    if inf_frac < 1.0:  # every row with a finite logit keeps at least its most likely id
        finite_rows = torch.isfinite(logits).any(-1)
        assert torch.isfinite(got[finite_rows]).any(-1).all()


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), seq=st.integers(0, 14), alphabet=st.integers(2, 6),
       inf_frac=st.sampled_from([0.0, 0.3]))
def test_no_repeat_ngram_equals_transformers_processor(device, seed, n, seq, alphabet, inf_frac):
    logits = _logits(seed, ties=True, inf_frac=inf_frac)
    history = _history(seed, 3, seq, alphabet)
    expected = NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    got = no_repeat_ngram(logits.to(device), history.to(device), n)
    assert torch.equal(got.cpu(), expected)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), lengths=st.lists(st.integers(0, 12), min_size=1,
                                                                             max_size=4),
       alphabet=st.integers(2, 5))
def test_left_padding_never_forms_ngrams(device, seed, n, lengths, alphabet):
    # padding holds tokens of the same alphabet, so it would form (and match) n-grams if it were not masked
    batch, longest = len(lengths), max(lengths)
    logits = _logits(seed, batch=batch)
    history = _history(seed, batch, longest, alphabet)
    real = torch.arange(longest)[None] >= longest - torch.tensor(lengths)[:, None]
    got = no_repeat_ngram(logits.to(device), history.to(device), n, real.to(device)).cpu()
    for row, length in enumerate(lengths):  # each row as transformers sees it alone, unpadded
        alone = history[row:row + 1, longest - length:]
        expected = NoRepeatNGramLogitsProcessor(n)(alone, logits[row:row + 1].clone())
        assert torch.equal(got[row:row + 1], expected)


def test_no_repeat_ngram_bans_exactly_the_completions_of_the_last_n_minus_1_tokens():
    history = torch.tensor([[5, 1, 2, 7, 1, 2, 9, 3, 1, 2]])  # "1 2" was followed by 7 and by 9
    banned = torch.isinf(no_repeat_ngram(torch.zeros(1, 12), history, 3))
    assert banned[0].nonzero().flatten().tolist() == [7, 9]
    banned = torch.isinf(no_repeat_ngram(torch.zeros(1, 12), history, 1))
    assert banned[0].nonzero().flatten().tolist() == sorted(set(history[0].tolist()))


def test_a_masked_position_in_the_last_n_minus_1_tokens_bans_nothing():
    history = torch.tensor([[1, 2, 7, 1, 2], [1, 2, 7, 1, 2]])
    real = torch.tensor([[True] * 5, [True, True, True, False, True]])  # row 1: its "1 2" suffix is not all real
    banned = torch.isinf(no_repeat_ngram(torch.zeros(2, 9), history, 3, real))
    assert banned[0].nonzero().flatten().tolist() == [7]
    assert not banned[1].any()


@given(seed=st.integers(0, 2**31 - 1), ids=st.lists(st.integers(0, VOCAB - 1), max_size=12),
       inf_frac=st.sampled_from([0.0, 0.3]))
def test_suppress_equals_transformers_suppress_tokens_processor(device, seed, ids, inf_frac):
    logits = _logits(seed, ties=True, inf_frac=inf_frac)
    expected = SuppressTokensLogitsProcessor(ids)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    assert torch.equal(suppress_tokens(logits.to(device), ids).cpu(), expected)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), ids=st.lists(st.integers(0, VOCAB - 1), max_size=6),
       penalty=st.sampled_from([None, 1.3]), min_p=st.sampled_from([None, 0.05, 0.5]), seq=st.integers(1, 12))
def test_greedy_pipeline_equals_transformers_processors(seed, n, ids, penalty, min_p, seq):
    logits = _logits(seed, ties=True)
    history = _history(seed, 3, seq, 5)
    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(n), SuppressTokensLogitsProcessor(ids)])
    if penalty is not None:
        processors.insert(0, RepetitionPenaltyLogitsProcessor(penalty))
    expected = processors(history, logits.clone()).argmax(-1)  # min_p is a warper: never applied when greedy
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, history, True)
    opts = SamplingOptions(repetition_penalty=penalty, min_p=min_p, no_repeat_ngram_size=n, suppress=ids)
    assert torch.equal(next_token(logits, opts, n_tokens=VOCAB, seen=seen, history=history), expected)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), temperature=st.floats(0.2, 3.0),
       top_k=st.sampled_from([None, 5, 12]), min_p=st.floats(0.0, 1.0), seq=st.integers(1, 12))
def test_sampling_pipeline_draws_what_transformers_processors_and_warpers_give(seed, n, temperature, top_k, min_p,
                                                                              seq):
    # min_p comes after temperature, as in transformers: the same draws from the same generators
    logits = _logits(seed, ties=True)
    history = _history(seed, 3, seq, 5)
    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(n), SuppressTokensLogitsProcessor([0, 3]),
                                      TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    processors.append(MinPLogitsWarper(min_p))
    warped = processors(history, logits.clone())
    opts = SamplingOptions(temperature=temperature, top_k=top_k, min_p=min_p, no_repeat_ngram_size=n,
                           suppress=(0, 3))
    got = next_token(logits, opts, n_tokens=VOCAB, generators=row_generators(seed, 3), history=history)
    assert torch.equal(got, sample(warped, row_generators(seed, 3)))
    assert torch.isfinite(warped.gather(1, got[:, None])).all()


def test_options_keep_their_positional_order_and_store_suppress_as_a_tuple():
    opts = SamplingOptions(0.7, 40, 0.9, 1.2, 0.1, 3, [5, 2])
    assert (opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty) == (0.7, 40, 0.9, 1.2)
    assert (opts.min_p, opts.no_repeat_ngram_size, opts.suppress) == (0.1, 3, (5, 2))
    assert hash(opts) == hash(SamplingOptions(0.7, 40, 0.9, 1.2, 0.1, 3, (5, 2)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), r"min_p must be in \[0, 1\]"),
    (dict(no_repeat_ngram_size=0), "no_repeat_ngram_size must be an integer >= 1"),
    (dict(no_repeat_ngram_size=2.5), "no_repeat_ngram_size must be an integer >= 1"),
    (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size must be an integer >= 1"),
    (dict(suppress=[3, -1]), "suppress must be a sequence of token ids >= 0"),
    (dict(suppress=[1.5]), "suppress must be a sequence of token ids >= 0"),
    (dict(suppress="ab"), "suppress must be a sequence of token ids >= 0"),
    (dict(suppress=7), "suppress must be a sequence of token ids >= 0"),
])
def test_bad_options_raise_value_errors_naming_the_option_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**kwargs)


def test_bad_filter_input_raises_value_errors():
    logits = _logits(0)
    with pytest.raises(ValueError, match=rf"suppress ids must be token ids in \[0, {VOCAB}\).*{VOCAB + 4}"):
        next_token(logits, SamplingOptions(suppress=[1, VOCAB + 4]), n_tokens=VOCAB)
    with pytest.raises(ValueError, match="no_repeat_ngram_size needs `history`"):
        next_token(logits, SamplingOptions(no_repeat_ngram_size=2), n_tokens=VOCAB)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        min_p_filter(logits, 1.2)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 1"):
        no_repeat_ngram(logits, _history(0, 3, 5, 4), 0)

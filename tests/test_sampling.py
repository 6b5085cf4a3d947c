"""Decoding strategies: every sample lies in the allowed set, filters match Hugging Face's, seeds replay."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2fn.sampling import (
    SamplingOptions,
    greedy,
    mask_vocab,
    next_token,
    repetition_penalty,
    row_generators,
    sample,
    scale_temperature,
    top_k_filter,
    top_p_filter,
)

VOCAB = 53


def _logits(seed: int, batch: int = 3, vocab: int = VOCAB, scale: float = 3.0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * scale).to(device)


def _nucleus(logits_row: torch.Tensor, p: float) -> set[int]:
    """The fewest most-probable ids whose probabilities sum to at least p, computed by a plain loop."""
    probs = torch.softmax(logits_row.double(), -1)
    kept, mass = set(), 0.0
    for i in torch.argsort(probs, descending=True).tolist():
        kept.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    return kept


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, VOCAB + 3), temperature=st.floats(0.05, 5.0))
def test_top_k_samples_are_among_the_k_most_likely(device, seed, k, temperature):
    logits = _logits(seed, device=device)
    opts = SamplingOptions(temperature=temperature, top_k=k)
    allowed = torch.topk(logits, min(k, VOCAB), dim=-1).indices
    for draw in range(4):
        tok = next_token(logits, opts, n_tokens=VOCAB, generators=row_generators(seed + draw, 3, device))
        assert (allowed == tok[:, None]).any(-1).all()


@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.01, 1.0), temperature=st.floats(0.05, 5.0))
def test_top_p_samples_are_inside_the_nucleus(device, seed, p, temperature):
    logits = _logits(seed, device=device)
    opts = SamplingOptions(temperature=temperature, top_p=p)
    scaled = logits.cpu() / temperature
    for draw in range(4):
        tok = next_token(logits, opts, n_tokens=VOCAB, generators=row_generators(seed + draw, 3, device))
        for row, t in enumerate(tok.tolist()):
            assert t in _nucleus(scaled[row], p)


@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.01, 0.999))
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p):
    logits = _logits(seed)
    kept = torch.isfinite(top_p_filter(logits, p))
    for row in range(logits.shape[0]):
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == _nucleus(logits[row], p)


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, VOCAB), p=st.floats(0.05, 1.0))
def test_filters_match_hugging_face_warpers(seed, k, p):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = _logits(seed)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    torch.testing.assert_close(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(repetition_penalty(logits, seen, 1.7),
                               RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))


def test_repetition_penalty_makes_seen_ids_less_likely():
    logits = _logits(0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, :10] = True
    after = repetition_penalty(logits, seen, 2.0)
    assert (after[:, :10] < logits[:, :10]).all()  # positive logits halved, negative ones doubled
    assert torch.equal(after[:, 10:], logits[:, 10:])
    assert torch.equal(repetition_penalty(logits, seen, 1.0), logits)


@given(seed=st.integers(0, 2**31 - 1))
def test_temperature_towards_zero_gives_greedy(device, seed):
    logits = _logits(seed, device=device)
    tok = next_token(logits, SamplingOptions(temperature=1e-4), n_tokens=VOCAB,
                     generators=row_generators(seed, 3, device))
    assert torch.equal(tok, greedy(logits))
    assert torch.equal(next_token(logits, SamplingOptions(), n_tokens=VOCAB), logits.argmax(-1))


def test_high_temperature_spreads_samples_over_many_ids():
    # the converse of the greedy limit: sampling really samples
    logits = _logits(0, batch=1)
    draws = {int(next_token(logits, SamplingOptions(temperature=50.0), n_tokens=VOCAB,
                            generators=row_generators(s, 1))) for s in range(60)}
    assert len(draws) > 20


def test_padded_vocabulary_ids_are_never_chosen(device):
    logits = _logits(1, device=device)
    logits[:, 40:] += 100.0  # the padding ids are the most likely by far
    assert (greedy(logits) >= 40).all()
    assert (next_token(logits, SamplingOptions(), n_tokens=40) < 40).all()
    for s in range(10):
        tok = next_token(logits, SamplingOptions(temperature=2.0), n_tokens=40, generators=row_generators(s, 3,
                                                                                                         device))
        assert (tok < 40).all()
    assert torch.isinf(mask_vocab(logits, 40)[:, 40:]).all()


@given(seed=st.integers(0, 2**31 - 1))
def test_fixed_seed_replays_and_each_row_draws_only_from_its_own_generator(device, seed):
    logits = _logits(seed, batch=4, scale=0.5, device=device)
    a = sample(logits, row_generators(seed, 4, device))
    assert torch.equal(a, sample(logits, row_generators(seed, 4, device)))
    for i in range(4):  # row i of the batch is the same row alone with seed + i
        alone = sample(logits[i:i + 1], row_generators(seed + i, 1, device))
        assert int(alone) == int(a[i])
    other = logits.clone()
    other[1:] = _logits(seed + 1, batch=3, scale=0.5, device=device)  # change the other rows only
    assert int(sample(other, row_generators(seed, 4, device))[0]) == int(a[0])


def test_different_seeds_give_different_samples():
    logits = _logits(3, batch=1, scale=0.1)
    draws = [tuple(sample(logits.expand(16, -1), row_generators(s, 16)).tolist()) for s in (0, 100)]
    assert draws[0] != draws[1]


def test_samples_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.bincount(torch.cat([sample(logits, row_generators(s, 1)) for s in range(3000)]), minlength=3)
    freq = counts.double() / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.double), atol=0.04)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_options_raise_value_errors_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**kwargs)


def test_bad_generator_arguments_raise():
    with pytest.raises(ValueError, match="one entry per row"):
        row_generators([1, 2], 3)
    with pytest.raises(ValueError, match="independent rows"):
        row_generators(torch.Generator(), 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        scale_temperature(_logits(0), 0.0)
    with pytest.raises(ValueError, match="one generator per row"):
        sample(_logits(0), row_generators(0, 2))

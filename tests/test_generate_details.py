"""Generation details (`return_details=True`, `gpt2fn.details`): the record holds what plain generation returns plus
log-probs, logits and alternatives consistent with a full forward; stop reasons and lengths are right; continuing
from the record's cache equals generating from the whole sequence (left-padded batches, EOS inside, text level,
sampling), never consumes the cache, and grows it when it lacks room; bad arguments raise clear errors.

Token-level tests use `preset("tiny")` with the token embedding scaled up ("sharp"), so greedy choices are far
above float rounding and agree across code paths; text-level tests a sharp model with GPT-2's 50257 ids."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import (
    DonatedCacheError,
    Generation,
    GPTParams,
    decode_step,
    forward,
    generate,
    generate_tokens,
    grow,
    init_cache,
    init_params,
    preset,
    rollback,
    stream,
)
from gpt2fn.details import continuation_cache
from gpt2fn.model import left_pad
from gpt2fn.tokenizer import decode, encode


def _sharp(params: GPTParams) -> GPTParams:
    return params.replace(tok_emb=params.tok_emb * 30)


@pytest.fixture(scope="module")
def sharp() -> GPTParams:
    return _sharp(init_params(preset("tiny"), seed=0))  # vocab 97, context 32


@pytest.fixture(scope="module")
def wordy() -> GPTParams:
    return _sharp(init_params(preset("mini", emb_dim=32, n_heads=2, context_length=64), seed=1))


def _ids(seed: int, batch: int, seq: int, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rows(seed: int, lengths: list[int]) -> list[list[int]]:
    return [_ids(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------------------------------
# The record


def test_details_hold_the_plain_result_and_logits_consistent_with_a_full_forward(sharp):
    ids = _ids(0, 2, 5)
    r = generate_tokens(sharp, ids, max_new_tokens=6, return_details=True, output_logits=True, top_logprobs=3)
    plain, logprobs = generate_tokens(sharp, ids, max_new_tokens=6, return_logprobs=True)
    assert isinstance(r, Generation) and r.texts is None
    assert torch.equal(torch.cat([ids, r.ids], 1), plain)
    torch.testing.assert_close(r.logprobs, logprobs)
    assert r.logits is not None and r.top_ids is not None and r.top_logprobs is not None
    assert r.logits.shape == (2, 6, 97) and r.top_ids.shape == r.top_logprobs.shape == (2, 6, 3)
    full = forward(sharp, plain)[:, 4:-1]  # the logits that chose each new token
    torch.testing.assert_close(r.logits, full, rtol=1e-4, atol=1e-3)
    scores = torch.log_softmax(r.logits, -1)
    torch.testing.assert_close(scores.gather(-1, r.ids[..., None])[..., 0], r.logprobs)
    torch.testing.assert_close(r.top_logprobs, scores.topk(3, dim=-1).values)
    assert torch.equal(r.top_ids[..., 0], r.ids)  # greedy: the most likely id is the one chosen
    assert r.lengths == (6, 6) and r.stop_reasons == ("length", "length")


def test_without_output_logits_or_top_logprobs_the_record_leaves_them_out(sharp):
    r = generate_tokens(sharp, _ids(1, 1, 3), max_new_tokens=2, return_details=True)
    assert r.logits is None and r.top_ids is None and r.top_logprobs is None and r.cache is not None


def test_stop_reasons_and_lengths_at_token_level(sharp):
    ids = _ids(3, 2, 4)
    free = generate_tokens(sharp, ids, max_new_tokens=10)[:, 4:]
    eos = next(t for t in free[0].tolist() if t not in free[1].tolist())
    first = free[0].tolist().index(eos)
    r = generate_tokens(sharp, ids, max_new_tokens=10, eos=eos, return_details=True)
    assert r.stop_reasons == ("eos", "length")
    assert r.lengths == (first + 1, 10)
    assert r.ids[0, :first + 1].tolist() == free[0, :first + 1].tolist()


def test_stop_reasons_at_text_level_and_the_same_texts_as_plain_generate(wordy):
    prompts = ["Hello, it is time", "Once upon"]
    free = generate(wordy, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    stop = free[0][4:7]
    assert stop and stop not in free[1]
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=3, stop=stop)
    r = generate(wordy, prompts, return_details=True, **kwargs)
    assert r.texts == tuple(generate(wordy, prompts, **kwargs))
    assert r.stop_reasons == ("stop", "length")
    n = r.lengths[0]
    assert stop in decode(r.ids[0, :n].tolist()) and stop not in decode(r.ids[0, :n - 1].tolist())
    single = generate(wordy, "Hello", max_new_tokens=3, return_details=True)
    assert single.texts == (generate(wordy, "Hello", max_new_tokens=3),)


# ---------------------------------------------------------------------------------------------------------------
# Continuing from the cache


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3), more=st.lists(st.integers(1, 5), min_size=3,
                                                                                  max_size=3),
       first=st.integers(1, 6), second=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), with_eos=st.booleans())
def test_continuing_from_the_cache_equals_generating_from_the_whole_sequence(sharp, lengths, more, first, second,
                                                                          seed, with_eos):
    rows = _rows(seed, lengths)
    ids, mask = left_pad(rows)
    eos = None
    if with_eos:  # row 0 stops at its first or second new token; the others may stop or not
        eos = int(generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=first)[0, ids.shape[1] + min(1, first - 1)])
    r = generate_tokens(sharp, ids, pad_mask=mask, max_new_tokens=first, eos=eos, return_details=True)
    extra = _rows(seed + 50, more[:len(rows)])
    more_ids, more_mask = left_pad(extra)
    c = generate_tokens(sharp, more_ids, pad_mask=more_mask, cache=r.cache, max_new_tokens=second, eos=eos,
                        return_details=True, output_logits=True)
    assert not r.cache.consumed
    for i, row in enumerate(rows):
        whole = row + r.ids[i, :r.lengths[i]].tolist() + extra[i]
        fresh = generate_tokens(sharp, torch.tensor([whole]), max_new_tokens=second, eos=eos, return_details=True,
                                output_logits=True)
        n = c.lengths[i]
        assert (n, c.stop_reasons[i]) == (fresh.lengths[0], fresh.stop_reasons[0])
        assert c.ids[i, :n].tolist() == fresh.ids[0, :n].tolist()
        torch.testing.assert_close(c.logits[i, :n], fresh.logits[0, :n], rtol=1e-4, atol=1e-3)


def test_a_cache_continues_twice_the_same_way_and_is_never_consumed(sharp):
    r = generate_tokens(sharp, _ids(4, 2, 5), max_new_tokens=4, return_details=True)
    more = _ids(5, 2, 3)
    a = generate_tokens(sharp, more, cache=r.cache, max_new_tokens=5)
    b = generate_tokens(sharp, more, cache=r.cache, max_new_tokens=5)
    assert torch.equal(a, b) and not r.cache.consumed
    chained = generate_tokens(sharp, more, cache=r.cache, max_new_tokens=5, return_details=True)
    again = generate_tokens(sharp, _ids(6, 2, 2), cache=chained.cache, max_new_tokens=3)
    whole = torch.cat([_ids(4, 2, 5), r.ids, more, chained.ids, _ids(6, 2, 2)], 1)
    assert torch.equal(again[:, 2:], generate_tokens(sharp, whole, max_new_tokens=3)[:, whole.shape[1]:])


def test_a_sampled_continuation_equals_sampling_from_the_whole_sequence_with_the_same_seed(sharp):
    ids, more = _ids(7, 1, 4), _ids(8, 1, 3)
    r = generate_tokens(sharp, ids, max_new_tokens=4, temperature=0.9, seed=1, return_details=True)
    c = generate_tokens(sharp, more, cache=r.cache, max_new_tokens=6, temperature=0.9, top_k=20, seed=7)
    whole = torch.cat([ids, r.ids, more], 1)
    fresh = generate_tokens(sharp, whole, max_new_tokens=6, temperature=0.9, top_k=20, seed=7)
    assert c[0, 3:].tolist() == fresh[0, whole.shape[1]:].tolist()


def test_text_continuation_equals_generating_from_the_concatenated_tokens(wordy):
    prompts, follow = ["Hello, it is", "Once"], [" and then", " upon a"]
    r = generate(wordy, prompts, max_new_tokens=5, eos=False, return_details=True)
    c = generate(wordy, follow, cache=r.cache, max_new_tokens=5, eos=False, return_details=True)
    for i in range(2):
        whole = encode(prompts[i]) + r.ids[i].tolist() + encode(follow[i])
        fresh = generate_tokens(wordy, torch.tensor([whole]), max_new_tokens=5)[0, len(whole):]
        assert c.ids[i].tolist() == fresh.tolist()
        assert c.texts[i] == decode(fresh.tolist())
    hi = generate(wordy, "Hi", max_new_tokens=3, eos=False, return_details=True).cache
    assert "".join(stream(wordy, " and then", cache=hi, max_new_tokens=4)) == generate(
        wordy, " and then", cache=hi, max_new_tokens=4)


def test_zero_new_tokens_with_details_gives_the_prompt_cache(sharp):
    ids, more = _ids(9, 2, 6), _ids(10, 2, 2)
    r = generate_tokens(sharp, ids, max_new_tokens=0, return_details=True)
    assert r.ids.shape == (2, 0) and r.lengths == (0, 0) and int(r.cache.length) == 6
    c = generate_tokens(sharp, more, cache=r.cache, max_new_tokens=4)
    assert torch.equal(c[:, 2:], generate_tokens(sharp, torch.cat([ids, more], 1), max_new_tokens=4)[:, 8:])


def test_the_continuation_cache_is_used_as_is_with_room_and_grown_without(sharp):
    cfg = sharp.config
    cache = decode_step(sharp, init_cache(cfg, 2, 20), _ids(11, 2, 6))[1]
    same, donate = continuation_cache(cache, cfg, batch=2, seq=4, max_new_tokens=10, device=cache.valid.device,
                                      dtype=torch.float32)
    assert same is cache and not donate
    bigger, donate = continuation_cache(cache, cfg, batch=2, seq=4, max_new_tokens=12, device=cache.valid.device,
                                        dtype=torch.float32)
    assert bigger.capacity == 22 and donate
    with pytest.raises(ValueError, match="past the context window of 32"):
        continuation_cache(cache, cfg, batch=2, seq=10, max_new_tokens=20, device=cache.valid.device,
                           dtype=torch.float32)


def test_grow_copies_the_written_slots_and_leaves_the_cache_as_it_was(sharp):
    ids = _ids(12, 2, 7)
    _, cache = decode_step(sharp, init_cache(sharp.config, 2, 6), ids[:, :5])
    grown = grow(cache, 9)
    assert grown.capacity == 9 and int(grown.length) == 5 and not cache.consumed
    a, _ = decode_step(sharp, cache, ids[:, 5:6])
    b, after = decode_step(sharp, grown, ids[:, 5:7])
    torch.testing.assert_close(a[:, 0], b[:, 0])
    torch.testing.assert_close(b, forward(sharp, ids)[:, 5:7], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="capacity >= the cache's 6"):
        grow(cache, 4)


def test_a_generation_that_slid_past_the_window_returns_no_cache(sharp):
    r = generate_tokens(sharp, _ids(13, 1, 28), max_new_tokens=10, return_details=True)
    assert r.cache is None and r.ids.shape == (1, 10)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_details_and_cache_arguments_raise_clear_errors(sharp):
    ids = _ids(14, 2, 3)
    r = generate_tokens(sharp, ids, max_new_tokens=2, return_details=True)
    with pytest.raises(TypeError, match="cache must be a gpt2fn.KVCache"):
        generate_tokens(sharp, ids, cache="cache")
    with pytest.raises(ValueError, match="num_beams > 1 does not combine with return_details=True or cache="):
        generate_tokens(sharp, ids, cache=r.cache, num_beams=2)
    with pytest.raises(ValueError, match="add return_details=True"):
        generate_tokens(sharp, ids, output_logits=True)
    with pytest.raises(ValueError, match=r"top_logprobs must be None or an integer in \[1, 97\]"):
        generate_tokens(sharp, ids, return_details=True, top_logprobs=0)
    with pytest.raises(ValueError, match="drop return_logprobs"):
        generate_tokens(sharp, ids, return_details=True, return_logprobs=True)
    with pytest.raises(ValueError, match="cache= holds 2 rows but 1 prompts"):
        generate_tokens(sharp, ids[:1], cache=r.cache)
    with pytest.raises(ValueError, match="past the context window"):
        generate_tokens(sharp, _ids(15, 2, 20), cache=r.cache, max_new_tokens=8)
    other = init_params(preset("tiny", n_layers=3), seed=0)
    with pytest.raises(ValueError, match="continue with the params that made the cache"):
        generate_tokens(other, ids, cache=r.cache)
    decode_step(sharp, rollback(r.cache, 3), ids[:, :1], donate=True)  # shares r.cache's buffers: consumes it
    with pytest.raises(DonatedCacheError):
        generate_tokens(sharp, ids, cache=r.cache)
    with pytest.raises(TypeError, match="cache must be a gpt2fn.KVCache"):
        list(stream(sharp, "x", cache=3))


@pytest.mark.parametrize(("options", "match"), [
    (dict(return_details=True, draft="prompt_lookup"), "do not combine with draft="),
    (dict(return_details=True, capture=["blocks.0.resid_pre"]), "do not combine with draft= .*or capture="),
    (dict(processors=[lambda logits, ids: logits], draft="prompt_lookup"), "drop processors= or draft="),
])
def test_details_cache_and_processors_refuse_draft_and_capture_by_name(sharp, options, match):
    """One-token-step features (details, the continuation cache, processors) and the multi-token or capturing loops
    are refused together with a ValueError naming what to drop, not half applied."""
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=match):
        generate_tokens(sharp, ids, max_new_tokens=3, **options)

"""The pure decode step: a cache value that steps out of place, donates on request, rolls back, reorders and
compiles once. Cache, batch and padding properties run with 1 and 2 torch threads (CPU decoding runs on two: the
native kernel splits each matrix's columns between them), on the weights as `init_params` returns them."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import (
    DonatedCacheError,
    decode_step,
    forward,
    generate_tokens,
    init_cache,
    init_params,
    preset,
    rollback,
    select_rows,
)
from gpt2fn.model import left_pad


@pytest.fixture(scope="module", params=[24, 48], ids=["d24", "d48"])
def params(request):
    """The tiny model (its block widths 24/72/96 leave columns past the last whole vector: the kernel's tail) and one
    of width 48 (48/144/192: whole vectors and bands only)."""
    return init_params(preset("tiny").replace(emb_dim=request.param), seed=0)


def _ids(seed: int, batch: int, seq: int, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _equal_caches(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True))


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 8), new=st.integers(1, 8))
def test_a_pure_step_equals_full_recomputation_at_every_step(params, threads, seed, prompt, new):
    ids = _ids(seed, 2, prompt + new)
    cache = init_cache(params.config, 2, prompt + new)
    logits, cache = decode_step(params, cache, ids[:, :prompt])
    full = forward(params, ids)
    torch.testing.assert_close(logits, full[:, :prompt], atol=2e-5, rtol=1e-4)
    for t in range(prompt, prompt + new):
        logits, cache = decode_step(params, cache, ids[:, t:t + 1])
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=2e-5, rtol=1e-4)
    assert int(cache.length) == prompt + new and cache.positions.tolist() == [prompt + new] * 2


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 6))
def test_a_step_leaves_its_input_cache_bit_for_bit_unchanged_and_donation_gives_the_same_values(
        params, threads, seed, prompt):
    ids = _ids(seed, 3, prompt + 1)
    _, cache = decode_step(params, init_cache(params.config, 3, 10), ids[:, :prompt])
    before = pytree.tree_map(torch.clone, cache)
    out_logits, out_cache = decode_step(params, cache, ids[:, prompt:])
    assert _equal_caches(cache, before)  # out of place: the input is still the cache it was
    again, _ = decode_step(params, cache, ids[:, prompt:])  # and stays usable
    assert torch.equal(again, out_logits)
    don_logits, don_cache = decode_step(params, cache, ids[:, prompt:], donate=True)
    assert torch.equal(don_logits, out_logits) and _equal_caches(don_cache, out_cache)
    assert cache.consumed and not don_cache.consumed


def test_donation_writes_into_the_input_buffers_and_any_later_use_names_donation(params):
    cache = init_cache(params.config, 1, 8)
    ptr = cache.keys[0].data_ptr()
    _, new = decode_step(params, cache, _ids(0, 1, 3), donate=True)
    assert new.keys[0].data_ptr() == ptr and new.valid.data_ptr() == cache.valid.data_ptr()
    uses = [
        lambda: decode_step(params, cache, _ids(1, 1, 1)),
        lambda: pytree.tree_map(lambda t: t, cache),
        lambda: rollback(cache, 1),
        lambda: select_rows(cache, torch.tensor([0])),
        lambda: forward(params, _ids(1, 1, 1), cache=cache),
    ]
    for use in uses:
        with pytest.raises(DonatedCacheError, match="donate"):
            use()
    decode_step(params, new, _ids(1, 1, 1))  # the returned cache is live


def test_a_rolled_back_cache_shares_its_buffers_so_donating_it_consumes_the_source(params):
    _, cache = decode_step(params, init_cache(params.config, 1, 8), _ids(0, 1, 4))
    back = rollback(cache, 2)
    decode_step(params, back, _ids(1, 1, 1), donate=True)
    with pytest.raises(DonatedCacheError):
        decode_step(params, cache, _ids(1, 1, 1))


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 6), new=st.integers(1, 5), keep=st.data())
def test_rollback_then_decoding_again_equals_the_original_run(params, threads, seed, prompt, new, keep):
    ids = _ids(seed, 2, prompt + new)
    cache = init_cache(params.config, 2, prompt + new)
    steps = []
    _, cache = decode_step(params, cache, ids[:, :prompt])
    for t in range(prompt, prompt + new):
        logits, cache = decode_step(params, cache, ids[:, t:t + 1])
        steps.append(logits)
    n = keep.draw(st.integers(prompt, prompt + new - 1), label="rollback to")
    redo = rollback(cache, n)
    assert int(redo.length) == n and redo.positions.tolist() == [n, n]
    for t in range(n, prompt + new):
        logits, redo = decode_step(params, redo, ids[:, t:t + 1])
        torch.testing.assert_close(logits, steps[t - prompt], atol=1e-6, rtol=1e-6)


@given(seed=st.integers(0, 2**31 - 1), order=st.permutations([0, 1, 2]), repeat=st.booleans())
def test_reordering_rows_commutes_with_stepping(params, threads, seed, order, repeat):
    ids = _ids(seed, 3, 5)
    rows = torch.tensor([order[0], order[0], order[1]] if repeat else order)
    _, cache = decode_step(params, init_cache(params.config, 3, 8), ids[:, :4])
    step_then_pick, cache_a = decode_step(params, cache, ids[:, 4:])
    pick_then_step, cache_b = decode_step(params, select_rows(cache, rows), ids[rows, 4:])
    torch.testing.assert_close(pick_then_step, step_then_pick[rows], atol=1e-6, rtol=1e-6)
    for a, b in zip(pytree.tree_leaves(select_rows(cache_a, rows)), pytree.tree_leaves(cache_b), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 7), min_size=2, max_size=3))
def test_a_left_padded_batch_decodes_each_row_as_the_prompt_alone(params, threads, seed, lengths):
    rows = [_ids(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    nxt = _ids(seed, len(rows), 2)
    logits, cache = decode_step(params, init_cache(params.config, len(rows), ids.shape[1] + 2), ids, pad_mask=mask,
                                last_only=True)
    for t in range(2):
        step, cache = decode_step(params, cache, nxt[:, t:t + 1])
        for i, r in enumerate(rows):
            alone = forward(params, torch.tensor([r + nxt[i, :t + 1].tolist()]))
            torch.testing.assert_close(step[i, 0], alone[0, -1], atol=2e-5, rtol=1e-4)


def test_a_full_cache_says_how_to_make_room(params):
    _, cache = decode_step(params, init_cache(params.config, 1, 4), _ids(0, 1, 4))
    with pytest.raises(ValueError, match="capacity 4 holds 4 slots.*rollback"):
        decode_step(params, cache, _ids(0, 1, 1))
    with pytest.raises(ValueError, match="batch 1 but ids have batch 2"):
        decode_step(params, rollback(cache, 0), _ids(0, 2, 1))


def test_decoding_under_generate_never_allocates_a_new_cache_per_token(params, monkeypatch):
    import sys

    G = sys.modules["gpt2fn.generate"]  # the module (gpt2fn.generate is also the function)
    made = []
    real = G.init_cache
    monkeypatch.setattr(G, "init_cache", lambda *a, **k: made.append(1) or real(*a, **k))
    generate_tokens(params, _ids(0, 2, 3), max_new_tokens=40)  # slides past the window of 32 too
    assert made == [1]


# ---------------------------------------------------------------------------------------------------------------
# Compilation: one graph per (batch, capacity, dtype, device), tokens identical to eager


VARIANTS = {
    "tied, biases": dict(),
    "untied, no biases": dict(tie_head=False, bias=False, qkv_bias=False),
    "qkv bias only": dict(bias=False, qkv_bias=True, tie_head=False),
    "whole vectors": dict(emb_dim=48),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_decoding_gives_eager_tokens_with_one_graph_and_no_recompilation(variant):
    from torch._dynamo.utils import counters

    cfg = dataclasses.replace(preset("tiny"), context_length=80, **VARIANTS[variant])
    p = init_params(cfg, seed=1)
    p = p.replace(tok_emb=p.tok_emb * 8)  # sharp logits: greedy ties cannot flip on float rounding
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12], [13]])
    eager = generate_tokens(p, ids, pad_mask=mask, max_new_tokens=64)
    graphs = counters["stats"]["unique_graphs"]
    compiled = generate_tokens(p, ids, pad_mask=mask, max_new_tokens=64, compile=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # at most one new graph for this shape ...
    assert not counters["graph_break"]  # ... with no graph break
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate_tokens(p, ids, pad_mask=mask, max_new_tokens=64, compile=True)
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == graphs


@settings(max_examples=1)
@given(seed=st.just(0))
def test_decode_step_compiles_with_fullgraph_as_written(params, seed):
    step = torch.compile(gpt2fn.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    cache = init_cache(params.config, 2, 6)
    ids = _ids(seed, 2, 6)
    _, cache = decode_step(params, cache, ids[:, :3])
    ref = cache
    for t in range(3, 6):
        logits, cache = step(params, cache, ids[:, t:t + 1])
        expect, ref = decode_step(params, ref, ids[:, t:t + 1])
        torch.testing.assert_close(logits, expect, atol=1e-6, rtol=1e-6)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 6), new=st.integers(1, 4), batch=st.integers(1, 3),
       cache_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_donated_one_token_steps_have_the_bits_of_out_of_place_ones_on_every_cache_dtype(
        params, threads, seed, prompt, new, batch, cache_dtype):
    """A donated one-token step without a tap takes the one-call native attention (the key and value written,
    attended and the heads merged together, `gpt2fn.kernels.native_attend_append`); an out-of-place step writes a
    new cache with torch and attends after. Logits and every buffer agree bit for bit, left padding included."""
    ids = _ids(seed, batch, prompt + new)
    pad = torch.ones(batch, prompt, dtype=torch.bool)
    pad[0, :prompt // 2] = False
    donated = init_cache(params.config, batch, prompt + new, dtype=cache_dtype)
    pure = init_cache(params.config, batch, prompt + new, dtype=cache_dtype)
    got, donated = decode_step(params, donated, ids[:, :prompt], pad_mask=pad, donate=True)
    want, pure = decode_step(params, pure, ids[:, :prompt], pad_mask=pad)
    assert torch.equal(got, want)
    for t in range(prompt, prompt + new):
        got, donated = decode_step(params, donated, ids[:, t:t + 1], donate=True)
        want, pure = decode_step(params, pure, ids[:, t:t + 1])
        assert torch.equal(got, want) and _equal_caches(donated, pure)

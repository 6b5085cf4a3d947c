"""Head detectors: exact scores on constructed patterns, a naive loop on random ones, and a model whose every head
attends uniformly (zero queries and keys), whose scores have a closed form."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn.study import (
    duplicate_token_score,
    head_detector_scores,
    induction_score,
    offset_attention,
    previous_token_score,
    repeated_tokens,
    run_with_capture,
)


def _one_hot_rows(seq: int, key_of) -> torch.Tensor:
    """A `[seq, seq]` pattern whose row q puts all its weight on key `key_of(q)`."""
    p = torch.zeros(seq, seq)
    for q in range(seq):
        p[q, key_of(q)] = 1.0
    return p


def test_constructed_previous_duplicate_and_induction_heads_score_one_on_their_own_detector():
    T, P, batch = 5, 1, 2  # one prefix token, then r r with 5 tokens each
    seq = P + 2 * T
    second = range(P + T, seq)
    previous = _one_hot_rows(seq, lambda q: max(q - 1, 0))
    duplicate = _one_hot_rows(seq, lambda q: q - T if q in second else q)
    induction = _one_hot_rows(seq, lambda q: q - T + 1 if q in second else q)
    pattern = torch.stack([previous, duplicate, induction]).expand(batch, -1, -1, -1)  # [batch heads seq seq]
    torch.testing.assert_close(previous_token_score(pattern), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(duplicate_token_score(pattern, T, prefix=P), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(induction_score(pattern, T, prefix=P), torch.tensor([0.0, 0.0, 1.0]))


def test_a_uniform_head_scores_the_mean_of_one_over_the_number_of_keys():
    T, seq = 4, 8
    uniform = torch.tril(torch.ones(seq, seq)) / torch.arange(1, seq + 1)[:, None]
    pattern = uniform[None, None]  # [batch=1 heads=1 seq seq]
    inv = 1.0 / torch.arange(1, seq + 1, dtype=torch.float64)  # row q has q + 1 keys
    assert previous_token_score(pattern).item() == pytest.approx(inv[1:].mean().item(), rel=1e-6)
    assert duplicate_token_score(pattern, T).item() == pytest.approx(inv[T:].mean().item(), rel=1e-6)
    assert induction_score(pattern, T).item() == pytest.approx(inv[T:].mean().item(), rel=1e-6)


@given(layers=st.integers(1, 3), batch=st.integers(1, 3), heads=st.integers(1, 4), T=st.integers(2, 6),
       prefix=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_scores_equal_a_naive_loop_over_layers_batch_heads_and_queries(layers, batch, heads, T, prefix, seed):
    seq = prefix + 2 * T
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, batch, heads, seq, seq, generator=g, dtype=torch.float64)
    pattern = scores.masked_fill(~torch.tril(torch.ones(seq, seq, dtype=torch.bool)), float("-inf")).softmax(-1)
    want = torch.zeros(3, layers, heads, dtype=torch.float64)
    for i in range(layers):
        for h in range(heads):
            prev = [pattern[i, b, h, q, q - 1] for b in range(batch) for q in range(1, seq)]
            dup = [pattern[i, b, h, q, q - T] for b in range(batch) for q in range(prefix + T, seq)]
            ind = [pattern[i, b, h, q, q - T + 1] for b in range(batch) for q in range(prefix + T, seq)]
            want[:, i, h] = torch.stack([torch.stack(x).mean() for x in (prev, dup, ind)])
    got = torch.stack([previous_token_score(pattern), duplicate_token_score(pattern, T, prefix=prefix),
                       induction_score(pattern, T, prefix=prefix)])
    torch.testing.assert_close(got, want)


def test_repeated_tokens_repeat_distinct_tokens_after_the_prefix_and_follow_the_seed():
    ids = repeated_tokens(50, seq_len=7, batch=4, seed=3, prefix=torch.tensor([49]))
    assert ids.shape == (4, 15) and ids.dtype == torch.long
    assert (ids[:, 0] == 49).all()
    torch.testing.assert_close(ids[:, 1:8], ids[:, 8:])
    assert all(len(set(row[1:8].tolist())) == 7 for row in ids)  # distinct within a copy
    torch.testing.assert_close(ids, repeated_tokens(50, seq_len=7, batch=4, seed=3, prefix=torch.tensor([49])))
    assert not torch.equal(ids, repeated_tokens(50, seq_len=7, batch=4, seed=4, prefix=torch.tensor([49])))
    few = repeated_tokens(torch.tensor([5, 9]), seq_len=6, batch=3, seed=0)  # fewer ids than seq_len: with repeats
    assert set(few.flatten().tolist()) <= {5, 9} and torch.equal(few[:, :6], few[:, 6:])
    with pytest.raises(ValueError, match="seq_len >= 2"):
        repeated_tokens(50, seq_len=1, batch=2)


def test_a_model_with_zero_queries_and_keys_has_uniform_heads_and_the_closed_form_scores(tiny_config, device):
    cfg = tiny_config
    params = gpt2fn.init_params(cfg, seed=0, device=device)
    d = cfg.emb_dim
    blocks = tuple(b.replace(attn=b.attn.replace(
        w_qkv=torch.cat([torch.zeros_like(b.attn.w_qkv[:, :2 * d]), b.attn.w_qkv[:, 2 * d:]], dim=1),
        b_qkv=torch.cat([torch.zeros_like(b.attn.b_qkv[:2 * d]), b.attn.b_qkv[2 * d:]]))) for b in params.blocks)
    params = params.replace(blocks=blocks)
    T = 6
    scores = head_detector_scores(params, seq_len=T, batch=3, seed=1)
    assert all(s.shape == (cfg.n_layers, cfg.n_heads) for s in scores)
    inv = 1.0 / torch.arange(1, 2 * T + 1, dtype=torch.float64)
    for got, want in zip(scores, (inv[1:].mean(), inv[T:].mean(), inv[T:].mean()), strict=True):
        torch.testing.assert_close(got.double().cpu(), want.expand(cfg.n_layers, cfg.n_heads), rtol=1e-5, atol=1e-6)


def test_head_detector_scores_read_the_captured_patterns_of_the_ids_given(tiny_params, device):
    T, prefix = 5, torch.tensor([0])
    ids = repeated_tokens(tiny_params.config.vocab_size, seq_len=T, batch=2, seed=7, prefix=prefix, device=device)
    scores = head_detector_scores(tiny_params, seq_len=T, prefix=prefix, ids=ids)
    _, acts = run_with_capture(tiny_params, ids, "blocks.*.attn.pattern")
    pattern = torch.stack([acts[f"blocks.{i}.attn.pattern"] for i in range(tiny_params.config.n_layers)])
    torch.testing.assert_close(scores.induction, offset_attention(pattern, T - 1, start=1 + T))
    torch.testing.assert_close(scores.duplicate_token, offset_attention(pattern, T, start=1 + T))
    torch.testing.assert_close(scores.previous_token, offset_attention(pattern, 1, start=1))
    # the default draw: seeded, so the same scores twice
    a, b = (head_detector_scores(tiny_params, seq_len=T, batch=2, seed=3) for _ in range(2))
    torch.testing.assert_close(a.induction, b.induction)


def test_detectors_reject_patterns_that_are_not_a_repeated_sequence(tiny_params):
    pattern = torch.ones(1, 2, 9, 9) / 9
    with pytest.raises(ValueError, match="seq_len=4 after 0 prefix tokens has 8"):
        induction_score(pattern, 4)
    with pytest.raises(ValueError, match="offset"):
        offset_attention(pattern, 3, start=1)
    with pytest.raises(ValueError, match=r"ids \[2, 7\] must be \[batch, prefix \+ 2 \* seq_len\]"):
        head_detector_scores(tiny_params, seq_len=4, ids=torch.zeros(2, 7, dtype=torch.long))

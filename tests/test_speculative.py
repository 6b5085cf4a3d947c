"""Speculative decoding: greedy output is the target's own greedy output for any draft (random pairs sharing a
vocabulary, left-padded batches whose rows accept different counts, EOS inside an accepted run, prompt lookup,
caches rebuilt when rejected slots fill them); sampled output has the target's distribution (a chi-square test on
a tiny vocabulary, which the draft's own distribution fails); bad options are refused with the fix.

Models are `preset("tiny")` with the token embedding scaled up ("sharp" logits, as in test_generate.py), so that
greedy choices are far from ties and stable across code paths (a multi-token verification step and one-token
steps round differently in the last bits)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import GPTParams, forward, generate, generate_tokens, init_params, preset, rollback, stream
from gpt2fn.cache import init_cache
from gpt2fn.model import left_pad
from gpt2fn.sampling import SamplingOptions, filter_logits
from gpt2fn.speculative import PromptLookup, lookup_proposals
from gpt2fn.step import decode_step


def _model(seed: int, sharp: float = 30.0, **cfg) -> GPTParams:
    p = init_params(preset("tiny", **{"context_length": 64, **cfg}), seed=seed)
    return p.replace(tok_emb=p.tok_emb * sharp)


def _noisy_copy(p: GPTParams, scale: float, seed: int = 0) -> GPTParams:
    """The target with noise on its token embedding: right often, not always (rows accept different counts)."""
    noise = torch.randn(p.tok_emb.shape, generator=torch.Generator().manual_seed(seed))
    return p.replace(tok_emb=p.tok_emb + scale * p.tok_emb.std() * noise)


TARGET = _model(0)
DRAFTS = {  # one shared vocabulary; smaller, equal, wider, noisy and padded-vocabulary drafts
    "one-layer": _model(5, n_layers=1),
    "the-target": TARGET,  # every proposal passes
    "wider": _model(7, n_layers=3, emb_dim=32, n_heads=4),
    "noisy-copy": _noisy_copy(TARGET, 0.3),
    "padded-vocab": _model(3, n_layers=1, vocab_size=104, token_vocab_size=97),
}


def _rows(seed: int, lengths: list[int], vocab: int = 97) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(DRAFTS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_target_greedy_in_left_padded_batches(name, k):
    ids, mask = left_pad(_rows(k, [7, 2, 5]))
    plain = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=15)
    spec = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=15, draft=DRAFTS[name], draft_tokens=k)
    assert torch.equal(spec, plain)


@pytest.mark.parametrize("draft", ["prompt_lookup", PromptLookup(max_ngram=2, min_ngram=2)], ids=["default", "2gram"])
def test_prompt_lookup_greedy_equals_target_greedy(draft):
    repetitive = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [1, 2, 3, 1, 2], [9, 9]]
    ids, mask = left_pad(repetitive)
    plain = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=20)
    assert torch.equal(generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=20, draft=draft, draft_tokens=4),
                       plain)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       new=st.integers(1, 20), k=st.integers(1, 7))
def test_speculative_greedy_equals_target_greedy_for_any_batch_length_and_k(seed, lengths, new, k):
    ids, mask = left_pad(_rows(seed, lengths))
    plain = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=new)
    spec = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=new, draft=DRAFTS["noisy-copy"],
                           draft_tokens=k)
    assert spec.shape == plain.shape == (len(lengths), ids.shape[1] + new)  # max_new_tokens exactly
    assert torch.equal(spec, plain)


def test_eos_inside_an_accepted_run_ends_the_row_there():
    ids, mask = left_pad(_rows(3, [5, 3]))
    free = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=12)
    eos = int(free[0, 5 + 3])  # row 0's fourth new token: inside the first run of 6 the draft (= target) proposes
    plain = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=12, eos=eos)
    spec = generate_tokens(TARGET, ids, pad_mask=mask, max_new_tokens=12, eos=eos, draft=TARGET, draft_tokens=6)
    assert torch.equal(spec, plain)
    first = plain[0, 5:].tolist().index(eos)
    assert first <= 3 and plain[0, 5 + first:].tolist() == [eos] * (plain.shape[1] - 5 - first)


def test_generation_ends_when_every_row_has_ended_as_plain_decoding_does():
    ids = torch.tensor(_rows(11, [4]))
    free = generate_tokens(TARGET, ids, max_new_tokens=10)
    eos = int(free[0, 4 + 2])
    plain = generate_tokens(TARGET, ids, max_new_tokens=10, eos=eos)
    spec = generate_tokens(TARGET, ids, max_new_tokens=10, eos=eos, draft=TARGET, draft_tokens=5)
    assert plain.shape[1] < 4 + 10 and torch.equal(spec, plain)


def test_filters_and_logprobs_hold_while_decoding_speculatively():
    ids, mask = left_pad(_rows(9, [6, 4]))
    kw = dict(pad_mask=mask, max_new_tokens=12, repetition_penalty=1.8, no_repeat_ngram_size=2, suppress=[3, 4],
              return_logprobs=True)
    plain, plain_lp = generate_tokens(TARGET, ids, **kw)
    spec, spec_lp = generate_tokens(TARGET, ids, draft=DRAFTS["noisy-copy"], draft_tokens=3, **kw)
    assert torch.equal(spec, plain)
    torch.testing.assert_close(spec_lp, plain_lp, atol=1e-4, rtol=1e-4)


def _cycling(seed: int, **cfg) -> GPTParams:
    """A sharp model whose head maps each token's embedding to a fixed other token: greedy decoding walks a
    permutation's cycle instead of repeating the last token (what random sharp models do), so a noisy copy of it
    is right on some tokens and wrong on others."""
    p = _model(seed, tie_head=False, **cfg)
    perm = torch.randperm(p.tok_emb.shape[0], generator=torch.Generator().manual_seed(seed))
    return p.replace(head=p.tok_emb[perm.argsort()].T.contiguous())


def test_caches_are_rebuilt_when_gaps_fill_them_and_greedy_output_stays_the_targets(monkeypatch):
    """A context of exactly prompt + new tokens: rows that accept different counts leave gaps, the slots run out,
    and both caches are rebuilt mid-generation (spies prove each rebuild ran); the output is still exact."""
    import gpt2fn.speculative as spec

    rebuilt = {"target": 0, "draft": 0}
    real_refill, real_rollback = spec._refill, spec.rollback

    def refill(params, cache, *a, **kw):
        rebuilt["target"] += int(cache.length) > 0  # its first call is the prompt's prefill into the empty cache
        return real_refill(params, cache, *a, **kw)

    def roll(cache, n):  # the draft's rebuild empties its filled cache (the draft has one layer, the target two)
        rebuilt["draft"] += isinstance(n, int) and n == 0 and len(cache.keys) == 1 and int(cache.length) > 0
        return real_rollback(cache, n)

    monkeypatch.setattr(spec, "_refill", refill)
    monkeypatch.setattr(spec, "rollback", roll)
    width, new = 6, 26
    target = _cycling(0, context_length=width + new)
    draft = _noisy_copy(target, 1.5)
    draft = draft.replace(blocks=draft.blocks[:1], config=dataclasses.replace(draft.config, n_layers=1))
    ids, mask = left_pad(_rows(4, [width, 3, 5]))
    plain = generate_tokens(target, ids, pad_mask=mask, max_new_tokens=new)
    assert len(set(plain[0, width:].tolist())) > new // 2  # the target does not just repeat a token
    got = generate_tokens(target, ids, pad_mask=mask, max_new_tokens=new, draft=draft, draft_tokens=6)
    assert rebuilt["target"] >= 1 and rebuilt["draft"] >= 1
    assert torch.equal(got, plain)


def test_text_generation_and_stream_take_a_draft():
    target = init_params(preset("mini", emb_dim=32, n_heads=2, context_length=64), seed=1)
    draft = init_params(preset("mini", emb_dim=16, n_heads=2, n_layers=1, context_length=64), seed=2)
    text = generate(target, "Hello there", max_new_tokens=8, eos=False)
    assert generate(target, "Hello there", max_new_tokens=8, eos=False, draft=draft) == text
    assert generate(target, ["Hello there", "A"], max_new_tokens=8, eos=False, draft="prompt_lookup") == [
        text, generate(target, "A", max_new_tokens=8, eos=False)]
    assert "".join(stream(target, "Hello there", max_new_tokens=8, eos=False, draft=PromptLookup())) == text


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    t = torch.tensor
    assert lookup_proposals([t([1, 2, 3, 9, 1, 2])], 3, PromptLookup()) == [[3, 9, 1]]
    assert lookup_proposals([t([5, 1, 7, 8, 2, 1, 4, 4, 1])], 2, PromptLookup(max_ngram=2)) == [[4, 4]]
    assert lookup_proposals([t([1, 5, 1, 6, 1])], 1, PromptLookup()) == [[6]]  # the latest of two matches
    assert lookup_proposals([t([4, 5, 6]), t([7])], 2, PromptLookup()) == [[], []]  # nothing to match


@pytest.mark.parametrize("draft", ["noisy-copy", "prompt_lookup"])
def test_a_rows_sampled_tokens_do_not_depend_on_the_rest_of_the_batch(draft):
    rows = [[4, 5, 6, 4, 5, 6], [7, 8, 7], [1, 2, 3, 1, 2, 3, 1, 2]]
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=10, temperature=1.3, top_k=20, draft=DRAFTS.get(draft, draft), draft_tokens=3)
    batch = generate_tokens(TARGET, ids, pad_mask=mask, seed=[10, 11, 12], **kw)
    for i, row in enumerate(rows):
        alone = generate_tokens(TARGET, torch.tensor([row]), seed=[10 + i], **kw)
        assert batch[i, -10:].tolist() == alone[0, -10:].tolist()


def test_per_row_rollback_hides_each_rows_forgotten_slots():
    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    ids = torch.tensor(_rows(5, [6, 6]))
    _, cache = decode_step(params, init_cache(cfg, 2, 10), ids)
    back = rollback(cache, torch.tensor([6, 3]))
    assert int(back.length) == 6 and back.positions.tolist() == [6, 3]
    assert back.valid[1, :3].all() and not back.valid[1, 3:].any()
    # row 1 then continues as if its last three tokens had never been fed
    nxt = torch.tensor([[1], [2]])
    got, _ = decode_step(params, back, nxt)
    _, alone = decode_step(params, init_cache(cfg, 1, 10), ids[1:, :3])
    want, _ = decode_step(params, alone, nxt[1:])
    torch.testing.assert_close(got[1], want[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-row counts in"):
        rollback(cache, torch.tensor([7, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        rollback(cache, torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------------------------
# Sampling keeps the target's distribution


def _chi2_quantile(df: int, p: float) -> float:
    """Wilson-Hilferty: the chi-square quantile of upper-tail probability `p` (no scipy needed)."""
    z = {1e-3: 3.090, 1e-6: 4.753}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _joint(params: GPTParams, prompt: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The exact probability of every pair of next two tokens when sampling `params` with `options`."""
    vocab = params.config.n_tokens

    def dist(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(filter_logits(logits.float(), options, n_tokens=vocab), -1)

    first = dist(forward(params, prompt)[:, -1])[0]
    seqs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    return first[:, None] * dist(forward(params, seqs)[:, -1])


def _chi2(counts: torch.Tensor, p: torch.Tensor, n: int) -> tuple[float, int]:
    keep = p * n >= 5  # the rare pairs pooled into one cell, as the chi-square test asks
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([(p * n)[keep], (p * n)[~keep].sum()[None]])
    return float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()), int(keep.sum())


@pytest.mark.parametrize("case", ["draft-model", "prompt-lookup"])
def test_speculative_sampling_has_the_targets_distribution_on_a_tiny_vocabulary(case):
    vocab, n = 6, 3000
    cfg = dict(vocab_size=vocab, context_length=16)
    target = init_params(preset("tiny", **cfg), seed=3)
    target = target.replace(tok_emb=target.tok_emb * 4)  # spread, uneven distributions
    draft = init_params(preset("tiny", n_layers=1, **cfg), seed=8)
    draft = draft.replace(tok_emb=draft.tok_emb * 4)
    options = SamplingOptions(temperature=1.5) if case == "draft-model" else SamplingOptions(1.0, top_k=4)
    prompt = torch.tensor([[1, 4, 2, 1, 4]])  # "1 4" recurs: prompt lookup proposes "2 1"
    p = _joint(target, prompt, options)
    # three new tokens, two proposals: the first round checks two, so a rejection may come after an acceptance
    out = generate_tokens(target, prompt.expand(n, -1), max_new_tokens=3, temperature=options.temperature,
                          top_k=options.top_k, draft=draft if case == "draft-model" else "prompt_lookup",
                          draft_tokens=2, seed=1000)
    counts = torch.zeros(vocab, vocab).index_put_((out[:, 5], out[:, 6]), torch.ones(n), accumulate=True)
    chi2, df = _chi2(counts, p, n)
    assert chi2 < _chi2_quantile(df, 1e-3), (chi2, df)
    if case == "draft-model":  # the test has the power to tell: the draft's own distribution is far off
        q = _joint(draft, prompt, options)
        assert (p - q).abs().sum() > 0.3
        assert _chi2(counts, q, n)[0] > _chi2_quantile(df, 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(draft_tokens=0), ValueError, "draft_tokens must be an integer >= 1"),
    (dict(draft="ngram"), ValueError, "'prompt_lookup'"),
    (dict(draft=42), TypeError, "draft must be a draft model's GPTParams"),
    (dict(draft=init_params(preset("tiny", vocab_size=50), seed=0)), ValueError, "one vocabulary"),
    (dict(max_new_tokens=62), ValueError, "ask for at most 61 new tokens"),
    (dict(draft=init_params(preset("tiny"), seed=0)), ValueError, "the draft's context of 32"),
    (dict(edit={"blocks.0.resid_post": gpt2fn.steer(torch.ones(24))}), ValueError, "drop edit= or draft="),
    (dict(compile=True), ValueError, "drop compile= or draft="),
    (dict(num_beams=2), ValueError, "drop draft= or use num_beams=1"),
    (dict(draft=None, draft_tokens=3), ValueError, "draft_tokens applies to speculative decoding"),
])
def test_bad_speculative_options_name_the_problem_and_the_fix(kwargs, error, message):
    kw = dict(max_new_tokens=40, draft="prompt_lookup") | kwargs
    with pytest.raises(error, match=message):
        generate_tokens(TARGET, torch.tensor([[1, 2, 3]]), **kw)


def test_prompt_lookup_options_are_checked():
    with pytest.raises(ValueError, match="max_ngram must be an integer >= 1"):
        PromptLookup(max_ngram=0)
    with pytest.raises(ValueError, match="exceeds max_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)

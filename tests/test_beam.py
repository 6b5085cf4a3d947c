"""Beam search: the same hypotheses as transformers' `generate(num_beams=k, do_sample=False)` on the same random
weights, over configs, beam counts, EOS, length penalties, early stopping, returned sequences and left-padded
batches; and its errors.

The models are tiny presets with the token embedding scaled by 5 (varied, not flat, logits) and the EOS row
scaled further, so that EOS is likely after some contexts and not others: hypotheses finish at different lengths
and the early-stopping modes give different answers (checked below, so the parity tests are not vacuous).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import init_params, preset, save_hf
from gpt2fn.beam import beam_search
from gpt2fn.model import left_pad

EOS = 7
CONFIGS = {
    "tiny": preset("tiny"),
    "wider": preset("tiny", vocab_size=61, context_length=40, emb_dim=32, n_heads=4, n_layers=3),
}


def _model(cfg, seed, eos_scale):
    params = init_params(cfg, seed=seed)
    emb = params.tok_emb * 5
    emb[EOS] *= eos_scale
    return params.replace(tok_emb=emb)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (gpt2fn params, the same weights as a transformers GPT2LMHeadModel)."""
    from transformers import GPT2LMHeadModel

    out = {}
    for name, cfg in CONFIGS.items():
        for seed in (0, 1):
            params = _model(cfg, seed, 4.0)
            hf = GPT2LMHeadModel.from_pretrained(save_hf(params, tmp_path_factory.mktemp(f"{name}{seed}"))).eval()
            hf.generation_config.eos_token_id = None
            out[name, seed] = params, hf
    return out


def _prompts(seed, lengths, vocab):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths])


def _hf_beams(hf, ids, mask, *, num_beams, max_new_tokens, length_penalty, early_stopping, num_return_sequences,
              eos_id):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask.long(), max_new_tokens=max_new_tokens, num_beams=num_beams,
                           do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=num_return_sequences, eos_token_id=eos_id,
                           pad_token_id=0 if eos_id is None else eos_id)


def _assert_same_as_transformers(params, hf, ids, mask, **options):
    ours = beam_search(params, ids, pad_mask=mask, **options)
    ref = _hf_beams(hf, ids, mask, **options)
    assert ours.shape == ref.shape and torch.equal(ours, ref), (ours, ref)
    return ours


# every config, model and beam count, with and without EOS; length penalties and early stopping cycle through
_OPTIONS = [(0.5, False), (1.0, True), (2.0, "never"), (2.0, False), (0.5, "never"), (1.0, False)]
GRID = [(name, seed, k, eos, *_OPTIONS[i % len(_OPTIONS)])
        for i, (name, seed, k, eos) in enumerate((n, s, k, (EOS, None)[(s + k) % 2]) for n in CONFIGS
                                                 for s in (0, 1) for k in (2, 3, 4))]


@pytest.mark.parametrize("name,seed,k,eos,lp,es", GRID)
def test_beam_hypotheses_equal_transformers_generate(pairs, name, seed, k, eos, lp, es):
    params, hf = pairs[name, seed]
    ids, mask = _prompts(seed + k, (5, 2, 7), params.config.vocab_size)
    _assert_same_as_transformers(params, hf, ids, mask, num_beams=k, max_new_tokens=10, length_penalty=lp,
                                 early_stopping=es, num_return_sequences=1 + (seed + k) % k, eos_id=eos)


@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       k=st.integers(2, 4), lp=st.sampled_from([0.5, 1.0, 2.0, -1.0, 0.0]),
       es=st.sampled_from([False, True, "never"]), data=st.data())
def test_beam_search_equals_transformers_on_random_prompts(pairs, lengths, seed, k, lp, es, data):
    params, hf = pairs["tiny", seed % 2]
    ids, mask = _prompts(seed, lengths, params.config.vocab_size)
    nrs = data.draw(st.integers(1, k))
    _assert_same_as_transformers(params, hf, ids, mask, num_beams=k, max_new_tokens=data.draw(st.integers(1, 14)),
                                 length_penalty=lp, early_stopping=es, num_return_sequences=nrs, eos_id=EOS)


def test_hypotheses_that_finish_early_are_shorter_and_filled_with_eos(pairs):
    params, hf = pairs["tiny", 0]
    ids, mask = _prompts(1, (5,), params.config.vocab_size)
    out = _assert_same_as_transformers(params, hf, ids, mask, num_beams=3, max_new_tokens=12, length_penalty=0.5,
                                       early_stopping=False, num_return_sequences=3, eos_id=EOS)
    new = out[:, ids.shape[1]:]
    assert new.shape[1] < 12  # every returned hypothesis ended before max_new_tokens
    first = (new == EOS).int().argmax(1)
    assert bool((new == EOS).any(1).all())
    for row, f in zip(new, first.tolist(), strict=True):
        assert bool((row[f:] == EOS).all())  # filled with EOS after it


def test_early_stopping_modes_differ_on_these_models(pairs):
    """The parity tests exercise each mode: on these weights they give different hypotheses."""
    params, _ = pairs["tiny", 0]
    ids, mask = _prompts(1, (5, 3, 7), params.config.vocab_size)
    outs = [beam_search(params, ids, pad_mask=mask, num_beams=3, max_new_tokens=12, length_penalty=lp,
                        early_stopping=es, num_return_sequences=3, eos_id=EOS)
            for lp, es in ((0.5, False), (0.5, "never"), (2.0, False), (2.0, True))]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[2], outs[3])


def test_no_eos_runs_every_hypothesis_to_max_new_tokens_best_first(pairs):
    params, _ = pairs["wider", 0]
    ids, mask = _prompts(3, (4, 6), params.config.vocab_size)
    out = beam_search(params, ids, pad_mask=mask, num_beams=4, max_new_tokens=9, num_return_sequences=4)
    assert out.shape == (8, 6 + 9)
    assert torch.equal(out[:, :6], ids.repeat_interleave(4, dim=0))
    assert len({tuple(r) for r in out[:4].tolist()}) == 4  # distinct hypotheses


def test_max_new_tokens_zero_returns_the_prompt_per_returned_sequence():
    params = init_params(preset("tiny"), seed=0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = beam_search(params, ids, num_beams=2, max_new_tokens=0, num_return_sequences=2)
    assert torch.equal(out, ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("options,match", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences .*\[1, num_beams=2\]"),
    (dict(num_beams=2, num_return_sequences=0), "num_return_sequences"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite"),
    (dict(num_beams=2, length_penalty=float("inf")), "length_penalty must be a finite"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, max_new_tokens=-1), "max_new_tokens"),
    (dict(num_beams=2, eos_id=97), r"eos_id .*\[0, 97\)"),
    (dict(num_beams=2, max_new_tokens=40), "context_length"),
])
def test_bad_beam_options_raise_value_errors_naming_the_argument(options, match):
    params = init_params(preset("tiny"), seed=0)
    options = dict(max_new_tokens=4) | options
    with pytest.raises(ValueError, match=match):
        beam_search(params, torch.tensor([[1, 2, 3]]), **options)


def test_beam_bench_runs_both_contenders_on_the_same_weights_and_they_agree():
    import bench  # scripts/bench.py, the project's own (tests/conftest.py puts scripts/ on the path)

    results = bench.bench_beam(init_params(preset("tiny"), seed=3), num_beams=3, prompt_len=5, new_tokens=6,
                               repeats=1)
    assert [r.contender for r in results] == [bench.GPT2FN, bench.HF]
    for r in results:
        assert r.workload == "beam" and r.metric == "tok/s" and r.samples and min(r.samples) > 0
        assert r.extra["ids_agree_with_gpt2fn"] == 1.0

"""Generation: cached decoding is full recomputation, batching and padding change nothing, parity with
transformers' generate, stops, streaming, the sliding window, and errors.

Token-level tests run on `preset("tiny")` with the token embedding scaled up ("sharp" logits), so that the gap
between the two most likely ids is far above float rounding and greedy choices are stable across code paths.
Text-level tests use a model with GPT-2's 50257 ids but a tiny width.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import GPTParams, forward, generate, generate_tokens, init_params, preset, stream
from gpt2fn.devices import default_device
from gpt2fn.generate import TextStream, left_pad
from gpt2fn.tokenizer import EOT, decode, encode


def _sharp(params: GPTParams) -> GPTParams:
    return params.replace(tok_emb=params.tok_emb * 30)


@pytest.fixture
def sharp(device):
    return _sharp(init_params(preset("tiny"), seed=0, device=device))


@pytest.fixture(scope="module")
def wordy():
    """GPT-2's vocabulary (so text round-trips through the real tokenizer), width 32, context 64."""
    return init_params(preset("mini", emb_dim=32, n_heads=2, context_length=64), seed=1)


def _ids(seed: int, batch: int, seq: int, vocab: int = 97, device="cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def _greedy_without_cache(params: GPTParams, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The seed's loop: recompute the whole (cropped) sequence for every new token."""
    for _ in range(n):
        logits = forward(params, ids[:, -params.config.context_length:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Cache, batching, padding


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), prompt=st.integers(1, 12),
       new=st.integers(1, 16))
def test_cached_greedy_decoding_equals_full_recomputation_at_every_step(device, sharp, seed, batch, prompt, new):
    ids = _ids(seed, batch, prompt, device=device)
    out = generate_tokens(sharp, ids, max_new_tokens=new)
    assert out.shape == (batch, prompt + new)
    assert torch.equal(out[:, :prompt], ids)
    assert torch.equal(out, _greedy_without_cache(sharp, ids, new))


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 10), new=st.integers(1, 12))
def test_cached_sampling_equals_full_recomputation_with_the_same_generators(sharp, seed, prompt, new):
    from gpt2fn.sampling import SamplingOptions, next_token, row_generators

    ids = _ids(seed, 2, prompt)
    opts = SamplingOptions(temperature=0.9, top_k=20, top_p=0.9)
    out = generate_tokens(sharp, ids, max_new_tokens=new, temperature=0.9, top_k=20, top_p=0.9, seed=seed)
    ref, gens = ids, row_generators(seed, 2)
    for _ in range(new):
        tok = next_token(forward(sharp, ref)[:, -1], opts, n_tokens=97, generators=gens)
        ref = torch.cat([ref, tok[:, None]], 1)
    assert torch.equal(out, ref)


@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4), seed=st.integers(0, 2**31 - 1),
       sampled=st.booleans())
def test_a_batch_row_equals_the_same_prompt_alone_for_any_mix_of_lengths(device, sharp, lengths, seed, sampled):
    rows = [_ids(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows, device=device)
    opts = dict(max_new_tokens=8, temperature=1.0 if sampled else 0.0, top_k=30)
    batch = generate_tokens(sharp, ids, pad_mask=mask, seed=seed, **opts)
    for i, r in enumerate(rows):
        alone = generate_tokens(sharp, torch.tensor([r], device=device), seed=seed + i, **opts)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(r):].tolist()


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


def _hf_tiny(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=3,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(30)  # sharp logits, as `_sharp`
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # nonzero biases, so that a mapping mistake shows
    return hf


def _params_from_hf(hf) -> GPTParams:
    """Map a GPT2LMHeadModel's weights by name (Conv1D weights are already [in, out]; c_attn is the fused qkv)."""
    sd = {k.removeprefix("transformer."): v.detach().clone() for k, v in hf.state_dict().items()}

    def norm(prefix):
        return gpt2fn.LayerNormParams(sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    blocks = tuple(
        gpt2fn.BlockParams(
            norm1=norm(f"h.{i}.ln_1"),
            attn=gpt2fn.AttentionParams(sd[f"h.{i}.attn.c_attn.weight"], sd[f"h.{i}.attn.c_attn.bias"],
                                        sd[f"h.{i}.attn.c_proj.weight"], sd[f"h.{i}.attn.c_proj.bias"]),
            norm2=norm(f"h.{i}.ln_2"),
            mlp=gpt2fn.MLPParams(sd[f"h.{i}.mlp.c_fc.weight"], sd[f"h.{i}.mlp.c_fc.bias"],
                                 sd[f"h.{i}.mlp.c_proj.weight"], sd[f"h.{i}.mlp.c_proj.bias"]),
        )
        for i in range(hf.config.n_layer)
    )
    return gpt2fn.validate(GPTParams(sd["wte.weight"], sd["wpe.weight"], blocks, norm("ln_f"), None, preset("tiny")))


@pytest.fixture(scope="module")
def hf_pair():
    hf = _hf_tiny()
    return hf, _params_from_hf(hf)


def _hf_generate(hf, ids, mask, new, **kwargs):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask.long(), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, **kwargs)


def test_logits_equal_transformers_on_the_same_weights(hf_pair):
    hf, params = hf_pair
    ids = _ids(0, 2, 20)
    with torch.no_grad():
        torch.testing.assert_close(forward(params, ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_greedy_tokens_equal_transformers_generate(hf_pair, lengths, seed):
    hf, params = hf_pair
    ids, mask = left_pad([_ids(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)])
    ours = generate_tokens(params, ids, pad_mask=mask, max_new_tokens=12)
    assert torch.equal(ours, _hf_generate(hf, ids, mask, 12))


def test_repetition_penalty_equals_transformers_generate(hf_pair):
    hf, params = hf_pair
    ids = _ids(5, 1, 6)
    ours = generate_tokens(params, ids, max_new_tokens=20, repetition_penalty=1.8)
    assert torch.equal(ours, _hf_generate(hf, ids, torch.ones_like(ids), 20, repetition_penalty=1.8))
    assert not torch.equal(ours, generate_tokens(params, ids, max_new_tokens=20))  # the penalty did something


# ---------------------------------------------------------------------------------------------------------------
# Sampling options through generate


def test_top_k_1_is_greedy_at_any_temperature(sharp):
    ids = _ids(1, 2, 5)
    greedy = generate_tokens(sharp, ids, max_new_tokens=10)
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=10, temperature=3.0, top_k=1, seed=4), greedy)
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=10, temperature=1e-5, seed=4), greedy)


def test_a_fixed_seed_gives_the_same_text_and_another_seed_other_text(wordy):
    prompts = ["Hello, it is time", "The"]
    a = generate(wordy, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    assert a == generate(wordy, prompts, max_new_tokens=12, temperature=1.0, seed=7)
    assert a != generate(wordy, prompts, max_new_tokens=12, temperature=1.0, seed=8)
    # a row's sample does not depend on the rest of the batch: row i draws with seed + i
    assert a[1] == generate(wordy, "The", max_new_tokens=12, temperature=1.0, seed=8)
    assert a[0] == generate(wordy, ["Hello, it is time", "Something else entirely"], max_new_tokens=12,
                            temperature=1.0, seed=7)[0]
    g = torch.Generator().manual_seed(7)
    assert a[0] == generate(wordy, "Hello, it is time", max_new_tokens=12, temperature=1.0, seed=g)


def test_padded_vocabulary_ids_are_never_generated():
    cfg = preset("tiny", tie_head=False, token_vocab_size=90)
    params = init_params(cfg, seed=0)
    head = params.head.clone()
    head[:, 90:] = 1.0
    params = params.replace(head=head, final_norm=params.final_norm.replace(shift=torch.full((24,), 10.0)))
    ids = _ids(0, 2, 4, vocab=90)
    assert (forward(params, ids)[:, -1].argmax(-1) >= 90).all()  # unmasked, a padding id would win
    for kwargs in (dict(), dict(temperature=1.0, seed=0), dict(temperature=5.0, top_p=0.99, seed=1)):
        out = generate_tokens(params, ids, max_new_tokens=10, **kwargs)
        assert (out < 90).all()


# ---------------------------------------------------------------------------------------------------------------
# Stopping


def test_eos_stops_each_row_and_fills_it_with_eos(sharp):
    ids = _ids(3, 2, 4)
    free = generate_tokens(sharp, ids, max_new_tokens=16)[:, 4:]
    eos = next(t for t in free[0].tolist() if t not in free[1, :8].tolist())
    first = free[0].tolist().index(eos)
    out = generate_tokens(sharp, ids, max_new_tokens=16, eos=eos)[:, 4:]
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out[0, first:] == eos).all()
    row1_stop = free[1].tolist().index(eos) if eos in free[1].tolist() else len(free[1])
    assert out[1, :row1_stop].tolist() == free[1, :row1_stop].tolist()


def test_generation_ends_early_when_every_row_has_stopped(sharp):
    ids = _ids(3, 1, 4)
    free = generate_tokens(sharp, ids, max_new_tokens=16)
    eos = int(free[0, 6])
    out = generate_tokens(sharp, ids, max_new_tokens=16, eos=eos)
    stop = free[0, 4:].tolist().index(eos) + 1
    assert out.tolist() == free[:, :4 + stop].tolist()


def test_eos_and_stop_strings_cut_each_row_of_text(wordy):
    prompts = ["Hello, it is time", "Once upon"]
    free = generate(wordy, prompts, max_new_tokens=15, temperature=1.0, seed=3)
    stop = free[0][6:9]
    assert stop not in free[1]
    cut = generate(wordy, prompts, max_new_tokens=15, temperature=1.0, seed=3, stop=[stop, "\x00never"])
    assert cut == [free[0][:free[0].find(stop)], free[1]]
    # an EOS id stops a row before that token's text
    ids = encode(prompts[0], allow_special=True)
    new = generate_tokens(wordy, torch.tensor([ids]), max_new_tokens=15, temperature=1.0, seed=3)[0, len(ids):]
    eos = int(new[5])
    text = generate(wordy, prompts[0], max_new_tokens=15, temperature=1.0, seed=3, eos=eos)
    assert text == decode(new[:new.tolist().index(eos)].tolist())


def test_endoftext_is_the_default_eos():
    cfg = preset("mini", emb_dim=32, n_heads=2, context_length=64, tie_head=False)
    params = init_params(cfg, seed=0)
    head = params.head.clone()
    head[:, EOT] = 1.0  # with a large final shift, <|endoftext|> becomes the most likely token
    params = params.replace(head=head, final_norm=params.final_norm.replace(shift=torch.full((32,), 10.0)))
    assert generate(params, "Hello", max_new_tokens=5) == ""
    assert generate(params, "Hello", max_new_tokens=3, eos=False) == decode([EOT] * 3)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=40)


@given(text=_TEXT, stop=st.none() | st.text(min_size=1, max_size=4))
def test_stream_pieces_concatenate_to_the_text_and_never_split_a_character(text, stop):
    ids = encode(text)
    s = TextStream(() if stop is None else (stop,))
    pieces = [s.push(t) for t in ids] + [s.finish()]
    expected = text if stop is None or stop not in text else text[:text.find(stop)]
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)  # a split multi-byte character would decode to U+FFFD


def test_stream_holds_back_a_possible_stop_string_until_it_is_decided():
    s = TextStream(("END!",))
    assert "".join(s.push(t) for t in encode("abc END")) == "abc "  # "END" might still become "END!"
    assert s.push(encode(" def")[0]) == "END def"  # now it cannot
    s = TextStream(("END!",))
    assert "".join(s.push(t) for t in encode("abc END")) == "abc "
    assert s.finish() == "END"


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0, seed=5), dict(temperature=1.2, seed=0,
                                                                                stop=[" the", "."])])
def test_streaming_concatenates_to_generate(wordy, kwargs):
    pieces = list(stream(wordy, "Hello, it is time", max_new_tokens=25, **kwargs))
    assert len(pieces) > 1 or kwargs.get("stop")
    assert "".join(pieces) == generate(wordy, "Hello, it is time", max_new_tokens=25, **kwargs)


def test_generate_returns_the_decoded_continuation(wordy):
    prompt = "Hello, it is time"
    ids = encode(prompt)
    new = generate_tokens(wordy, torch.tensor([ids]), max_new_tokens=10)[0, len(ids):].tolist()
    assert generate(wordy, prompt, max_new_tokens=10) == decode(new)
    assert generate(wordy, [prompt, prompt], max_new_tokens=10) == [decode(new)] * 2
    assert generate(wordy, prompt, max_new_tokens=0) == ""


# ---------------------------------------------------------------------------------------------------------------
# The context window


def test_a_prompt_longer_than_the_context_is_cropped_from_the_left_with_a_warning(sharp):
    ids = _ids(0, 2, 40)
    with pytest.warns(UserWarning, match="longer than the context window of 32"):
        out = generate_tokens(sharp, ids, max_new_tokens=1)
    assert torch.equal(out[:, -1], forward(sharp, ids[:, -32:])[:, -1].argmax(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_tokens(sharp, ids[:, :32], max_new_tokens=1)


@given(seed=st.integers(0, 2**31 - 1), prompt=st.integers(1, 40), new=st.integers(1, 45))
def test_generation_past_the_window_slides_and_each_token_sees_its_window(sharp, seed, prompt, new):
    ids = _ids(seed, 1, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate_tokens(sharp, ids, max_new_tokens=new)
    ctx, keep = 32, 28  # when the cache is full, the last keep = ctx - ctx // 8 tokens are prefilled again
    seen = min(prompt, ctx)
    for j in range(new):
        if j:
            seen = keep if seen == ctx else seen + 1
        end = prompt + j
        expected = forward(sharp, out[:, end - seen:end])[:, -1].argmax(-1)
        assert int(out[0, end]) == int(expected), f"token {j} (window {seen})"
    if prompt + new <= ctx:  # inside the window this is exactly the seed's loop
        assert torch.equal(out, _greedy_without_cache(sharp, ids, new))


# ---------------------------------------------------------------------------------------------------------------
# Errors, devices


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(temperature=-1.0), "temperature"),
    (dict(eos=10**6), "eos"),
    (dict(stop=""), "stop"),
])
def test_bad_arguments_raise_clear_value_errors(wordy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(wordy, "Hello", **kwargs)


def test_bad_prompts_raise_clear_value_errors(wordy, sharp):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(wordy, "")
    with pytest.raises(ValueError, match="non-empty list"):
        generate(wordy, [])
    with pytest.raises(ValueError, match=r"prompt ids hold token id \d+ at \[0, 0\], outside .* vocabulary \[0, 97\)"):
        generate(init_params(preset("tiny")), "Hello")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        generate_tokens(sharp, _ids(0, 1, 5, device=sharp.device)[0])
    with pytest.raises(ValueError, match="pad on the left"):
        generate_tokens(sharp, _ids(0, 1, 5, device=sharp.device),
                        pad_mask=torch.tensor([[True, True, True, True, False]], device=sharp.device))
    with pytest.raises(ValueError, match="independent rows"):
        generate_tokens(sharp, _ids(0, 2, 5, device=sharp.device), temperature=1.0, seed=torch.Generator())


def test_zero_new_tokens_returns_the_prompt(sharp):
    ids = _ids(0, 2, 5, device=sharp.device)
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=0), ids)


def test_default_device_prefers_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    assert default_device().type == expected


def test_device_argument_moves_the_computation(device):
    params = _sharp(init_params(preset("tiny"), seed=0))
    ids = _ids(2, 1, 5)
    here = generate_tokens(params, ids, max_new_tokens=6)
    there = generate_tokens(params, ids, max_new_tokens=6, device=device)
    assert there.device.type == device.type
    assert torch.equal(there.cpu(), here)


def test_bfloat16_params_generate_the_same_kind_of_output(sharp):
    params = gpt2fn.tree_to(sharp, dtype=torch.bfloat16)
    ids = _ids(0, 2, 5, device=sharp.device)
    out = generate_tokens(params, ids, max_new_tokens=6, temperature=0.8, seed=0)
    assert out.shape == (2, 11) and out.dtype == torch.long and (out < 97).all()


# ---------------------------------------------------------------- a 16-bit KV cache


@pytest.mark.parametrize("cache_dtype", ["bf16", torch.float16])
def test_a_16_bit_cache_holds_its_dtype_and_decodes_the_fp32_caches_tokens(sharp, cache_dtype):
    """`cache_dtype=` stores keys and values in 16 bits (half the cache's memory and of the bytes a step's
    attention reads); attention itself stays fp32, so the logits move by about the keys' and values' rounding and
    greedy tokens of a sharp model are the fp32 cache's, plain and with beams."""
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    ref = generate_tokens(sharp, ids, max_new_tokens=8, return_details=True, output_logits=True)
    got = generate_tokens(sharp, ids, max_new_tokens=8, return_details=True, output_logits=True,
                          cache_dtype=cache_dtype)
    want_dtype = gpt2fn.devices.parse_dtype(cache_dtype)
    assert all(t.dtype == want_dtype for t in (*got.cache.keys, *got.cache.values))
    assert all(t.dtype == torch.float32 for t in (*ref.cache.keys, *ref.cache.values))
    assert torch.equal(got.ids, ref.ids)
    scale = ref.logits.abs().max()
    drift = (got.logits - ref.logits).abs().max()
    assert 0 < drift < 2e-2 * scale  # rounded, and only by the 16-bit step
    beams = dict(max_new_tokens=6, num_beams=3)
    assert torch.equal(generate_tokens(sharp, ids, cache_dtype=cache_dtype, **beams),
                       generate_tokens(sharp, ids, **beams))


def test_a_bad_cache_dtype_is_refused_at_the_call_with_the_choices(sharp):
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="cache_dtype.*float32, bfloat16, float16"):
        generate_tokens(sharp, ids, max_new_tokens=2, cache_dtype=torch.int8)
    with pytest.raises(ValueError, match="cache_dtype: unknown dtype 'q4'"):
        generate_tokens(sharp, ids, max_new_tokens=2, cache_dtype="q4")


def test_a_16_bit_cache_works_through_stream_speculation_and_compile(sharp, wordy):
    """The other ways a cache is made: `stream` (its pieces concatenate to `generate`'s text with the same cache),
    speculative decoding (the target's own greedy tokens, prompt lookup and a draft model, several queries per
    verify through torch's attention over the widened cache) and `compile=True` (torch's attention in the graph)."""
    text = generate(wordy, "The cache", max_new_tokens=12, cache_dtype="bf16")
    assert "".join(stream(wordy, "The cache", max_new_tokens=12, cache_dtype="bf16")) == text
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = generate_tokens(sharp, ids, max_new_tokens=10, cache_dtype="fp16")
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=10, cache_dtype="fp16", draft="prompt_lookup"),
                       plain)
    draft = init_params(preset("tiny"), seed=3)
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=10, cache_dtype="fp16", draft=draft), plain)
    torch.compiler.reset()
    assert torch.equal(generate_tokens(sharp, ids, max_new_tokens=10, cache_dtype="fp16", compile=True), plain)

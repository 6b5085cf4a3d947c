"""`gpt2fn.score` and `gpt2fn eval` against the `transformers` perplexity guide's loop on the same random weights.

The reference is `GPT2LMHeadModel.from_pretrained` of a directory written by `save_hf`, driven by the guide's
sliding-window loop (https://huggingface.co/docs/transformers/perplexity) with `labels=`, so its loss is computed
by `transformers` itself; per-token log-probabilities come from the same windows' logits.
"""

import json
import re

import pytest
import torch

import gpt2fn
from gpt2fn import GPTConfig, init_params, save, save_hf, score
from gpt2fn.cli import main
from gpt2fn.tokenizer import EOT, encode

TOL = 2e-5
TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0,
                 qkv_bias=True, tie_head=True)
BPE = TINY.replace(vocab_size=50257)  # reads GPT-2 text
TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times, it was "
        "the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light.")


def hf_model(params, path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(save_hf(params, path)).eval()


def guide(model, ids: list[int], *, max_length: int, stride: int, prompt_len: int = 0, rows=None):
    """The guide's loop, verbatim but for recording per-token log-probs (and masking a prompt for continuations).
    Returns ({position: logprob}, nll_sum, n_tokens); nll_sum from transformers' own loss (full vocabulary only)."""
    enc = torch.tensor([ids])
    seq_len = enc.size(1)
    nll_sum, n_tokens, prev_end_loc, per_token = 0.0, 0, 0, {}
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = enc[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        target_ids[:, :max(prompt_len - begin_loc, 0)] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
        num_valid = int((target_ids[:, 1:] != -100).sum())
        if num_valid:
            nll_sum += float(outputs.loss) * num_valid
            n_tokens += num_valid
        logits = outputs.logits[0, :-1].float()
        if rows is not None:
            logits = logits[:, rows]
        logp = torch.log_softmax(logits, -1)
        for j in range(1, end_loc - begin_loc):
            if target_ids[0, j] != -100:
                t = ids[begin_loc + j]
                per_token[begin_loc + j] = float(logp[j - 1, rows.index(t) if rows is not None else t])
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return per_token, nll_sum, n_tokens


def assert_matches(s, per_token, nll_sum=None, n_tokens=None):
    assert list(s.positions) == sorted(per_token)
    expected = torch.tensor([per_token[p] for p in s.positions])
    torch.testing.assert_close(s.logprobs, expected, atol=TOL, rtol=0)
    if nll_sum is not None:
        assert s.n_tokens == n_tokens
        assert abs(-s.log_likelihood - nll_sum) < TOL * n_tokens
        assert abs(s.mean_loss - nll_sum / n_tokens) < TOL


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    params = init_params(TINY, seed=1)
    return params, hf_model(params, tmp_path_factory.mktemp("hf"))


def random_ids(n: int, seed: int, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("context", "stride"), [(None, None), (32, 32), (32, 7), (20, 13), (32, 3)])
def test_a_text_longer_than_the_context_matches_the_transformers_guide(pair, context, stride):
    params, model = pair
    ids = random_ids(90, seed=2)
    s = score(params, ids, context=context, stride=stride, batch_size=3)
    ctx = context or 32
    assert_matches(s, *guide(model, ids, max_length=ctx, stride=stride or ctx // 2))
    if stride is not None and stride < ctx:
        assert s.positions == tuple(range(1, 90))  # every token but the first
    if stride == ctx:
        assert 32 not in s.positions  # the guide's method: a window's first token is not scored in it


def test_a_batch_of_texts_of_different_lengths_matches_transformers_and_one_at_a_time(pair):
    params, model = pair
    texts = [random_ids(n, seed=n) for n in (5, 90, 2, 33, 17, 64)]
    batched = score(params, texts, batch_size=4)
    for ids, s in zip(texts, batched, strict=True):
        assert_matches(s, *guide(model, ids, max_length=32, stride=16))
        alone = score(params, ids)
        assert alone.positions == s.positions
        torch.testing.assert_close(s.logprobs, alone.logprobs, atol=TOL, rtol=0)
    tensors = score(params, [torch.tensor(t) for t in texts], batch_size=1)
    for a, b in zip(tensors, batched, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=TOL, rtol=0)


def test_continuation_scores_only_its_tokens_given_the_prompt(pair):
    params, model = pair
    prompts, conts = [random_ids(n, seed=10 + n) for n in (3, 40, 1)], [random_ids(n, seed=20 + n) for n in (6, 30, 4)]
    scores = score(params, prompts, continuation=conts, batch_size=2)
    for p, c, s in zip(prompts, conts, scores, strict=True):
        assert s.ids == tuple(p + c)
        assert s.positions == tuple(range(max(len(p), 1), len(p) + len(c)))
        assert_matches(s, *guide(model, p + c, max_length=32, stride=16, prompt_len=len(p)))
    one = score(params, prompts[1], continuation=conts[1])
    torch.testing.assert_close(one.logprobs, scores[1].logprobs, atol=TOL, rtol=0)


def test_with_a_trained_vocabulary_the_softmax_runs_over_the_trained_ids(tmp_path):
    rows = [0, 3, 5, 8, 13, 21, 34, 55, 89]
    params = init_params(TINY.replace(trained_vocab=tuple(rows)), seed=4)
    model = hf_model(params, tmp_path)
    ids = [rows[i % len(rows)] for i in random_ids(50, seed=5)]
    s = score(params, ids, stride=10)
    assert_matches(s, guide(model, ids, max_length=32, stride=10, rows=rows)[0])
    # and it agrees with gpt2fn.loss on one window
    x = torch.tensor([ids[:32]])
    full = score(params, ids[:32])
    targets = torch.cat([x[:, 1:], torch.tensor([[-100]])], 1)
    assert abs(full.mean_loss - float(gpt2fn.loss(params, x, targets))) < TOL
    with pytest.raises(ValueError, match="trained_vocab"):
        score(params, [0, 3, 4])


def test_texts_are_tokenized_with_the_gpt2_tokenizer():
    params = init_params(BPE, seed=0)
    s = score(params, TEXT, continuation=" And more.")
    t = score(params, encode(TEXT), continuation=encode(" And more."))
    assert s.ids == t.ids and torch.equal(s.logprobs, t.logprobs)
    assert s.perplexity == pytest.approx(torch.exp(-s.logprobs.double().mean()).item())


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(texts_or_ids=[1, 97]), r"token id 97 at \[1\], outside .*\[0, 97\)"),
    (dict(texts_or_ids=[5]), "at least 2 tokens"),
    (dict(texts_or_ids=[]), "at least 2 tokens"),
    (dict(texts_or_ids=[[1, 2], [3]]), r"texts_or_ids\[1\] has 1 token"),
    (dict(texts_or_ids=[1, 2], continuation=[]), "continuation.* empty"),
    (dict(texts_or_ids=[[1, 2]], continuation=[[3], [4]]), "continuation must match"),
    (dict(texts_or_ids=[1, 2], stride=0), r"stride must be an integer in \[1, context=32\]"),
    (dict(texts_or_ids=[1, 2], context=33), r"context must be an integer in \[2, context_length=32\]"),
    (dict(texts_or_ids=[1, 2], batch_size=0), "batch_size"),
    (dict(texts_or_ids=[1.5, 2]), "must be a str, a list of int"),
])
def test_bad_input_is_a_value_error_naming_the_argument(kwargs, match):
    params = init_params(TINY, seed=0)
    with pytest.raises(ValueError, match=match):
        score(params, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# gpt2fn eval


@pytest.fixture(scope="module")
def bpe_pair(tmp_path_factory):
    params = init_params(BPE, seed=3)
    root = tmp_path_factory.mktemp("eval")
    save(params, root / "model.safetensors")
    return params, hf_model(params, root / "hf"), root / "model.safetensors"


def test_eval_equals_score_and_the_transformers_guide_on_a_folder(bpe_pair, tmp_path, capsys):
    params, model, ckpt = bpe_pair
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TEXT, encoding="utf-8")
    (data / "b.txt").write_text(TEXT[::-1] + "\n", encoding="utf-8")
    (data / ".hidden").write_text("ignored", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--stride", "12", "--batch-size", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = encode(TEXT) + [EOT] + encode(TEXT[::-1] + "\n")
    s = score(params, ids, stride=12)
    assert out["files"] == 2 and out["tokens"] == len(ids) > 64 and out["scored_tokens"] == s.n_tokens
    # batches of 3 windows run on the native kernel, score's one batch of every window on torch's GEMM
    # (gpt2fn.kernels: more than NATIVE_MAX_ROWS rows): the same sums, rounded in another order
    assert out["mean_loss"] == pytest.approx(s.mean_loss, rel=1e-6)
    assert out["perplexity"] == pytest.approx(s.perplexity, rel=1e-6)
    _, nll_sum, n = guide(model, ids, max_length=32, stride=12)
    assert n == out["scored_tokens"] and abs(out["mean_loss"] - nll_sum / n) < TOL

    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data / "a.txt"), "--context", "16"]) == 0
    text_out = capsys.readouterr().out
    assert f"perplexity {score(params, TEXT, context=16).perplexity:.4f}" in text_out


def test_eval_on_random_preset_weights_equals_score(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--preset", "mini", "--seed", "2", "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    expected = score(init_params(gpt2fn.preset("mini"), seed=2), TEXT)
    assert json.loads(capsys.readouterr().out)["mean_loss"] == pytest.approx(expected.mean_loss, abs=1e-9)
    assert main(["eval", "--preset", "tiny", "--data", str(tmp_path / "t.txt"), "--json"]) == 1
    assert "vocabulary [0, 97)" in capsys.readouterr().err  # GPT-2 ids do not fit the tiny vocabulary


@pytest.mark.parametrize(("content", "flags", "match"), [
    (b"", [], "is empty"),
    (b"   \n", [], "is empty"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00", [], "not UTF-8 text"),
    (b"text\x00\x00bin", [], "looks binary"),
    (TEXT.encode(), ["--stride", "0"], r"--stride must be in \[1, --context=32\]"),
    (TEXT.encode(), ["--context", "64"], r"--context must be in \[2, 32\]"),
    (TEXT.encode(), ["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_eval_bad_input_is_one_line_on_stderr(bpe_pair, tmp_path, capsys, content, flags, match):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(bpe_pair[2]), "--data", str(path), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(match, err)


def test_eval_refuses_a_checkpoint_whose_vocabulary_does_not_cover_the_text(tmp_path, capsys):
    save(init_params(TINY.replace(vocab_size=256), seed=0), tmp_path / "bytes.safetensors")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(tmp_path / "bytes.safetensors"), "--data", str(tmp_path / "t.txt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocabulary [0, 256)" in err and "does not cover" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "bytes.safetensors"), "--data", str(tmp_path / "no")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_the_score_benchmark_compares_equal_losses(pair):
    import bench  # scripts/bench.py, the project's own (tests/conftest.py puts scripts/ on the path)

    results = bench.bench_score(pair[0], batch=3, seq=20, repeats=1)
    assert [r.contender for r in results] == [bench.GPT2FN, bench.HF]
    assert all(r.median > 0 and r.extra["max_abs_diff"] < 1e-4 for r in results)


def test_eval_quantize_int8_scores_the_quantized_tree(tmp_path, capsys):
    """`gpt2fn eval --quantize int8` scores `gpt2fn.quantize(params, "int8")`: the score of that tree, near the fp32
    one (per-column int8 weights); with a 16-bit `--dtype` it is refused in one line naming the fix."""
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    args = ["eval", "--preset", "mini", "--seed", "2", "--data", str(tmp_path / "t.txt"), "--json"]
    assert main([*args, "--quantize", "int8"]) == 0
    got = json.loads(capsys.readouterr().out)["mean_loss"]
    params = init_params(gpt2fn.preset("mini"), seed=2)
    assert got == pytest.approx(score(gpt2fn.quantize(params, "int8"), TEXT).mean_loss, abs=1e-6)
    assert got == pytest.approx(score(params, TEXT).mean_loss, abs=2e-2)
    assert got != score(params, TEXT).mean_loss
    assert main([*args, "--quantize", "int8", "--dtype", "bf16"]) == 1
    assert "drop --dtype" in capsys.readouterr().err

"""Training: token data and windows, the train step, exact resume, atomic checkpoints, signals, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import gpt2fn
from gpt2fn import init_params, named_leaves, preset, tokenizer
from gpt2fn.cli import main as cli_main
from gpt2fn.train import (
    TrainConfig,
    adamw_init,
    load_state,
    load_tokens,
    loss_and_grads,
    sample_batch,
    save_state,
    split_tokens,
    train,
    train_step,
    windows,
)
from gpt2fn.train import state as state_mod
from gpt2fn.train.state import STATE_FILE, TrainState

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    import pydoc_data.topics

    path.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:4]))
    return path


@pytest.fixture
def cfg_tiny():
    """The tiny test model with the GPT-2 vocabulary (the tokenizer's ids go up to 50256)."""
    return preset("tiny", vocab_size=50257, context_length=16)


# ---------------------------------------------------------------------------------------------------------------
# data


def test_tokens_are_cached_and_read_back_without_the_tokenizer(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT)
    first = load_tokens(tmp_path / "a.txt", cache_dir=tmp_path / "cache")
    assert first.dtype == np.uint16
    assert list(first) == tokenizer.encode(TEXT)
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("re-tokenized an unchanged corpus"))
    again = load_tokens(tmp_path / "a.txt", cache_dir=tmp_path / "cache")
    assert np.array_equal(first, again)
    monkeypatch.undo()
    (tmp_path / "a.txt").write_text(TEXT + " more")
    changed = load_tokens(tmp_path / "a.txt", cache_dir=tmp_path / "cache")
    assert len(changed) == len(first) + 1
    assert len(list((tmp_path / "cache").glob("*.u16"))) == 2


def test_a_directory_joins_its_files_in_order_with_end_of_text(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file")
    (d / "a.txt").write_text("first file")
    (d / "sub" / "c.txt").write_text("third")
    (d / ".hidden").write_text("never read")
    ids = list(load_tokens(d, cache_dir=tmp_path / "cache"))
    E = tokenizer.EOT
    assert ids == (tokenizer.encode("first file") + [E] + tokenizer.encode("second file") + [E]
                   + tokenizer.encode("third"))


def test_windows_are_inputs_and_targets_shifted_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    ids, targets = windows(tokens, torch.tensor([0, 7, 89]), context=10)
    assert ids.shape == targets.shape == (3, 10) and ids.dtype == torch.int64
    assert ids[1].tolist() == list(range(7, 17))
    assert torch.equal(targets[:, :-1], ids[:, 1:])
    assert targets[2, -1] == 99


def test_sampling_is_a_function_of_the_generator():
    tokens = np.arange(1000, dtype=np.uint16)
    a = sample_batch(tokens, batch_size=4, context=8, generator=torch.Generator().manual_seed(3))
    b = sample_batch(tokens, batch_size=4, context=8, generator=torch.Generator().manual_seed(3))
    c = sample_batch(tokens, batch_size=4, context=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_split_keeps_the_tail_for_validation():
    tokens = np.arange(1000, dtype=np.uint16)
    train_part, val_part = split_tokens(tokens, val_fraction=0.1, context=8)
    assert len(train_part) == 900 and val_part[0] == 900 and len(val_part) == 100


def test_a_corpus_shorter_than_one_window_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"has 20 tokens.*context \+ 1 = 33.*smaller --context"):
        split_tokens(np.arange(20, dtype=np.uint16), val_fraction=0.0, context=32)
    (tmp_path / "short.txt").write_text("Too short.")
    code = cli_main(["train", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o"),
                     "--preset", "tiny", "--set", "vocab_size=50257", "--steps", "1", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == 1


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = cli_main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 1 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the step


def test_gradients_from_torch_func_equal_autograd(cfg_tiny):
    params = init_params(cfg_tiny, seed=0)
    ids, targets = torch.randint(0, 50257, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    grads, loss = loss_and_grads(params, ids, targets)
    leaves = [t.clone().requires_grad_(True) for t in pytree.tree_leaves(params)]
    ref_params = pytree.tree_unflatten(leaves, pytree.tree_structure(params))
    ref = gpt2fn.loss(ref_params, ids, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    for (name, g), leaf in zip(named_leaves(grads), leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, msg=name)


def test_train_steps_lower_the_loss_on_a_repeated_batch(cfg_tiny):
    params = init_params(cfg_tiny, seed=0)
    opt = adamw_init(params)
    ids, targets = torch.randint(0, 50257, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):
        params, opt, m = train_step(params, opt, ids, targets, lr=1e-2)
        losses.append(float(m.loss))
    assert losses[-1] < losses[0] - 0.5


def test_the_step_fuses_adamw_in_fp32_and_falls_back_for_bf16_params(cfg_tiny):
    ids, targets = torch.randint(0, 50257, (2, 2, 16), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        params = init_params(cfg_tiny, seed=0, dtype=dtype)
        auto = train_step(params, adamw_init(params), ids, targets, lr=1e-2)
        plain = train_step(params, adamw_init(params), ids, targets, lr=1e-2, fused=False)
        for a, b in zip(pytree.tree_leaves(auto[:2]), pytree.tree_leaves(plain[:2]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(auto[0].tok_emb, params.tok_emb)
    with pytest.raises(ValueError, match="one floating dtype"):  # bf16 params, fp32 moments
        train_step(params, adamw_init(params), ids, targets, lr=1e-2, fused=True)


def test_dropout_follows_the_explicit_generator(cfg_tiny):
    params = init_params(cfg_tiny.replace(drop_rate=0.2), seed=0)
    ids, targets = torch.randint(0, 50257, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    a = loss_and_grads(params, ids, targets, generator=torch.Generator().manual_seed(5))[1]
    b = loss_and_grads(params, ids, targets, generator=torch.Generator().manual_seed(5))[1]
    c = loss_and_grads(params, ids, targets, generator=torch.Generator().manual_seed(6))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# the loop, checkpoints, resume


def _cfg(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup=2, eval_every=2,
                eval_windows=2, save_every=0, log_every=1, progress=False, cache_dir=str(out.parent / "cache"), seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _logged(out: Path) -> list[dict]:
    timing = ("tokens_per_s", "elapsed_s")
    return [{k: v for k, v in json.loads(s).items() if k not in timing}
            for s in (out / "metrics.jsonl").read_text().splitlines()]


def test_n_steps_straight_equal_half_then_resume_then_half_bit_for_bit(corpus, tmp_path, cfg_tiny):
    params = init_params(cfg_tiny.replace(drop_rate=0.1), seed=0)  # dropout on: its generator must resume too
    straight = train(params, _cfg(corpus, tmp_path / "straight"))
    first = train(params, _cfg(corpus, tmp_path / "halves", stop_after=3))
    assert first.step == 3 and first.stopped_by == "stop_after"
    second = train(None, _cfg(corpus, tmp_path / "halves"), resume=True)
    assert second.step == straight.step == 6
    for (name, a), b in zip(named_leaves(straight.params), pytree.tree_leaves(second.params), strict=True):
        assert torch.equal(a, b), name
    a, b = load_state(tmp_path / "straight" / STATE_FILE), load_state(tmp_path / "halves" / STATE_FILE)
    for x, y in zip(pytree.tree_leaves(a.opt), pytree.tree_leaves(b.opt), strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(a.rng[k], b.rng[k]) for k in a.rng)
    assert _logged(tmp_path / "straight") == _logged(tmp_path / "halves")  # losses, lrs, norms, val losses
    assert not torch.equal(pytree.tree_leaves(params)[0], pytree.tree_leaves(second.params)[0])


def test_a_training_state_is_not_overwritten_without_resume(corpus, tmp_path, cfg_tiny):
    params = init_params(cfg_tiny, seed=0)
    train(params, _cfg(corpus, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="--resume"):
        train(params, _cfg(corpus, tmp_path / "run", steps=2))


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, cfg_tiny, monkeypatch):
    params = init_params(cfg_tiny, seed=0)
    path = tmp_path / STATE_FILE
    save_state(TrainState(params, adamw_init(params), 7, {"data": torch.Generator().get_state()}), path)
    size = path.stat().st_size

    def crash_halfway(fh, data):
        fh.write(data[:len(data) // 2])
        raise OSError("simulated crash: disk full")

    newer = pytree.tree_map(lambda t: t + 1, params)
    monkeypatch.setattr(state_mod, "_write_all", crash_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        save_state(TrainState(newer, adamw_init(newer), 8), path)
    assert path.stat().st_size == size
    back = load_state(path)
    assert back.step == 7
    for (name, a), b in zip(named_leaves(params), pytree.tree_leaves(back.params), strict=True):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left behind


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _train_flags(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), "--preset", "tiny", "--set", "vocab_size=50257",
            "--context", "16", "--batch-size", "2", "--eval-every", "0", "--log-every", "1", "--no-progress",
            "--cache-dir", str(out.parent / "cache"), *extra]


def test_sigterm_saves_a_checkpoint_that_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    flags = _train_flags(corpus, out, "--steps", "100000", "--save-every", "0", "--threads", "1")
    proc = subprocess.Popen([sys.executable, "-m", "gpt2fn.train", *flags],
                            env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.1)
    assert not (out / STATE_FILE).exists()  # nothing saved yet: the state below comes from the signal
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    saved = load_state(out / STATE_FILE)
    assert 1 <= saved.step < 100000
    assert cli_main(["train", *_train_flags(corpus, out, "--steps", str(saved.step + 2), "--resume")]) == 0
    assert load_state(out / STATE_FILE).step == saved.step + 2
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, saved.step + 3))


def test_cli_trains_end_to_end_and_the_weights_load_and_generate(corpus, tmp_path):
    out = tmp_path / "cli"
    code = cli_main(["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--set",
                     "vocab_size=50257", "--context", "16", "--steps", "4", "--batch-size", "2",
                     "--eval-every", "2", "--log-every", "2", "--no-progress", "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_state(out / STATE_FILE)
    assert state.step == 4 and state.params.config.context_length == 16
    loaded = gpt2fn.load(out / "model.safetensors")
    for (name, a), b in zip(named_leaves(state.params), pytree.tree_leaves(loaded), strict=True):
        assert torch.equal(a, b), name
    text = gpt2fn.generate(loaded, "The", max_new_tokens=5)
    assert isinstance(text, str)


def test_training_on_the_corpus_vocabulary_records_it_and_generates_only_those_ids(corpus, tmp_path):
    out = tmp_path / "vocab"
    code = cli_main(["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--set",
                     "vocab_size=50257", "--context", "16", "--steps", "3", "--batch-size", "2", "--vocab", "corpus",
                     "--eval-every", "3", "--no-progress", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    loaded = gpt2fn.load(out / "model.safetensors")
    expected = sorted(set(tokenizer.encode(corpus.read_text())) | {tokenizer.EOT})
    assert list(loaded.config.trained_vocab) == expected
    assert load_state(out / STATE_FILE).params.config.trained_vocab == loaded.config.trained_vocab
    ids = gpt2fn.generate_tokens(loaded, torch.tensor([tokenizer.encode("The")]), max_new_tokens=40,
                                 temperature=5.0, seed=0, eos=False)  # hot sampling: near-uniform over allowed ids
    assert set(ids[0, 1:].tolist()) <= set(expected)
    full = gpt2fn.generate_tokens(loaded.replace(config=loaded.config.replace(trained_vocab=None)),
                                  torch.tensor([tokenizer.encode("The")]), max_new_tokens=40, temperature=5.0,
                                  seed=0, eos=False)
    assert not set(full[0, 1:].tolist()) <= set(expected)  # the mask is what kept them in

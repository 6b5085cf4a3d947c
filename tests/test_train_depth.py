"""Training at nanoGPT depth: reproducible runs with the default threads, gradient accumulation, mixed precision
with fp32 master weights and dynamic loss scaling, perplexity, the visible learning-rate schedule, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file

from gpt2fn import init_params, named_leaves, preset
from gpt2fn.cli import main as cli_main
from gpt2fn.train import TrainConfig, adamw_init, load_state, loss_and_grads, train, train_step
from gpt2fn.train.precision import LossScale, compute_dtype, loss_scale_init, loss_scale_update, unscale
from gpt2fn.train.state import STATE_FILE
from gpt2fn.train.step import accumulated_grads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    import pydoc_data.topics

    path.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:6]))
    return path


def _cfg(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out=str(out), steps=4, batch_size=2, lr=3e-3, warmup=1, eval_every=2,
                eval_windows=2, save_every=0, log_every=1, progress=False, cache_dir=str(out.parent / "cache"), seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _tiny():
    return init_params(preset("tiny", vocab_size=50257, context_length=16), seed=0)


def _batch(n: int, seed: int = 0, vocab: int = 97, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# bit-for-bit with the default threads, across processes


def test_runs_with_two_threads_are_bit_for_bit_equal_across_processes_and_across_a_resume(corpus, tmp_path):
    """2 layers x 64, batch 8 x context 64: batch x seq x d_model = 32768 reaches torch's parallel grain, where
    the backward of `tok_emb[ids]` (atomic float adds over repeated ids) made two identical runs differ."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("OMP_NUM_THREADS", None)

    def flags(out: str, *extra: str) -> list[str]:
        return ["train", "--data", str(corpus), "--out", str(tmp_path / out), "--preset", "tiny",
                "--set", "vocab_size=50257", "--set", "n_layers=2", "--set", "emb_dim=64", "--set", "n_heads=2",
                "--context", "64", "--batch-size", "8", "--steps", "4", "--eval-every", "0", "--val-fraction",
                "0.02", "--threads", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache"), *extra]

    def in_a_new_process(*runs: list[str]) -> None:  # each process runs its CLI invocations one after another
        script = ("import json, sys\nfrom gpt2fn.cli import main\n"
                  "for argv in json.loads(sys.argv[1]): assert main(argv) == 0")
        subprocess.run([sys.executable, "-c", script, json.dumps(runs)], env=env, check=True, capture_output=True)

    in_a_new_process(flags("a"), flags("halves", "--stop-after", "2"))
    assert load_state(tmp_path / "halves" / STATE_FILE).step == 2
    in_a_new_process(flags("b"), flags("halves", "--resume"))
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b", "halves"))
    assert load_state(tmp_path / "halves" / STATE_FILE).step == 4
    for name in a:
        assert torch.equal(a[name], b[name]), f"two straight runs differ in {name}"
        assert torch.equal(a[name], c[name]), f"straight and stop + resume differ in {name}"


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation


def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8():
    params = init_params(preset("tiny"), seed=0)
    ids, targets = _batch(8)
    whole, loss = loss_and_grads(params, ids, targets)
    acc, acc_loss = accumulated_grads(params, ids, targets, micro_batches=4)
    torch.testing.assert_close(acc_loss, loss)
    for (name, g), h in zip(named_leaves(whole), pytree.tree_leaves(acc), strict=True):
        torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7, msg=name)
    one = train_step(params, adamw_init(params), ids, targets, lr=1e-2)
    four = train_step(params, adamw_init(params), ids, targets, lr=1e-2, micro_batches=4)
    for a, b in zip(pytree.tree_leaves(one[:2]), pytree.tree_leaves(four[:2]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # Adam's first step is g / |g|: rounding shows
    with pytest.raises(ValueError, match="divide the batch of 8"):
        accumulated_grads(params, ids, targets, micro_batches=3)


def test_the_loop_with_grad_accum_sees_the_windows_of_the_whole_batch(corpus, tmp_path):
    params = _tiny()
    big = train(params, _cfg(corpus, tmp_path / "big", batch_size=8))
    acc = train(params, _cfg(corpus, tmp_path / "acc", batch_size=2, grad_accum=4))
    for (name, a), b in zip(named_leaves(big.params), pytree.tree_leaves(acc.params), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert load_state(tmp_path / "acc" / STATE_FILE).meta["global_batch"] == 8


def test_a_resume_never_falls_inside_an_accumulation_cycle_and_is_exact(corpus, tmp_path):
    params = _tiny()
    straight = train(params, _cfg(corpus, tmp_path / "straight", grad_accum=3))
    first = train(params, _cfg(corpus, tmp_path / "halves", grad_accum=3, stop_after=1))
    assert first.step == 1 and load_state(tmp_path / "halves" / STATE_FILE).opt.step == 1  # whole steps only
    second = train(None, _cfg(corpus, tmp_path / "halves", grad_accum=3), resume=True)
    for (name, a), b in zip(named_leaves(straight.params), pytree.tree_leaves(second.params), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------
# mixed precision


def test_bf16_training_lowers_the_loss_and_keeps_master_weights_and_moments_fp32():
    params = init_params(preset("tiny"), seed=0)
    opt = adamw_init(params)
    ids, targets = _batch(4, seed=1)
    losses = []
    for _ in range(8):
        params, opt, m = train_step(params, opt, ids, targets, lr=1e-2, dtype=torch.bfloat16, donate=True)
        losses.append(float(m.loss))
    assert losses[-1] < losses[0] - 0.5
    assert {t.dtype for t in pytree.tree_leaves((params, opt.mu, opt.nu))} == {torch.float32}
    grads, _ = loss_and_grads(params, ids, targets, dtype=torch.bfloat16)
    assert {g.dtype for g in pytree.tree_leaves(grads)} == {torch.float32}


def test_fp16_with_loss_scaling_trains_and_an_overflowing_step_is_skipped():
    params = init_params(preset("tiny"), seed=0)
    opt = adamw_init(params)
    ids, targets = _batch(4, seed=2)
    scale = loss_scale_init()
    losses, skipped = [], 0
    for _ in range(8):
        params, opt, m = train_step(params, opt, ids, targets, lr=1e-2, dtype=torch.float16, loss_scale=scale.scale)
        scale = loss_scale_update(scale, m.finite)
        losses.append(float(m.loss))
        skipped += not bool(m.finite)
    assert losses[-1] < losses[0] - 0.3
    assert scale.scale == 2.0 ** 16 / 2 ** skipped and int(opt.step) == 8 - skipped < 8  # 2^16 overflows at first
    new_p, new_opt, m = train_step(params, opt, ids, targets, lr=1e-2, dtype=torch.float16, loss_scale=1e30)
    assert not bool(m.finite) and int(new_opt.step) == int(opt.step)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(new_p), pytree.tree_leaves(params), strict=True))
    assert loss_scale_update(scale, m.finite).scale == scale.scale / 2


def test_loss_scale_follows_torch_gradscaler_through_overflows_and_growth():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ours = LossScale(2.0 ** 10, 0, growth_interval=3)
    for overflow in [False, False, True, False, False, False, False, True, True, False, False, False]:
        x = torch.tensor([1.0, float("inf") if overflow else 2.0, 3.0])
        opt.zero_grad()
        scaler.scale((p * x).sum()).backward()
        grads, finite = unscale({"p": p.grad.clone()}, ours.scale)  # before step(), which unscales in place
        scaler.step(opt)
        scaler.update()
        ours = loss_scale_update(ours, finite)
        assert bool(finite) is not overflow
        assert ours.scale == scaler.get_scale()
        if not overflow:
            torch.testing.assert_close(grads["p"], x)


def test_an_fp16_run_saves_its_loss_scale_and_resumes_exactly(corpus, tmp_path):
    params = _tiny()
    straight = train(params, _cfg(corpus, tmp_path / "s", dtype="fp16", steps=3, eval_every=0))
    train(params, _cfg(corpus, tmp_path / "h", dtype="fp16", steps=3, eval_every=0, stop_after=1))
    scale, good = load_state(tmp_path / "h" / STATE_FILE).meta["loss_scale"]
    assert (scale, good) in ((2.0 ** 16, 1), (2.0 ** 15, 0))  # the first step overflowed, or it did not
    second = train(None, _cfg(corpus, tmp_path / "h", dtype="fp16", steps=3, eval_every=0), resume=True)
    assert (load_state(tmp_path / "h" / STATE_FILE).meta["loss_scale"]
            == load_state(tmp_path / "s" / STATE_FILE).meta["loss_scale"])
    for a, b in zip(pytree.tree_leaves(straight.params), pytree.tree_leaves(second.params), strict=True):
        assert torch.equal(a, b)
    assert {t.dtype for t in pytree.tree_leaves(second.params)} == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# perplexity, the schedule, bad input


def test_validation_perplexity_is_logged_beside_the_loss_and_the_schedule_is_printed(corpus, tmp_path, capsys):
    result = train(_tiny(), _cfg(corpus, tmp_path / "run", steps=2, eval_every=1))
    err = capsys.readouterr().err
    assert "learning rate: warmup 1 steps to 0.003, cosine over 1 steps to 0.0003 at step 2" in err
    records = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in val)
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    assert f"perplexity {result.val_perplexity:.2f}" in err


def test_a_resume_with_other_steps_warns_that_the_schedule_changed(corpus, tmp_path, capsys):
    train(_tiny(), _cfg(corpus, tmp_path / "run", steps=4, stop_after=2))
    capsys.readouterr()
    train(None, _cfg(corpus, tmp_path / "run", steps=4, stop_after=3), resume=True)
    assert "warning" not in capsys.readouterr().err
    train(None, _cfg(corpus, tmp_path / "run", steps=8), resume=True)
    err = capsys.readouterr().err
    assert "warning: --steps changed from 4 to 8 on --resume" in err and "lr at step 3" in err


@pytest.mark.parametrize(("flag", "value", "needle"), [("--grad-accum", "0", "grad_accum must be an integer >= 1"),
                                                       ("--dtype", "int8", "unknown dtype 'int8'; choose one of")])
def test_bad_grad_accum_or_dtype_is_one_line_on_stderr(corpus, tmp_path, capsys, flag, value, needle):
    code = cli_main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), flag, value, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match=needle):
        compute_dtype(value) if flag == "--dtype" else TrainConfig(data="x", out="y", grad_accum=int(value))

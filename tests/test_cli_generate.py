"""`gpt2fn generate` end to end, on a checkpoint written here in the seed's format (`gpt2_model.pth`)."""

import os
import subprocess
import sys

import pytest
import torch
from reference_models import SeedGPTModel, randomize

import gpt2fn
from gpt2fn.cli import main
from gpt2fn.tokenizer import decode, encode

PROMPT = "Hello, it is time"
SEED_CFG = dict(vocab_size=50257, context_length=32, emb_dim=64, n_heads=1, n_layers=2, drop_rate=0.0,
                qkv_bias=False)  # load() infers n_heads = emb_dim // 64 from a bare state dict


@pytest.fixture(scope="module")
def seed_model():
    torch.manual_seed(0)
    return randomize(SeedGPTModel(SEED_CFG), seed=0)


@pytest.fixture(scope="module")
def checkpoint(seed_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "gpt2_model.pth"
    torch.save({"model_state_dict": seed_model.state_dict()}, path)  # wrapped, as the seed's training saves it
    return str(path)


def _seed_greedy(model, prompt: str, max_new_tokens: int) -> str:
    """The seed's run_inference: encode, its no-cache greedy loop cropping to the context, decode."""
    ids = torch.tensor([encode(prompt)])
    n = len(ids[0])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids[:, -SEED_CFG["context_length"]:])[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return decode(ids[0, n:].tolist())


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_prompt_and_the_seed_models_greedy_response(capsys, checkpoint, seed_model):
    code, out, err = _run(capsys, "--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "12", PROMPT)
    assert code == 0, err
    assert out == PROMPT + _seed_greedy(seed_model, PROMPT, 12) + "\n"


def test_cli_generation_past_the_context_window_still_follows_the_seed_for_a_window(capsys, checkpoint,
                                                                                    seed_model):
    # 5 prompt tokens + 27 new fill the window of 32 exactly: the cached loop is the seed's loop throughout
    code, out, _ = _run(capsys, "--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "27", PROMPT)
    assert code == 0 and out == PROMPT + _seed_greedy(seed_model, PROMPT, 27) + "\n"


def test_cli_streaming_and_sampling_flags_match_the_python_api(capsys, checkpoint):
    flags = ["--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "15", "--temperature", "0.9",
             "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
    code, streamed, _ = _run(capsys, *flags, "--stream", "Once", "upon", "a", "time")
    assert code == 0
    code, printed, _ = _run(capsys, *flags, "Once upon a time")
    params = gpt2fn.load(checkpoint)
    expected = gpt2fn.generate(params, "Once upon a time", max_new_tokens=15, temperature=0.9, top_k=50,
                               top_p=0.95, seed=3)
    assert streamed == printed == "Once upon a time" + expected + "\n"


@pytest.mark.slow
def test_cli_compile_flag_gives_the_eager_tokens(capsys, checkpoint):
    flags = ["--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "12", "--no-eos", "Once upon a"]
    code, eager, _ = _run(capsys, *flags)
    assert code == 0
    code, compiled, _ = _run(capsys, "--compile", *flags)
    assert code == 0 and compiled == eager


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "does/not/exist.pth", "Hi"], "does/not/exist.pth"),
    (["--checkpoint", "does/not/exist.pth", "--top-p", "1.5", "Hi"], "top_p"),  # checked before loading
    (["--checkpoint", "does/not/exist.pth", "--temperature", "-1", "Hi"], "temperature"),
    (["--checkpoint", "does/not/exist.pth", "--top-k", "0", "Hi"], "top_k"),
    (["--checkpoint", "does/not/exist.pth", "--max-new-tokens", "-2", "Hi"], "max-new-tokens"),
    (["--checkpoint", "does/not/exist.pth", "--device", "warp-drive", "Hi"], "warp-drive"),
    (["--model", "no-such-model-xyz", "Hi"], "no-such-model-xyz"),
])
def test_cli_errors_are_one_line_and_a_nonzero_exit(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_entry_point_fails_without_a_traceback(checkpoint):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    bad = subprocess.run([sys.executable, "-m", "gpt2fn", "generate", "--checkpoint", checkpoint + ".missing",
                          PROMPT], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")

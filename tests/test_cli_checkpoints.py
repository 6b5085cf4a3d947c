"""`gpt2fn inspect` and `gpt2fn convert`: thin shells over load/save that report failures in one `error:` line."""

import pytest
import torch
from reference_models import NanoGPT, SeedGPTModel, randomize

from gpt2fn import forward, load, params_to_dict
from gpt2fn.cli import main

SEED_CFG = dict(vocab_size=97, context_length=20, emb_dim=128, n_heads=2, n_layers=3, drop_rate=0.1, qkv_bias=True)


@pytest.fixture
def seed_pth(tmp_path):
    model = randomize(SeedGPTModel(SEED_CFG), seed=1)
    path = tmp_path / "gpt2_model.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {"state": {}}}, path)
    return path, model


def test_inspect_shows_layout_config_shapes_counts_and_ignored_keys(seed_pth, capsys):
    path, model = seed_pth
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed GPTModel" in out
    assert "context_length   20" in out and "n_layers         3" in out and "qkv_bias         True" in out
    total = sum(p.numel() for p in model.parameters())
    assert f"parameters: {total:,}" in out
    assert "blocks.0.attn.w_qkv   [128, 384]" in out
    assert "head                  [128, 97]" in out
    assert "blocks.2.attn" not in out and "blocks.1 .. blocks.2" in out
    assert "trf_blocks.2.att.mask (causal-mask buffer)" in out
    assert "optimizer_state_dict (not model weights)" in out


def test_inspect_summarises_a_trained_vocabulary(tmp_path, capsys):
    from gpt2fn import GPTConfig, init_params, save

    cfg = GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, trained_vocab=(3, 5, 90))
    path = save(init_params(cfg, seed=0), tmp_path / "m.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert "trained_vocab    3 ids (3..90): the model predicts only these" in capsys.readouterr().out


def test_inspect_all_lists_every_block(seed_pth, capsys):
    assert main(["inspect", str(seed_pth[0]), "--all"]) == 0
    assert "blocks.2.mlp.w_proj" in capsys.readouterr().out


def test_convert_to_gpt2fn_safetensors_keeps_the_weights_exactly(seed_pth, tmp_path, capsys):
    path, model = seed_pth
    dst = tmp_path / "out" / "model.safetensors"
    assert main(["convert", str(path), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    original, converted = load(path), load(dst)
    assert original.config == converted.config
    for (name, a), b in zip(params_to_dict(original).items(), params_to_dict(converted).values(), strict=True):
        assert torch.equal(a, b), name


def test_convert_casts_with_dtype(seed_pth, tmp_path):
    dst = tmp_path / "bf16.safetensors"
    assert main(["convert", str(seed_pth[0]), str(dst), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in params_to_dict(load(dst)).values()} == {torch.bfloat16}


def test_convert_to_a_hugging_face_directory_that_transformers_reads(tmp_path):
    from transformers import GPT2LMHeadModel

    args = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = randomize(NanoGPT(**args), seed=2)
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "hf") + "/"]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4
        assert (forward(load(tmp_path / "hf"), ids) - model(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_bad_file_is_one_error_line_and_exit_code_1(tmp_path, capsys, command):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    argv = [command, str(bad)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_an_uncached_hub_name_offline_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "distilgpt2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "distilgpt2" in err and "HF_HUB_OFFLINE" in err

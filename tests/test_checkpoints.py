"""Loading every layout gives the reference model's logits; saving and loading is exact; bad files are refused.

References are independent of gpt2fn: `transformers.GPT2LMHeadModel` saved with `save_pretrained`, and the
from-scratch seed `GPTModel` and nanoGPT modules of tests/reference_models.py, all with every parameter random.
"""

import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_models import NanoGPT, SeedGPTModel, randomize
from safetensors.torch import save_file

import gpt2fn
from gpt2fn import CheckpointError, GPTConfig, forward, init_params, load, load_checkpoint, params_to_dict, save
from gpt2fn.checkpoints import CheckpointNotFoundError, save_hf

TOL = 1e-4
VOCAB = 97


def ids_for(ctx: int, device: torch.device | str = "cpu", batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, ctx), generator=torch.Generator().manual_seed(1)).to(device)


def max_diff(params: gpt2fn.GPTParams, reference: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        want = reference(ids.cpu())
        want = want.logits if hasattr(want, "logits") else want
    return (forward(params, ids).cpu() - want).abs().max().item()


def assert_same_params(a: gpt2fn.GPTParams, b: gpt2fn.GPTParams) -> None:
    assert a.config == b.config
    da, db = params_to_dict(a), params_to_dict(b)
    assert list(da) == list(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        assert torch.equal(da[name].cpu(), db[name].cpu()), name


# ---------------------------------------------------------------------------------------------------------------
# The seed's GPTModel (.pth)


def seed_model(*, qkv_bias: bool, emb_dim: int = 128, n_heads: int = 2, ctx: int = 20) -> SeedGPTModel:
    cfg = dict(vocab_size=VOCAB, context_length=ctx, emb_dim=emb_dim, n_heads=n_heads, n_layers=2, drop_rate=0.1,
               qkv_bias=qkv_bias)
    return randomize(SeedGPTModel(cfg), seed=3)


@pytest.mark.parametrize("wrapping", ["raw", "wrapped", "compiled"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_seed_pth_gives_the_seed_models_logits(tmp_path, device, qkv_bias, wrapping):
    model = seed_model(qkv_bias=qkv_bias)
    sd = model.state_dict()
    if wrapping == "compiled":
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    if wrapping == "wrapped":
        opt = torch.optim.AdamW(model.parameters())
        sd = {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 3}
    torch.save(sd, tmp_path / "gpt2_model.pth")

    ckpt = load_checkpoint(tmp_path / "gpt2_model.pth", device=device)
    cfg = ckpt.params.config
    assert ckpt.layout == "seed"
    assert (cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (20, 128, 2, 2)  # ctx from the table
    assert (cfg.qkv_bias, cfg.tie_head, cfg.gelu) == (qkv_bias, False, "tanh")
    assert any("att.mask" in item for item in ckpt.ignored)
    assert max_diff(ckpt.params, model, ids_for(20, device)) < TOL


def test_seed_head_count_comes_from_the_argument_when_width_is_not_a_multiple_of_64(tmp_path):
    model = seed_model(qkv_bias=False, emb_dim=48, n_heads=3)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"m\.pth.*n_heads"):
        load(tmp_path / "m.pth")
    params = load(tmp_path / "m.pth", n_heads=3)
    assert max_diff(params, model, ids_for(20)) < TOL
    # the head count changes the function: a wrong one does not pass for the right one
    assert max_diff(load(tmp_path / "m.pth", n_heads=4), model, ids_for(20)) > 1e-3


def test_an_unrelated_config_json_next_to_a_file_is_left_alone(tmp_path):
    model = seed_model(qkv_bias=True)
    torch.save(model.state_dict(), tmp_path / "gpt2_model.pth")
    (tmp_path / "config.json").write_text('{"lr": 0.001, "n_head": 5}')
    ckpt = load_checkpoint(tmp_path / "gpt2_model.pth")
    assert ckpt.params.config.n_heads == 2 and len(ckpt.files) == 1
    (tmp_path / "config.json").write_text("{not json")
    assert max_diff(load(tmp_path / "gpt2_model.pth"), model, ids_for(20)) < TOL


def test_missing_unexpected_and_misshaped_keys_are_reported_together_by_their_names(tmp_path):
    sd = seed_model(qkv_bias=False).state_dict()
    del sd["trf_blocks.1.ff.layers.2.bias"]
    sd["trf_blocks.0.att.extra.weight"] = torch.zeros(3)
    sd["trf_blocks.0.att.out_proj.weight"] = torch.zeros(128, 64)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "broken.pth")
    message = str(info.value)
    assert "broken.pth" in message
    assert "missing keys (1): trf_blocks.1.ff.layers.2.bias" in message
    assert "unexpected keys (1): trf_blocks.0.att.extra.weight" in message
    assert "trf_blocks.0.att.out_proj.weight: got [128, 64], expected [128, 128]" in message


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2


def hf_model(*, n_embd: int, n_head: int, tie: bool = True, activation: str = "gelu_new", seed: int = 5):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=n_embd, n_layer=2, n_head=n_head,
                     activation_function=activation, tie_word_embeddings=tie, layer_norm_epsilon=1e-5,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    if not tie:  # separate values, so a head read from wte would show
        model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, n_embd))
    return randomize(model, seed=seed)


def write_hf(model, tmp_path: Path, form: str) -> Path:
    """`form`: a save_pretrained directory, a sharded one, a legacy pytorch_model.bin directory (no
    `transformer.` prefix, mask buffers), or a bare .safetensors file."""
    out = tmp_path / form
    if form == "dir":
        model.save_pretrained(out)
    elif form == "sharded":
        model.save_pretrained(out, max_shard_size="20KB")
        assert (out / "model.safetensors.index.json").is_file()
    elif form == "bin":
        model.save_pretrained(out)
        (out / "model.safetensors").unlink()
        n = model.config.n_positions
        sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, out / "pytorch_model.bin")
    else:
        out.mkdir()
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        out = out / "model.safetensors"
    return out


@pytest.mark.parametrize(("form", "n_embd", "n_head"), [
    ("dir", 128, 2),      # head dim 64
    ("dir", 48, 3),       # head dim 16: the count must come from config.json
    ("bin", 48, 3),
    ("sharded", 128, 2),
    ("bare", 128, 2),     # no config.json: 128 // 64 heads
])
def test_hugging_face_checkpoint_gives_gpt2lmheadmodels_logits(tmp_path, device, form, n_embd, n_head):
    model = hf_model(n_embd=n_embd, n_head=n_head)
    ckpt = load_checkpoint(write_hf(model, tmp_path, form), device=device)
    cfg = ckpt.params.config
    assert ckpt.layout == "hf"
    assert (cfg.emb_dim, cfg.n_heads, cfg.context_length, cfg.tie_head, cfg.qkv_bias) == (n_embd, n_head, 24,
                                                                                           True, True)
    assert ckpt.params.head is None
    if form == "bin":
        assert sum("mask buffer" in item for item in ckpt.ignored) == 4
    assert max_diff(ckpt.params, model, ids_for(24, device)) < TOL


def test_hugging_face_untied_head_and_erf_gelu_follow_config_json(tmp_path):
    model = hf_model(n_embd=64, n_head=4, tie=False, activation="gelu")
    params = load(write_hf(model, tmp_path, "dir"))
    assert (params.config.tie_head, params.config.gelu, params.config.n_heads) == (False, "erf", 4)
    assert params.head is not None and not torch.equal(params.head, params.tok_emb.T)
    assert max_diff(params, model, ids_for(24)) < TOL


def test_hugging_face_safetensors_load_without_copying_the_file(tmp_path):
    """The tensors are views of the memory-mapped file: loading does not hold a second copy."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    path = write_hf(hf_model(n_embd=64, n_head=1), tmp_path, "dir") / "model.safetensors"
    params = load(path.parent)
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
             for line in maps.read_text().splitlines() if line.endswith(str(path))]
    assert spans, "the file is not memory-mapped"
    for name, t in params_to_dict(params).items():
        assert any(a <= t.data_ptr() < b for a, b in spans), f"{name} was copied out of the mapping"


def test_hugging_face_config_json_that_disagrees_or_asks_for_more_is_refused(tmp_path):
    import json

    out = write_hf(hf_model(n_embd=64, n_head=1), tmp_path, "dir")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"n_layer=3 \(tensors say 2\)"):
        load(out)
    (out / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load(out)


def test_saved_hugging_face_directory_is_read_by_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    for cfg in (GPTConfig(vocab_size=VOCAB, context_length=24, emb_dim=48, n_heads=3, n_layers=2),   # seed-like
                GPTConfig(vocab_size=VOCAB, context_length=24, emb_dim=48, n_heads=4, n_layers=2, bias=False,
                          qkv_bias=False, tie_head=True, gelu="erf")):
        params = init_params(cfg, seed=7)
        out = save_hf(params, tmp_path / f"hf-{cfg.bias}")
        model = GPT2LMHeadModel.from_pretrained(out).eval()
        assert max_diff(params, model, ids_for(24)) < TOL


def test_a_trained_vocabulary_is_exported_as_suppressed_tokens_for_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    rows = (1, 4, 9, 20)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=24, emb_dim=48, n_heads=3, n_layers=1, tie_head=True,
                    trained_vocab=rows)
    out = save_hf(init_params(cfg, seed=3), tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    assert sorted(model.generation_config.suppress_tokens) == [i for i in range(VOCAB) if i not in rows]
    ids = model.generate(torch.tensor([[1, 2]]), max_new_tokens=12, do_sample=True, temperature=5.0,
                         top_k=0, pad_token_id=0)
    assert set(ids[0, 2:].tolist()) <= set(rows)
    save_hf(init_params(cfg.replace(trained_vocab=None), seed=3), out)  # re-export without: no stale mask
    assert not (out / "generation_config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT


@pytest.mark.parametrize(("bias", "mask_buffer", "compiled"), [
    (True, False, True), (True, True, False), (False, True, True), (False, False, False)])
def test_nanogpt_ckpt_gives_nanogpts_logits(tmp_path, device, bias, mask_buffer, compiled):
    args = dict(n_layer=2, n_head=2, n_embd=48, block_size=24, bias=bias, vocab_size=VOCAB, dropout=0.0)
    model = randomize(NanoGPT(**{k: v for k, v in args.items() if k != "dropout"}, mask_buffer=mask_buffer), 9)
    sd = model.state_dict()
    assert "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    opt = torch.optim.AdamW(model.parameters())
    ckpt_dict = {"model": sd, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 100,
                 "best_val_loss": torch.tensor(2.5), "config": {"batch_size": 12, "compile": compiled}}
    torch.save(ckpt_dict, tmp_path / "ckpt.pt")

    ckpt = load_checkpoint(tmp_path / "ckpt.pt", device=device)
    cfg = ckpt.params.config
    assert ckpt.layout == "nanogpt"
    assert (cfg.bias, cfg.qkv_bias, cfg.tie_head, cfg.gelu, cfg.n_heads) == (bias, bias, True, "erf", 2)
    assert any(item.startswith("lm_head.weight") for item in ckpt.ignored)
    assert max_diff(ckpt.params, model, ids_for(24, device)) < TOL


def test_nanogpt_padded_vocabulary_is_never_generated(tmp_path):
    args = dict(n_layer=1, n_head=1, n_embd=64, block_size=8, bias=False, vocab_size=50304)
    model = randomize(NanoGPT(**args), 2)
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    params = load(tmp_path / "ckpt.pt")
    assert (params.config.vocab_size, params.config.token_vocab_size, params.config.n_tokens) == (50304, 50257,
                                                                                                  50257)
    ids = torch.tensor([[50256, 11, 995]])
    with torch.no_grad():
        assert (forward(params, ids) - model(ids)).abs().max().item() < TOL


def test_raw_nanogpt_state_dict_is_told_from_hugging_face_by_orientation(tmp_path):
    model = randomize(NanoGPT(vocab_size=VOCAB, block_size=24, n_layer=1, n_head=1, n_embd=64, bias=True), 4)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ckpt = load_checkpoint(tmp_path / "sd.pt")
    assert ckpt.layout == "nanogpt"
    assert max_diff(ckpt.params, model, ids_for(24)) < TOL


# ---------------------------------------------------------------------------------------------------------------
# gpt2fn's own files


@settings(max_examples=8)
@given(vocab=st.integers(5, 40), ctx=st.integers(2, 12), heads=st.integers(1, 3), head_dim=st.integers(1, 5),
       layers=st.integers(1, 3), qkv_bias=st.booleans(), bias=st.booleans(), tie=st.booleans(),
       gelu=st.sampled_from(["tanh", "erf"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_save_then_load_gives_back_the_same_tree_exactly(tmp_path_factory, vocab, ctx, heads, head_dim, layers,
                                                         qkv_bias, bias, tie, gelu, dtype):
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=heads * head_dim, n_heads=heads,
                    n_layers=layers, qkv_bias=qkv_bias, bias=bias, tie_head=tie, gelu=gelu, ln_eps=1e-6,
                    token_vocab_size=vocab - 1, drop_rate=0.05)
    params = init_params(cfg, seed=vocab, dtype=dtype)
    path = save(params, tmp_path_factory.mktemp("rt") / "model.safetensors")
    ckpt = load_checkpoint(path)
    assert ckpt.layout == "gpt2fn" and ckpt.ignored == ()
    assert_same_params(ckpt.params, params)


def test_load_moves_and_casts_to_the_requested_device_and_dtype(tmp_path, device, tiny_config):
    params = init_params(tiny_config, seed=0)
    save(params, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", device=device, dtype="bf16")
    leaves = params_to_dict(loaded).values()
    assert {t.dtype for t in leaves} == {torch.bfloat16}
    assert {t.device.type for t in leaves} == {device.type}
    assert torch.equal(loaded.tok_emb.cpu(), params.tok_emb.to(torch.bfloat16))


def test_save_is_atomic_an_interrupted_write_leaves_the_old_file(tmp_path, tiny_config, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = init_params(tiny_config, seed=0)
    save(old, path)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gpt2fn.checkpoints.native.save_file", crash)
    with pytest.raises(CheckpointError, match="could not write"):
        save(init_params(tiny_config, seed=1), path)
    assert_same_params(load(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_head_that_shares_memory_with_the_embedding_is_saved(tmp_path):
    cfg = GPTConfig(vocab_size=VOCAB, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_head=False)
    params = init_params(cfg, seed=0)
    params = params.replace(head=params.tok_emb.T)  # a view: safetensors refuses overlapping tensors as they are
    assert_same_params(load(save(params, tmp_path / "m.safetensors")), params)


# ---------------------------------------------------------------------------------------------------------------
# Safety and faults


class _Payload:
    """Unpickling this creates `marker`: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_its_code_does_not_run(tmp_path, container):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload works when unpickled

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    state = {"tok_emb.weight": torch.zeros(3, 2), "evil": _Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=(container == "zip"))
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert "trusted environment" in str(info.value)
    assert not marker.exists()


def _good_pt(tmp_path: Path) -> bytes:
    torch.save(seed_model(qkv_bias=False).state_dict(), tmp_path / "good.pth")
    return (tmp_path / "good.pth").read_bytes()


def _good_safetensors(tmp_path: Path) -> bytes:
    save(init_params(gpt2fn.preset("tiny"), seed=0), tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


@pytest.mark.parametrize(("name", "make", "expected"), [
    ("empty.pt", lambda tmp: b"", r"is empty"),
    ("garbage.bin", lambda tmp: bytes(range(7, 256)) * 4, r"expected a safetensors file or a torch\.save"),
    ("truncated.pth", lambda tmp: _good_pt(tmp)[:5000], r"truncated or corrupt"),
    ("truncated.safetensors", lambda tmp: _good_safetensors(tmp)[:-100], r"truncated or corrupt"),
    ("cut-header.safetensors", lambda tmp: _good_safetensors(tmp)[:40], r"truncated safetensors file"),
])
def test_broken_files_are_refused_with_a_message_naming_the_file(tmp_path, name, make, expected):
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(CheckpointError, match=expected) as info:
        load(path)
    assert str(path) in str(info.value)


def test_unknown_layouts_and_containers_are_refused_with_what_was_expected(tmp_path):
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError, match=r"bert\.safetensors.*layout gpt2fn does not know.*nanoGPT"):
        load(tmp_path / "bert.safetensors")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list; expected a state dict"):
        load(tmp_path / "list.pt")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty-dir is a directory without model weights.*model\.safetensors"):
        load(tmp_path / "empty-dir")


def test_a_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        load(tmp_path / "nope.pth")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError) and issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Hub names


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home, offline: nothing can be downloaded."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def fake_cached_repo(home: Path, repo: str, model) -> Path:
    """Lay out `home/hub/models--org--name/{refs/main, snapshots/<hash>/...}` as huggingface_hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    model.save_pretrained(root / "snapshots" / commit)
    return root / "snapshots" / commit


def test_hub_name_offline_and_not_cached_says_how_to_get_the_files(hf_home):
    with pytest.raises(CheckpointNotFoundError) as info:
        load("gpt2-medium")
    message = str(info.value)
    assert "gpt2-medium" in message and "HF_HUB_OFFLINE" in message and "hf download" in message
    assert str(hf_home / "hub") in message


@pytest.mark.parametrize(("name", "cached_as"), [
    ("gpt2", "gpt2"), ("gpt2", "openai-community/gpt2"), ("someone/tiny-gpt2", "someone/tiny-gpt2")])
def test_hub_name_resolves_from_the_local_cache(hf_home, name, cached_as):
    model = hf_model(n_embd=48, n_head=3)
    snapshot = fake_cached_repo(hf_home, cached_as, model)
    ckpt = load_checkpoint(name)
    assert ckpt.layout == "hf" and ckpt.params.config.n_heads == 3
    assert Path(ckpt.source) == snapshot
    assert max_diff(ckpt.params, model, ids_for(24)) < TOL


def test_a_file_name_is_never_taken_for_a_hub_name(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no such file or directory: gpt2.pth"):
        load("gpt2.pth")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_an_unreadable_file_is_reported_not_raised_from_deep_inside(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = tmp_path / "m.safetensors"
    save(init_params(gpt2fn.preset("tiny"), seed=0), path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load(path)


def test_safetensors_whose_header_length_looks_like_a_pickle_mark_is_still_safetensors(tmp_path):
    # a header of 1152 (+ 65536 k) bytes starts with b"\x80\x04", the bytes a protocol-4 pickle starts with
    cfg = gpt2fn.GPTConfig(vocab_size=5, context_length=2, emb_dim=8, n_heads=2, n_layers=1, qkv_bias=True,
                           bias=False, tie_head=True, drop_rate=0.0)  # a header under 1152 bytes to pad up
    params = gpt2fn.init_params(cfg, seed=0, dtype=torch.bfloat16)
    path = gpt2fn.save(params, tmp_path / "model.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        tensors, metadata = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    for pad in range(0, 400):  # an extra metadata entry grows the header until its length is 0x0480 = 1152
        save_file(tensors, str(path), metadata={**metadata, "padding": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x04":
            break
    assert path.read_bytes()[:2] == b"\x80\x04"
    back = gpt2fn.load(path)
    assert back.config == cfg and torch.equal(back.tok_emb, params.tok_emb)

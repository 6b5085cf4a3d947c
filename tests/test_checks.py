"""The one home of each shared check (gpt2fn.checks, params.check_params, gpt2fn.devices, losses.perplexity): the
check itself, and that every entry point that needs it reaches it (the same message everywhere)."""

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2fn
from gpt2fn import beam_search, decode_step, forward, generate_tokens, init_cache, init_params, preset, score
from gpt2fn.checks import check_ids, check_layer, check_prompt_ids, check_token_range, first_out_of_range
from gpt2fn.devices import DTYPES, default_device, dtype_name, parse_device, parse_dtype
from gpt2fn.losses import perplexity
from gpt2fn.params import check_params
from gpt2fn.scoring import Score
from gpt2fn.train.precision import compute_dtype

CFG = preset("tiny")  # vocab 97, ctx 32, 2 layers
VOCAB = CFG.vocab_size
RANGE = re.escape(f"outside this model's vocabulary [0, {VOCAB})")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


# -- token ids -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [torch.tensor([[3, 97, 5]]), np.array([[3, 97, 5]], dtype=np.uint16),
                                    [[3, 97, 5]][0], 97], ids=["tensor", "numpy", "list", "int"])
def test_a_token_id_past_the_vocabulary_is_named_with_where_it_is_in_every_container(values):
    where = {"tensor": r" at \[0, 1\]", "numpy": r" at \[0, 1\]", "list": r" at \[1\]", "int": ""}
    kind = ("tensor" if isinstance(values, torch.Tensor) else "numpy" if isinstance(values, np.ndarray)
            else "int" if isinstance(values, int) else "list")
    with pytest.raises(ValueError, match=rf"^my ids hold token id 97{where[kind]}, {RANGE}.*gpt2fn\.encode"):
        check_token_range(values, VOCAB, what="my ids")


def test_negative_ids_are_out_of_range_and_in_range_ids_pass():
    with pytest.raises(ValueError, match=rf"token id -1 at \[1\], {RANGE}"):
        check_token_range([0, -1], VOCAB)
    for ok in (torch.arange(VOCAB), np.arange(VOCAB), list(range(VOCAB)), 0, torch.empty(0, dtype=torch.long)):
        check_token_range(ok, VOCAB)
    assert first_out_of_range(torch.tensor([5, -100, 2]), 0, 10, allowed=-100) is None
    assert first_out_of_range(torch.tensor([5, -7, 2]), 0, 10, allowed=-100) == ([1], -7)


def test_the_range_check_steps_aside_where_values_cannot_be_read():
    meta = torch.full((1, 3), 500, dtype=torch.long, device="meta")
    assert first_out_of_range(meta, 0, VOCAB) is None  # no values on the meta device: embedding's own check
    seen = torch.func.vmap(lambda row: (check_token_range(row, VOCAB), row)[1])(torch.full((2, 3), 500))
    assert seen.shape == (2, 3)  # vmap over ids: a batched tensor has no Python value to test


@pytest.mark.parametrize(("ids", "error", "match"), [
    ([[1, 2]], TypeError, r"ids must be a torch\.Tensor.*gpt2fn\.encode"),
    (torch.tensor([1, 2]), ValueError, r"\[batch, seq\] token ids; got shape \[2\].*ids\[None\]"),
    (torch.ones(1, 2), ValueError, r"integer tensor of token ids; got dtype torch\.float32"),
    (torch.ones(1, 0, dtype=torch.long), ValueError, "seq = 0 positions"),
    (torch.ones(1, 33, dtype=torch.long), ValueError, "33 positions .* exceeds context_length 32"),
])
def test_check_ids_names_type_shape_dtype_length_and_context(ids, error, match):
    with pytest.raises(error, match=match):
        check_ids(CFG, ids)
    check_ids(CFG, torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="after 30 cached"):
        check_ids(CFG, torch.ones(1, 3, dtype=torch.long), start=30)


def test_prompt_checks_read_real_tokens_only_and_name_their_place():
    ids = torch.tensor([[999, 4, 5], [1, 2, 3]])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    check_prompt_ids(ids, mask, VOCAB)  # the padded 999 is never read
    with pytest.raises(ValueError, match=rf"prompt ids hold token id 999 at \[0, 0\], {RANGE}"):
        check_prompt_ids(ids, None, VOCAB)
    with pytest.raises(ValueError, match="pad on the left"):
        check_prompt_ids(ids, torch.tensor([[True, True, False], [True, True, True]]), VOCAB)
    with pytest.raises(ValueError, match="hold no prompt"):
        check_prompt_ids(torch.ones(0, 3, dtype=torch.long), None, VOCAB)


ENTRY_POINTS = {
    "forward": lambda p: forward(p, torch.tensor([[1, VOCAB]])),
    "loss": lambda p: gpt2fn.loss(p, torch.tensor([[1, VOCAB]]), torch.tensor([[1, 2]])),
    "decode_step": lambda p: decode_step(p, init_cache(p.config, 1, 8), torch.tensor([[1, VOCAB]])),
    "generate_tokens": lambda p: generate_tokens(p, torch.tensor([[1, VOCAB]]), max_new_tokens=1),
    "beam_search": lambda p: beam_search(p, torch.tensor([[1, VOCAB]]), num_beams=2, max_new_tokens=1),
    "score": lambda p: score(p, [1, VOCAB]),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_reports_a_bad_id_with_the_one_message(params, name):
    with pytest.raises(ValueError, match=rf"token id {VOCAB} at \[[0-9, ]+\], {RANGE}"):
        ENTRY_POINTS[name](params)


def test_gpt2_text_for_a_small_vocabulary_is_refused_by_generate_with_the_one_message():
    with pytest.raises(ValueError, match=rf"prompt ids hold token id \d+ at \[0, 0\], {RANGE}"):
        gpt2fn.generate(init_params(CFG), "Hello")


# -- the params tree -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda p: check_params(p), lambda p: gpt2fn.generate_tokens(p, torch.ones(1, 2, dtype=torch.long)),
    lambda p: beam_search(p, torch.ones(1, 2, dtype=torch.long), num_beams=2, max_new_tokens=1),
    lambda p: score(p, [1, 2]), lambda p: gpt2fn.study.ov_circuit(p, 0), lambda p: gpt2fn.validate(p),
], ids=["check_params", "generate_tokens", "beam_search", "score", "ov_circuit", "validate"])
def test_something_other_than_a_params_tree_is_one_type_error(params, call):
    with pytest.raises(TypeError, match=r"params must be a GPTParams tree \(from gpt2fn\.load or init_params\), "
                                        r"got dict"):
        call(gpt2fn.params_to_dict(params))
    assert check_params(params) is params


# -- layers --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "good", "bad"), [
    ("block", {0: 0, 1: 1, -1: 1, -2: 0}, [2, -3]),
    ("boundary", {0: 0, 2: 2, -1: 1, -2: 0}, [3, -3]),  # forward's stop_at_layer: -1 is before the last block
    ("point", {0: 0, 2: 2, -1: 2, -3: 0}, [3, -4]),     # decompose's points: -1 is after the last block
])
def test_layer_indices_of_each_kind_count_from_the_end_and_name_the_range(kind, good, bad):
    for given, index in good.items():
        assert check_layer(CFG, given, kind=kind) == index
    for given in [*bad, True, 1.0, "0"]:
        with pytest.raises(ValueError, match=rf"--layer must be an int in 0\.\.\d .*2 layers; got {given!r}"):
            check_layer(CFG, given, name="--layer", kind=kind)
    assert check_layer(CFG, None, allow_none=True) is None
    with pytest.raises(ValueError, match="None or an int"):
        check_layer(CFG, 9, allow_none=True)


def test_every_layer_argument_goes_through_the_one_check(params):
    from gpt2fn.study import accumulated_resid, attn_weights, run_for_decompose

    with pytest.raises(ValueError, match=r"stop_at_layer must be None or an int in 0\.\.2"):
        forward(params, torch.ones(1, 2, dtype=torch.long), stop_at_layer=3)
    with pytest.raises(ValueError, match=r"^layer must be an int in 0\.\.1 \(a block\)"):
        attn_weights(params, 2)
    _, acts = run_for_decompose(params, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"accumulated_resid: layer must be None or an int in 0\.\.2"):
        accumulated_resid(params, acts, 5)


# -- devices -------------------------------------------------------------------------------------------------------

def test_auto_is_cuda_then_mps_then_cpu(monkeypatch):
    assert parse_device("auto") == default_device() and parse_device(" AUTO ") == default_device()
    mps = getattr(torch.backends, "mps", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)
        assert default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is None, reason="this torch build has no torch.backends.mps")
def test_the_train_command_takes_the_one_policy_so_auto_can_pick_mps(monkeypatch):
    from gpt2fn.commands.train import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _device(argparse.Namespace(device="auto")) == "mps"
    assert _device(argparse.Namespace(device="cpu")) == "cpu"


@pytest.mark.parametrize(("name", "match"), [("warp-drive", "not a device torch knows"),
                                             ("cuda:99", "cuda:99"), (3, "must be a torch.device or a name")])
def test_bad_devices_are_value_errors_naming_them(name, match):
    if name == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    with pytest.raises(ValueError, match=match):
        parse_device(name)
    assert parse_device(None) is None and parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", ["generate", "eval", "attention", "train"])
def test_every_model_command_has_the_shared_options_with_auto_as_the_default_device(command):
    from gpt2fn.cli import build_parser

    parser = build_parser()
    argv = {"generate": ["Hi"], "eval": ["--data", "x"], "attention": ["Hi"], "train": ["--data", "x", "--out", "y"]}
    args = parser.parse_args([command, *argv[command]])
    assert args.device == "auto" and args.checkpoint is None and args.model is None
    args = parser.parse_args([command, "--device", "cpu", "--dtype", "bf16", "--model", "gpt2", *argv[command]])
    assert (args.device, args.dtype, args.model) == ("cpu", "bf16", "gpt2")


# -- dtypes --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_name_reads_and_the_name_of_a_dtype_reads_back(name):
    dtype = parse_dtype(name)
    assert dtype is DTYPES[name] and parse_dtype(name.upper()) is dtype
    assert parse_dtype(dtype_name(dtype)) is dtype and parse_dtype(f"torch.{dtype_name(dtype)}") is dtype
    assert compute_dtype(name) == (None if dtype == torch.float32 else dtype)  # training's names are the same table


def test_dtype_names_are_torch_names_and_bad_ones_list_the_choices():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)] == [
        "float32", "bfloat16", "float16", "int64"]
    assert parse_dtype(None) is None and parse_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose one of float32, fp32, .*half"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="must be a torch.dtype or a name"):
        parse_dtype(32)
    with pytest.raises(gpt2fn.CheckpointError, match="unknown dtype 'fp8'"):  # load reports it as its own error
        gpt2fn.load(Path("unused.safetensors"), dtype="fp8")


# -- perplexity ----------------------------------------------------------------------------------------------------

def test_perplexity_is_exp_of_the_loss_and_inf_where_exp_overflows():
    assert perplexity(0.0) == 1.0 and perplexity(2.5) == pytest.approx(math.exp(2.5))
    assert perplexity(709.7) == math.exp(709.7)  # the largest losses still give a finite float
    assert perplexity(709.8) == math.inf and perplexity(1e6) == math.inf
    huge = Score(ids=(1, 2), positions=(1,), logprobs=torch.tensor([-800.0]), log_likelihood=-800.0, n_tokens=1)
    assert huge.perplexity == math.inf
    assert gpt2fn.train.perplexity is perplexity

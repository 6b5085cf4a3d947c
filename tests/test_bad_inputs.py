"""Every bad input gets one clear error of a documented type: the API (forward, loss, generate, load,
init_params) raises ValueError / TypeError / CheckpointError naming the argument; the CLI prints one line for
those and lets anything else through with its traceback (`--debug`: always). Plus the atomic write's temp files.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2fn
from gpt2fn import CheckpointError, forward, generate, init_params, load, loss, save
from gpt2fn.cli import CLIError, main
from gpt2fn.files import TEMP_SUFFIX, atomic_write_text, remove_stale_temps
from gpt2fn.shapes import ShapeError, shape_checks
from gpt2fn.train.state import STATE_FILE

CFG = gpt2fn.GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory) -> Path:
    return save(params, tmp_path_factory.mktemp("bad") / "m.safetensors")


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor([values])


API = [
    ("forward id >= vocab", lambda p, c: forward(p, _ids(1, 300)), ValueError, r"token id 300 at \[0, 1\].*\[0, 300\)"),
    ("forward negative id", lambda p, c: forward(p, _ids(-1, 2)), ValueError, r"token id -1 .*vocabulary"),
    ("loss target >= vocab", lambda p, c: loss(p, _ids(1, 2), _ids(2, 999)), ValueError, r"targets hold 999"),
    ("loss negative target", lambda p, c: loss(p, _ids(1, 2), _ids(-5, 3)), ValueError, r"ignore_index=-100"),
    ("loss fused target", lambda p, c: loss(p, _ids(1, 2), _ids(2, 300), fused_head=True), ValueError,
     r"targets hold 300"),
    ("generate int prompt", lambda p, c: generate(p, 123), TypeError, r"prompt must be a string.*int"),
    ("generate None prompt", lambda p, c: generate(p, None), TypeError, r"prompt must be a string.*NoneType"),
    ("generate bytes prompt", lambda p, c: generate(p, b"Hello"), TypeError, r"decode"),
    ("generate bytes in list", lambda p, c: generate(p, ["a", b"b"]), TypeError, r"prompt 1 is bytes"),
    ("generate int stop", lambda p, c: generate(p, "Hi", stop=5), TypeError, r"stop must be a string"),
    ("generate str seed, greedy", lambda p, c: generate(p, "Hi", seed="abc"), TypeError, r"seed must be an int"),
    ("generate bad device", lambda p, c: generate(p, "Hi", device="nonsense"), ValueError, r"'nonsense'"),
    ("stream list prompt", lambda p, c: next(gpt2fn.stream(p, ["a"])), ValueError, r"one prompt string"),
    ("stream str seed", lambda p, c: next(gpt2fn.stream(p, "Hi", seed="abc")), TypeError, r"seed must be an int"),
    ("load bad device", lambda p, c: load(c, device="nonsense"), CheckpointError, r"'nonsense'.*cpu, cuda"),
    ("load absent GPU", lambda p, c: load(c, device="cuda:99"), CheckpointError, r"cuda:99"),
    ("load int dtype name", lambda p, c: load(c, dtype="int8"), CheckpointError, r"unknown dtype 'int8'"),
    ("load int dtype", lambda p, c: load(c, dtype=torch.int8), CheckpointError, r"floating"),
    ("load dtype of wrong type", lambda p, c: load(c, dtype=5), CheckpointError, r"dtype must be"),
    ("init_params int8", lambda p, c: init_params(CFG, dtype=torch.int8), ValueError, r"floating dtype"),
    ("init_params dtype str", lambda p, c: init_params(CFG, dtype="int8"), TypeError, r"torch\.dtype"),
]


@pytest.mark.parametrize(("name", "call", "error", "message"), API, ids=[a[0] for a in API])
def test_bad_api_input_raises_one_documented_error(params, ckpt, name, call, error, message):
    with pytest.raises(error, match=message):
        call(params, ckpt)


def test_a_target_outside_a_trained_vocabulary_is_a_value_error():
    p = init_params(CFG.replace(trained_vocab=(0, 1, 2, 5)), seed=0)
    assert torch.isfinite(loss(p, _ids(1, 2), _ids(5, -100)))
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"targets hold 4 .*trained on"):
            loss(p, _ids(1, 2), _ids(5, 4), fused_head=fused)


def test_ids_are_checked_with_shape_checks_off(params):
    with shape_checks(False):
        with pytest.raises(TypeError, match=r"ids must be a torch\.Tensor.*list"):
            forward(params, [[1, 2]])
        with pytest.raises(ValueError, match="token id 300"):
            forward(params, _ids(300))
        with pytest.raises(ValueError, match="integer tensor"):
            forward(params, _ids(1, 2).float())
        with pytest.raises(TypeError, match=r"targets must be a torch\.Tensor"):
            loss(params, _ids(1, 2), [[1, 2]])


def test_valid_ids_and_ignored_targets_still_work_under_vmap_and_grad(params):
    ids = torch.tensor([[1, 2, 3], [4, 5, 299]])
    targets = torch.tensor([[2, 3, -100], [5, 299, 0]])
    per_row = torch.func.vmap(lambda row: forward(params, row[None])[0])(ids)  # the range check steps aside
    assert torch.allclose(per_row, forward(params, ids), atol=1e-5)
    grads = torch.func.grad(lambda p: loss(p, ids, targets))(params)
    assert torch.isfinite(grads.tok_emb).all()


# ---------------------------------------------------------------------------------------------------------------
# CLI: one line for documented errors, a traceback for anything else


def _one_line(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err


def test_cli_generate_bad_devices_are_one_line(ckpt, capsys):
    for device in ("nonsense", "cuda:99"):
        argv = ["generate", "--checkpoint", str(ckpt), "--device", device, "Hi"]
        _one_line(capsys, argv, f"error: --device.*{device}")


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return corpus


def test_cli_train_out_is_a_file_and_a_truncated_state_are_one_line(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    flags = ["--data", str(corpus), "--preset", "tiny", "--steps", "1", "--context", "8", "--batch-size", "1",
             "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    _one_line(capsys, ["train", "--out", str(corpus), *flags], r"error: --out .* is a file")
    out = tmp_path / "run"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\"")
    _one_line(capsys, ["train", "--out", str(out), "--resume", *flags], rf"error: .*{STATE_FILE}.*truncated or corrupt")


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize(("raised", "one_line"), [
    (CLIError("bad flag"), True), (CheckpointError("x.pth is corrupt"), True), (ShapeError("w has shape [3]"), True),
    (ValueError("top_p must be in (0, 1]"), True), (FileNotFoundError("no such file: x"), True),
    (_Boom("CUDA out of memory"), False), (KeyError("a bug"), False), (TypeError("unhashable type"), False),
])
def test_cli_policy_documented_errors_are_one_line_others_keep_their_traceback(monkeypatch, capsys, raised, one_line):
    from gpt2fn.commands import inspect as command

    def run(args):
        raise raised

    monkeypatch.setattr(command, "run", run)
    if one_line:
        _one_line(capsys, ["inspect", "x"], "error: " + re.escape(str(raised).strip("'")))
        with pytest.raises(type(raised)):
            main(["--debug", "inspect", "x"])
        with pytest.raises(type(raised)):
            main(["inspect", "x", "--debug"])
    else:
        with pytest.raises(type(raised)):
            main(["inspect", "x"])


# ---------------------------------------------------------------------------------------------------------------
# The atomic write: no umask change, temp files of dead writers removed, nobody else's


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_of_dead_writers_are_removed_and_nothing_else(tmp_path, params):
    from gpt2fn.files import _host

    dead = tmp_path / f".m.safetensors.{_host()}-{_dead_pid()}.0a1b{TEMP_SUFFIX}"
    live = tmp_path / f".m.safetensors.{_host()}-{os.getpid()}.0a1c{TEMP_SUFFIX}"
    other_host = tmp_path / f".m.safetensors.elsewhere-{_dead_pid()}.0a1d{TEMP_SUFFIX}"
    unrelated = tmp_path / ".m.safetensors.123.tmp"
    for p in (dead, live, other_host, unrelated):
        p.write_bytes(b"partial")
    save(params, tmp_path / "m.safetensors")  # the write removes its target's stale temporaries first
    assert not dead.exists() and live.exists() and other_host.exists() and unrelated.exists()
    dead2 = tmp_path / f".state.safetensors.{_host()}-{_dead_pid()}.ff{TEMP_SUFFIX}"
    dead2.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [dead2]


def test_atomic_write_uses_the_umask_without_changing_it(tmp_path):
    before = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert os.umask(0o027) == 0o027  # unchanged by the write
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(before)
    import gpt2fn.train.state  # noqa: F401 -- importing it no longer touches the umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

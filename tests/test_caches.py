"""Caches that cannot hurt: every file gpt2fn reuses between runs (the native kernel build, the GPT-2 BPE table, the
training token cache) is verified before use. Damaged any way (cut at any length, emptied, bytes flipped or
overwritten, another key's entry swapped in), the next run, in a fresh process with its own `XDG_CACHE_HOME`,
finishes with the right result or stops with gpt2fn's documented error; it never dies by a signal, and training
never sees tokens that are not its corpus's. Two processes filling one empty entry at once leave one valid entry.

Each example is a subprocess (a damaged `.so` killed its process with SIGBUS) costing seconds, and a damaged
kernel a real rebuild, so the example counts are small; the damage kinds are few, and every kind is drawn often.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import files
from gpt2fn import tokenizer as tok
from gpt2fn.train.data import encode_documents

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DAMAGED = "is damaged"

# One damage to one file: (kind, where in the file as a fraction of its length, payload).
damages = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(b"")),
    st.tuples(st.just("empty"), st.just(0.0), st.just(b"")),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255).map(lambda m: bytes([m]))),
    st.tuples(st.just("overwrite"), st.floats(0.0, 1.0, exclude_max=True), st.binary(min_size=1, max_size=4096)),
    st.tuples(st.just("swap"), st.just(0.0), st.just(b"")),
)


def _damage(path: Path, damage: tuple[str, float, bytes], other: Path) -> bool:
    """Apply `damage` to `path` in place (`swap`: replace it, and its check file if any, by the entry `other`).
    Returns whether the bytes of `path` changed."""
    kind, where, payload = damage
    before = path.read_bytes()
    if kind == "swap":
        shutil.copyfile(other, path)
        check = other.with_name(other.name + files.CHECK_SUFFIX)
        if check.exists() and path.with_name(path.name + files.CHECK_SUFFIX).exists():
            shutil.copyfile(check, path.with_name(path.name + files.CHECK_SUFFIX))
    else:
        data = bytearray(before)
        at = int(where * len(data))
        if kind == "truncate":
            del data[at:]
        elif kind == "empty":
            data.clear()
        elif kind == "flip" and data:
            data[at] ^= payload[0]
        elif kind == "overwrite":
            data[at:at + len(payload)] = payload
        path.write_bytes(bytes(data))
    return path.read_bytes() != before


def _env(cache: Path, **extra: str) -> dict[str, str]:
    """A fresh process's environment: its own user cache, no table override, and no way to download (tiktoken's
    fallback finds an empty cache and a refused proxy), so every outcome comes from the cache under test."""
    env = {k: v for k, v in os.environ.items() if k != tok.ENV_VAR}
    empty = cache / "tiktoken-empty"
    empty.mkdir(parents=True, exist_ok=True)
    env |= {"XDG_CACHE_HOME": str(cache), "TIKTOKEN_CACHE_DIR": str(empty), "PYTHONPATH": str(ROOT),
            "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    return env | extra


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode >= 0, f"killed by {signal.Signals(-done.returncode).name}:\n{done.stderr}"
    return done


def _start(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode >= 0, f"killed by {signal.Signals(-proc.returncode).name}:\n{err}"
    return proc.returncode, out, err


def _verifies(path: Path, key: str) -> bool:
    fh, _ = files.open_checked(path, key)
    if fh is None:
        return False
    fh.close()
    return True


def _other_entry(directory: Path) -> Path:
    """A valid cache entry of another key (its own check file agrees with it), to swap in."""
    other = directory / "other-entry"
    files.atomic_write_bytes(other, np.arange(3000, dtype=np.uint16).tobytes())
    files.write_check(other, "another key")
    return other


def _no_temps(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(files.TEMP_SUFFIX)]


# ---------------------------------------------------------------- the native kernel build

_KERNEL_PROBE = """
import torch
from gpt2fn import kernels, native
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(3, 24, generator=g), torch.randn(24, 40, generator=g), torch.randn(40, generator=g)
print(native.status())
with torch.no_grad():
    print(kernels.native_applies(x, w, b), bool(torch.allclose(kernels.native_affine(x, w, b), x @ w + b, atol=1e-4)))
"""


def _kernel_entry(cache: Path) -> tuple[Path, str]:
    (so,) = (cache / "gpt2fn" / "native").glob("*/libgpt2fn_affine.so")
    return so, so.parent.name


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user cache holding one native build (made once here; each damage case works on a copy of it)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    done = _run(_KERNEL_PROBE, _env(cache))
    status = done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else done.stderr[-300:]
    if not status.startswith("on:"):
        pytest.skip(f"the native kernel cannot be built here ({status}); it is optional")
    return cache


def _assert_kernel_right(done: subprocess.CompletedProcess[str], cache: Path) -> None:
    assert done.returncode == 0, done.stderr
    status, result = done.stdout.strip().splitlines()[-2:]
    assert status.startswith("on:") and result == "True True", done.stdout
    so, key = _kernel_entry(cache)
    assert _verifies(so, key), "the build left in the cache does not match its check"


@settings(max_examples=3, deadline=None)
@given(damage=damages, target=st.sampled_from(["build", "check"]))
def test_a_damaged_kernel_build_is_rebuilt_never_loaded(built_kernel, damage, target):
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        shutil.copytree(built_kernel / "gpt2fn", cache / "gpt2fn", ignore=shutil.ignore_patterns("*.lock"))
        so, _ = _kernel_entry(cache)
        victim = so if target == "build" else so.with_name(so.name + files.CHECK_SUFFIX)
        changed = _damage(victim, damage, _other_entry(Path(tmp)))
        done = _run(_KERNEL_PROBE, _env(cache))
        _assert_kernel_right(done, cache)
        warnings = done.stderr.count(DAMAGED)
        assert warnings <= 1, done.stderr
        if changed and target == "build":
            assert warnings == 1 and "native kernel build" in done.stderr, done.stderr


def test_a_kernel_build_without_its_check_is_not_loaded_but_rebuilt(built_kernel, tmp_path):
    """An unverified `.so` (an older gpt2fn's, or one copied without its check) is never mapped."""
    cache = tmp_path / "cache"
    shutil.copytree(built_kernel / "gpt2fn", cache / "gpt2fn")
    so, _ = _kernel_entry(cache)
    so.with_name(so.name + files.CHECK_SUFFIX).unlink()
    so.write_bytes(so.read_bytes()[: len(so.read_bytes()) // 3])  # the SIGBUS case of the issue, unverifiable
    done = _run(_KERNEL_PROBE, _env(cache))
    _assert_kernel_right(done, cache)
    assert done.stderr.count(DAMAGED) == 1 and "no check file" in done.stderr, done.stderr


def test_two_processes_building_the_kernel_at_once_leave_one_valid_build(built_kernel, tmp_path):
    procs = [_start(_KERNEL_PROBE, _env(tmp_path)) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err
        assert out.strip().splitlines()[-1] == "True True" and DAMAGED not in err, (out, err)
    builds = list((tmp_path / "gpt2fn" / "native").rglob("*.so"))
    assert len(builds) == 1 and _verifies(builds[0], builds[0].parent.name)
    assert _no_temps(tmp_path)


# ---------------------------------------------------------------- the GPT-2 BPE table

_BPE_PROBE = """
import sys
from gpt2fn import tokenizer
try:
    print(tokenizer.encode("hello world"))
except tokenizer.BPETableError as exc:
    print(f"BPETableError: {exc}", file=sys.stderr)
    raise SystemExit(3)
"""


@pytest.fixture(scope="module")
def bpe_table() -> Path:
    path = tok.bpe_path()
    try:
        ok = tok._verified_table(path)
    except OSError:
        ok = None
    if not isinstance(ok, bytes):
        pytest.skip(f"no good BPE table at {path} to damage a copy of; run `python -m gpt2fn.tokenizer fetch`")
    return path


@settings(max_examples=4, deadline=None)
@given(damage=damages)
def test_a_damaged_bpe_table_is_refused_with_the_fix_never_used(bpe_table, damage):
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        table = cache / "gpt2fn" / "gpt2.tiktoken"
        table.parent.mkdir(parents=True)
        shutil.copyfile(bpe_table, table)
        other = Path(tmp) / "other.tiktoken"  # a well-formed table, not GPT-2's
        other.write_text("aGVsbG8= 0\nIHdvcmxk 1\n")
        changed = _damage(table, damage, other)
        done = _run(_BPE_PROBE, _env(cache))
        if not changed:
            assert done.returncode == 0 and done.stdout.strip() == "[31373, 995]", done.stderr
            return
        assert done.returncode == 3, (done.stdout, done.stderr)
        assert "python -m gpt2fn.tokenizer fetch" in done.stderr and str(table) in done.stderr, done.stderr
        assert done.stderr.count(DAMAGED) == 2, done.stderr  # the one warning line, and the error that says it
        assert done.stdout == ""


def test_a_damaged_table_named_by_the_environment_is_refused_by_name(bpe_table, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bpe_table.read_bytes()[:1000])
    done = _run(_BPE_PROBE, _env(tmp_path / "cache", **{tok.ENV_VAR: str(bad)}))
    assert done.returncode == 3 and tok.ENV_VAR in done.stderr and str(bad) in done.stderr, done.stderr


def test_fetch_writes_the_table_atomically_and_replaces_a_damaged_one(bpe_table, tmp_path, monkeypatch):
    """`fetch` over a damaged cached copy leaves GPT-2's table (the download itself is replaced by the archive
    member it would return, to stay offline)."""
    dest = tmp_path / "gpt2.tiktoken"
    dest.write_bytes(b"damaged")
    monkeypatch.setattr(tok.subprocess, "run", _fake_pip_download(bpe_table.read_bytes()))
    assert tok.fetch_bpe(dest, quiet=True) == dest
    assert isinstance(tok._verified_table(dest), bytes)
    assert _no_temps(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.tiktoken"]


def _fake_pip_download(table: bytes):
    import io
    import tarfile

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        with tarfile.open(dest / "openai-whisper-20250625.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("openai-whisper-20250625/whisper/assets/gpt2.tiktoken")
            info.size = len(table)
            tar.addfile(info, io.BytesIO(table))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


# ---------------------------------------------------------------- the training token cache

_TOKENS_PROBE = """
import hashlib, sys
from gpt2fn.train.data import load_tokens
tokens = load_tokens(sys.argv[1], cache_dir=sys.argv[2])
print(len(tokens), hashlib.sha256(tokens.tobytes()).hexdigest())
"""


def _corpus(directory: Path) -> tuple[Path, np.ndarray]:
    corpus = directory / "corpus"
    corpus.mkdir()
    words = ["the", "cache", "is", "checked", "before", "training,", "never", "after;", "tokens", "match."]
    for i in range(3):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(400))
        (corpus / f"doc{i}.txt").write_text(text + "\n")
    expected = np.asarray(encode_documents(p.read_text() for p in sorted(corpus.iterdir())), dtype=np.uint16)
    return corpus, expected


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory, bpe_table: Path):
    """A corpus, its expected tokens, and a token cache filled once from it (copied for each damage case)."""
    from gpt2fn.train.data import load_tokens

    root = tmp_path_factory.mktemp("tokens")
    corpus, expected = _corpus(root)
    tokens = load_tokens(corpus, cache_dir=root / "cache")
    assert np.array_equal(tokens, expected)
    return corpus, expected, root / "cache", Path(tokens.filename)


def _tokens_run(corpus: Path, cache: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _TOKENS_PROBE, str(corpus), str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _expect_line(expected: np.ndarray) -> str:
    import hashlib

    return f"{len(expected)} {hashlib.sha256(expected.tobytes()).hexdigest()}"


@settings(max_examples=4, deadline=None)
@given(damage=damages, target=st.sampled_from(["tokens", "check"]))
def test_a_damaged_token_cache_is_retokenized_never_trained_on(token_cache, bpe_table, damage, target):
    corpus, expected, seeded, entry = token_cache
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "tokens"
        shutil.copytree(seeded, cache, ignore=shutil.ignore_patterns("*.lock"))
        victim = cache / entry.name
        if target == "check":
            victim = victim.with_name(victim.name + files.CHECK_SUFFIX)
        changed = _damage(victim, damage, _other_entry(Path(tmp)))
        rc, out, err = _finish(_tokens_run(corpus, cache, _env(Path(tmp), **{tok.ENV_VAR: str(bpe_table)})))
        assert rc == 0, err
        assert out.strip() == _expect_line(expected), "the tokens read back are not the corpus's"
        assert _verifies(cache / entry.name, entry.stem)
        assert err.count(DAMAGED) <= 1, err
        if changed and target == "tokens":
            assert err.count(DAMAGED) == 1 and "token cache" in err, err


def test_training_on_a_cut_token_cache_trains_on_the_whole_corpus(token_cache, bpe_table, tmp_path):
    """The issue's silent case: a token cache cut to a third. The run retokenizes and trains on every token."""
    corpus, expected, seeded, entry = token_cache
    cache = tmp_path / "tokens"
    shutil.copytree(seeded, cache)
    cut = cache / entry.name
    cut.write_bytes(cut.read_bytes()[: len(expected) * 2 // 3])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt2fn", "train", "--data", str(corpus), "--out", str(out), "--preset", "tiny",
           "--set", "vocab_size=50257", "--context", "16", "--steps", "1", "--batch-size", "2", "--no-progress",
           "--device", "cpu", "--cache-dir", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path, **{tok.ENV_VAR: str(bpe_table)}))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(DAMAGED) == 1, done.stderr
    from gpt2fn.train.state import STATE_FILE, load_state

    meta = load_state(out / STATE_FILE).meta
    assert meta["data"] == {"tokens": len(expected), "hash": entry.stem}, json.dumps(meta["data"])


def test_two_processes_tokenizing_one_corpus_at_once_leave_one_valid_entry(token_cache, bpe_table, tmp_path):
    corpus, expected, _, entry = token_cache
    cache = tmp_path / "tokens"
    env = _env(tmp_path, **{tok.ENV_VAR: str(bpe_table)})
    results = [_finish(p) for p in [_tokens_run(corpus, cache, env) for _ in range(2)]]
    for rc, out, err in results:
        assert rc == 0 and out.strip() == _expect_line(expected) and DAMAGED not in err, (out, err)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [entry.name, entry.name + files.CHECK_SUFFIX, entry.name + files.LOCK_SUFFIX])
    assert _verifies(cache / entry.name, entry.stem)


# ---------------------------------------------------------------- the one cache directory and the logs


def test_every_cache_lives_under_one_xdg_directory(monkeypatch, tmp_path):
    from gpt2fn.train.data import default_cache_dir

    monkeypatch.delenv(tok.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert files.cache_dir() == tmp_path / "gpt2fn"
    assert tok.bpe_path() == tmp_path / "gpt2fn" / "gpt2.tiktoken"
    assert default_cache_dir() == tmp_path / "gpt2fn" / "tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: a relative path is ignored
    assert files.cache_dir("native") == Path.home() / ".cache" / "gpt2fn" / "native"


def test_a_metrics_line_cut_by_a_crash_is_dropped_when_the_log_is_read(tmp_path):
    from gpt2fn.train.loop import _metrics_lines

    log = tmp_path / "metrics.jsonl"
    files.append_line(log, json.dumps({"step": 1, "loss": 2.0}))
    files.append_line(log, json.dumps({"step": 2, "loss": 1.5}))
    with open(log, "ab") as fh:
        fh.write(b'{"step": 3, "lo')  # the torn tail a kill mid-append leaves
    assert _metrics_lines(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]

"""The GPT-2 byte-pair encoding: known ids, lossless round trips, `<|endoftext|>` only on request, offline table."""

import shutil

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from gpt2fn import tokenizer as tok


@pytest.fixture(autouse=True)
def fresh_encoding():
    tok._encoding.cache_clear()  # each test sees the environment it sets
    yield
    tok._encoding.cache_clear()


@pytest.mark.parametrize(("text", "ids"), [
    ("hello world", [31373, 995]),
    ("Hello, it is time", [15496, 11, 340, 318, 640]),
    ("", []),
])
def test_known_texts_encode_to_gpt2_ids(text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_the_encoding_is_gpt2s():
    enc = tok.tokenizer()
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.n_vocab == 50257 and enc.eot_token == tok.EOT == 50256


@given(st.text(max_size=200))
def test_decode_inverts_encode_for_any_text(text):
    ids = tok.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text


@given(st.text(max_size=40), st.text(max_size=40))
def test_endoftext_is_special_only_when_allowed(before, after):
    text = before + tok.EOT_TEXT + after
    plain = tok.encode(text)
    assert tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert tok.EOT in special
    assert special.count(tok.EOT) == text.count(tok.EOT_TEXT)
    assert plain.count(tok.EOT) == 0
    assert tok.decode(special) == text


def test_the_table_named_by_the_environment_is_used(tmp_path, monkeypatch):
    source = tok.bpe_path()
    if not source.is_file():
        pytest.skip("no cached BPE table; run `python -m gpt2fn.tokenizer fetch`")
    copy = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(source, copy)
    monkeypatch.setenv(tok.ENV_VAR, str(copy))
    assert tok.bpe_path() == copy
    assert tok.encode("hello world") == [31373, 995]


def test_a_missing_table_named_by_the_environment_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "gpt2.tiktoken"
    monkeypatch.setenv(tok.ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{tok.ENV_VAR} points at .*nowhere.*not a file"):
        tok.encode("hello")


def test_a_corrupt_table_is_refused_by_its_checksum(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    monkeypatch.setenv(tok.ENV_VAR, str(bad))
    with pytest.raises(ValueError, match=tok.BPE_SHA256):
        tok.encode("hello")


def test_the_user_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv(tok.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tok.bpe_path() == tmp_path / "gpt2fn" / "gpt2.tiktoken"

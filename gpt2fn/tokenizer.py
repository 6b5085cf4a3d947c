"""The GPT-2 byte-pair encoding through tiktoken, usable offline.

The BPE table (`gpt2.tiktoken`, identical to tiktoken's `r50k_base.tiktoken`) is looked up, in order:
1. the file named by the environment variable `GPT2FN_BPE_FILE`;
2. the user cache, `$XDG_CACHE_HOME/gpt2fn/gpt2.tiktoken` (default `~/.cache/gpt2fn/gpt2.tiktoken`);
3. tiktoken's own download (`tiktoken.get_encoding("gpt2")`), which needs the network.

`python -m gpt2fn.tokenizer fetch` fills the user cache without the tiktoken download host: it takes the table
from PyPI's `openai-whisper==20250625` source archive (`whisper/assets/gpt2.tiktoken`, without installing whisper)
and verifies its sha256; it writes atomically (`gpt2fn.files`), and replaces a damaged copy.

The table is verified before use: its bytes are read once, their sha256 checked against `BPE_SHA256`, and the
ranks parsed from those same bytes. A damaged table named by `GPT2FN_BPE_FILE` raises :class:`BPETableError`;
a damaged table in the user cache logs one warning and is treated as absent (step 3, tiktoken's own download,
then :class:`BPETableError` naming `python -m gpt2fn.tokenizer fetch` when that fails too).
"""

import base64
import functools
import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from .files import atomic_write_bytes, cache_dir

__all__ = ["tokenizer", "encode", "decode", "token_strings", "bpe_path", "fetch_bpe", "BPETableError", "EOT",
           "EOT_TEXT", "BPE_SHA256"]

log = logging.getLogger("gpt2fn")

BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
EOT = 50256
ENV_VAR = "GPT2FN_BPE_FILE"
# tiktoken's GPT-2 / r50k split pattern (tiktoken_ext.openai_public.r50k_pat_str)
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_WHISPER_SDIST = "openai-whisper==20250625"
_WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"


class BPETableError(ValueError):
    """The GPT-2 BPE table is missing or damaged; the message names the file and the fix."""


_FIX = f"run `python -m gpt2fn.tokenizer fetch` (needs PyPI), or set {ENV_VAR} to a copy of gpt2.tiktoken"


def bpe_path() -> Path:
    """Where gpt2fn reads (and `fetch` writes) the BPE table."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return cache_dir("gpt2.tiktoken")


def _verified_table(path: Path) -> bytes | str:
    """The table's bytes when their sha256 is GPT-2's; otherwise why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"it cannot be read ({exc})"
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        return f"its {len(data)} bytes have sha256 {digest}, expected {BPE_SHA256}"
    return data


def _ranks(data: bytes) -> dict[bytes, int]:
    # tiktoken.load.load_tiktoken_bpe's parse, over the bytes already verified (it would read the path again)
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@functools.lru_cache(maxsize=1)
def _encoding(path: str | None) -> tiktoken.Encoding:
    if path is not None:
        table = _verified_table(Path(path))
        if isinstance(table, bytes):
            return tiktoken.Encoding(name="gpt2", pat_str=_PAT, mergeable_ranks=_ranks(table),
                                     special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)
        if os.environ.get(ENV_VAR):
            raise BPETableError(f"the BPE table {ENV_VAR} points at, {path}, is damaged or not GPT-2's: {table}. "
                                f"Point {ENV_VAR} at a good copy of gpt2.tiktoken / r50k_base.tiktoken, or unset it "
                                "and run `python -m gpt2fn.tokenizer fetch`.")
        log.warning("gpt2fn: the cached BPE table at %s is damaged (%s); ignoring it (replace it with "
                    "`python -m gpt2fn.tokenizer fetch`)", path, table)
        damage = f"the cached table at {path} is damaged ({table})"
    else:
        damage = f"the GPT-2 BPE table is not at {path or bpe_path()}"
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline: tiktoken tries to download its files
        raise BPETableError(f"{damage} and tiktoken could not download it ({exc}). To fix: {_FIX} / "
                            "r50k_base.tiktoken.") from exc


def tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 ids, `<|endoftext|>` = 50256), loaded once; raises :class:`BPETableError` when
    the table is damaged or cannot be found (see the module docstring)."""
    path = bpe_path()
    if os.environ.get(ENV_VAR) and not path.is_file():
        raise FileNotFoundError(f"{ENV_VAR} points at {path}, which is not a file")
    return _encoding(str(path) if path.is_file() else None)


def encode(text: str, *, allow_special: bool = False) -> list[int]:
    """Token ids of `text`. `<|endoftext|>` becomes id 50256 only with `allow_special=True`; otherwise it is
    encoded as the plain characters it is made of."""
    enc = tokenizer()
    return enc.encode(text, allowed_special={EOT_TEXT} if allow_special else set(), disallowed_special=())


def decode(ids: Sequence[int]) -> str:
    """Text of token ids (invalid UTF-8 across a cut is replaced, as tiktoken does)."""
    return tokenizer().decode(list(ids))


def token_strings(ids: Sequence[int]) -> list[str]:
    """Each id's own text, for labels (untrusted: a view escapes it). Ids outside GPT-2's vocabulary, or every id
    when no BPE table is available, read `#id`."""
    ids = [int(i) for i in ids]
    try:
        enc = tokenizer()
    except (OSError, ValueError):
        return [f"#{i}" for i in ids]
    return [enc.decode([i]) if 0 <= i < enc.n_vocab else f"#{i}" for i in ids]


def fetch_bpe(dest: Path | None = None, *, quiet: bool = False) -> Path:
    """Put a verified copy of the BPE table at `dest` (default :func:`bpe_path`); a no-op when already there."""
    dest = bpe_path() if dest is None else Path(dest)
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == BPE_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--dest", tmp, _WHISPER_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("openai[-_]whisper-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"could not download {_WHISPER_SDIST} from the package index to get the BPE "
                               f"table:\n{result.stderr.strip()[-2000:]}")
        data = _member(archives[0], _WHISPER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f"{_WHISPER_MEMBER} from {_WHISPER_SDIST} has sha256 {digest}, expected {BPE_SHA256}")
    atomic_write_bytes(dest, data)
    _encoding.cache_clear()  # a damaged table this process loaded before is gone
    if not quiet:
        print(f"GPT-2 BPE table written to {dest}")
    return dest


def _member(archive: Path, suffix: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile() and info.name.endswith(suffix):
                extracted = tar.extractfile(info)
                assert extracted is not None
                return io.BytesIO(extracted.read()).getvalue()
    raise RuntimeError(f"{archive.name} has no {suffix}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["fetch"] or not set(args[1:]) <= {"--quiet"}:
        print("usage: python -m gpt2fn.tokenizer fetch [--quiet]   # download and verify the GPT-2 BPE table",
              file=sys.stderr)
        return 2
    try:
        fetch_bpe(quiet="--quiet" in args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPT-2 byte-pair encoding through tiktoken, usable offline.

The BPE table (`gpt2.tiktoken`, identical to tiktoken's `r50k_base.tiktoken`) is looked up, in order:
1. the file named by the environment variable `GPT2FN_BPE_FILE`;
2. the user cache, `$XDG_CACHE_HOME/gpt2fn/gpt2.tiktoken` (default `~/.cache/gpt2fn/gpt2.tiktoken`);
3. tiktoken's own download (`tiktoken.get_encoding("gpt2")`), which needs the network.

`python -m gpt2fn.tokenizer fetch` fills the user cache without the tiktoken download host: it takes the table
from PyPI's `openai-whisper==20250625` source archive (`whisper/assets/gpt2.tiktoken`, without installing whisper)
and verifies its sha256.
"""

import functools
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

__all__ = ["tokenizer", "encode", "decode", "token_strings", "bpe_path", "fetch_bpe", "EOT", "EOT_TEXT", "BPE_SHA256"]

BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
EOT = 50256
ENV_VAR = "GPT2FN_BPE_FILE"
# tiktoken's GPT-2 / r50k split pattern (tiktoken_ext.openai_public.r50k_pat_str)
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_WHISPER_SDIST = "openai-whisper==20250625"
_WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"


def bpe_path() -> Path:
    """Where gpt2fn reads (and `fetch` writes) the BPE table."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gpt2fn" / "gpt2.tiktoken"


@functools.lru_cache(maxsize=1)
def _encoding(path: str | None) -> tiktoken.Encoding:
    if path is not None:
        ranks = load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
        return tiktoken.Encoding(name="gpt2", pat_str=_PAT, mergeable_ranks=ranks,
                                 special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline: tiktoken tries to download its files
        raise RuntimeError(
            f"the GPT-2 BPE table is not at {bpe_path()} and tiktoken could not download it ({exc}). "
            f"Run `python -m gpt2fn.tokenizer fetch` (needs PyPI), or set {ENV_VAR} to a copy of gpt2.tiktoken "
            "/ r50k_base.tiktoken."
        ) from exc


def tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 ids, `<|endoftext|>` = 50256), loaded once."""
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as f:
        f.write(data)
    os.replace(f.name, dest)
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

"""Training data: text files -> GPT-2 token ids in a cached uint16 memory map -> random windows.

    tokens         = load_tokens("corpus/")                  # np.memmap uint16, cached by content hash
    train, val     = split_tokens(tokens, val_fraction=0.1, context=128)
    ids, targets   = sample_batch(train, batch_size=16, context=128, generator=gen)   # [batch, seq] int64

A directory means every non-hidden regular file under it, in sorted path order; documents are joined with
`<|endoftext|>` (id 50256). The cache file is named by a hash of the documents' bytes, so editing a file retokenizes
and an unchanged corpus is read back without touching the tokenizer. It is a verified cache entry
(`gpt2fn.files.cached_entry`): `NAME.u16.check` records the corpus hash, size and sha256 of the tokens, and the
tokens are mapped only after they match it, from the very file that was checked; a short, altered or swapped-in
file is retokenized from the corpus with one warning, so training never sees tokens that are not its corpus's.
Two processes tokenizing one corpus at once tokenize it once (the entry's lock). Windows are drawn with an explicit
`torch.Generator`: its state is the data position a checkpoint saves.
"""

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import cache_dir as user_cache_dir
from ..files import cached_entry

__all__ = ["pydoc_prose", "corpus_files", "encode_documents", "load_tokens", "split_tokens", "sample_batch",
           "sample_starts", "windows", "eval_starts", "default_cache_dir"]

_FORMAT = b"gpt2fn-tokens-v1"


def _is_prose(paragraph: str) -> bool:
    """A paragraph of sentences, not grammar rules, code, dunder names, headings or one-line notes."""
    plain = sum(c.isalpha() or c == " " for c in paragraph) / len(paragraph)
    return "::=" not in paragraph and "__" not in paragraph and plain > 0.9 and len(paragraph.split()) >= 8


def pydoc_prose() -> str:
    """The prose paragraphs of the documentation every CPython ships (`pydoc_data.topics`, about 50k GPT-2
    tokens), one paragraph a line, separated by blank lines: an offline corpus (`scripts/demo.sh` trains on it, and
    `scripts/bench.py --spec-trained` trains its speculative pair on it).

    Whitespace is normalised (indentation and runs of spaces become one space, lines wrapped inside a paragraph
    are joined, at most one blank line): a small model then spends its minutes on words rather than on counting
    spaces. Typographic quotes and dashes become ASCII, since a byte-level BPE splits them into byte tokens that a
    small model recombines wrongly (printed as U+FFFD); other non-ASCII characters are dropped. Grammar rules,
    code, dunder names, headings and one-line notes are left out."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]*\n[ \t]*", "\n", re.sub(r"[ \t]+", " ", text)))
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", text)  # lines wrapped inside a paragraph are one line of prose
    text = text.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                                         "\u2014": "-", "\u2013": "-", "\u2026": "..."}))
    text = text.encode("ascii", "ignore").decode()
    return "\n\n".join(p for p in text.split("\n\n") if p.strip() and _is_prose(p))


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/gpt2fn/tokens` (default `~/.cache/gpt2fn/tokens`)."""
    return user_cache_dir("tokens")


def corpus_files(path: str | os.PathLike[str]) -> list[Path]:
    """The text files a `--data` path names: the file itself, or every non-hidden file under a directory."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.exists():
        raise FileNotFoundError(f"training data {str(root)!r} does not exist; pass a text file or a directory of them")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"training data directory {str(root)!r} holds no (non-hidden) files; put text files in it")
    return files


def encode_documents(texts: Iterable[str]) -> list[int]:
    """Token ids of several documents (a corpus's files) joined with <|endoftext|>: how `gpt2fn train` and
    `gpt2fn eval` read a folder of text files."""
    from .. import tokenizer  # here, not at import: `python -m gpt2fn.tokenizer` runs before gpt2fn.train loads it

    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(tokenizer.EOT)
        ids.extend(tokenizer.encode(text))
    return ids


def _training_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"training file {str(f)!r} is not UTF-8 text ({exc}); convert it or leave it out "
                         "of the data directory") from None


def load_tokens(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> np.memmap:
    """Token ids of the corpus at `path` as a read-only uint16 memory map, tokenizing once per content."""
    files = corpus_files(path)
    digest = hashlib.sha256(_FORMAT)
    for f in files:
        data = f.read_bytes()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = digest.hexdigest()[:32]

    def tokenize(tmp: Path) -> None:
        ids = encode_documents(_training_text(f) for f in files)
        if not ids:
            raise ValueError(f"training data {str(path)!r} is empty: it has no tokens")
        np.asarray(ids, dtype=np.uint16).tofile(tmp)

    with cached_entry(cache / f"{key}.u16", key, tokenize, what=f"the token cache of {str(path)!r}") as fh:
        if os.fstat(fh.fileno()).st_size == 0:  # never written by gpt2fn (an empty corpus raises above)
            raise ValueError(f"training data {str(path)!r} is empty: it has no tokens")
        return np.memmap(fh, dtype=np.uint16, mode="r")  # maps the verified file; the map outlives `fh`


def split_tokens(tokens: np.ndarray, *, val_fraction: float = 0.1, context: int,
                 source: str = "corpus") -> tuple[np.ndarray, np.ndarray]:
    """The first `1 - val_fraction` of the tokens for training, the tail for validation (views, no copy).

    Both parts must hold at least one window of `context + 1` tokens (inputs plus the shifted targets);
    `val_fraction=0` gives an empty validation part.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    need = context + 1
    n = len(tokens)
    n_val = int(n * val_fraction)
    if val_fraction > 0:
        n_val = max(n_val, need)
    n_train = n - n_val
    if n_train < need:
        split = f" after setting aside {n_val} for validation" if n_val else ""
        raise ValueError(
            f"{source} has {n} tokens, leaving {n_train} for training{split}; one training window needs "
            f"context + 1 = {need} tokens. Use a longer corpus, a smaller --context"
            f"{', or a smaller validation fraction' if n_val else ''}."
        )
    return tokens[:n_train], tokens[n_train:]


def sample_starts(n_tokens: int, *, batch_size: int, context: int, generator: torch.Generator) -> Tensor:
    """`batch_size` window starts, uniform over every position where `context + 1` tokens fit (int64, cpu)."""
    high = n_tokens - context  # starts 0 .. n - context - 1 leave room for the shifted target
    if high < 1:
        raise ValueError(f"{n_tokens} tokens cannot hold a window of context + 1 = {context + 1}")
    return torch.randint(0, high, (batch_size,), generator=generator)


def windows(tokens: np.ndarray, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """`(ids, targets)`, each `[len(starts), context]` int64: the windows at `starts` and the same shifted by one."""
    rows = np.stack([np.asarray(tokens[s:s + context + 1]) for s in starts.tolist()]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


def sample_batch(tokens: np.ndarray, *, batch_size: int, context: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of random windows drawn with `generator` (advancing it): `(ids, targets)`, `[batch, context]`."""
    return windows(tokens, sample_starts(len(tokens), batch_size=batch_size, context=context,
                                         generator=generator), context)


def eval_starts(n_tokens: int, *, context: int, max_windows: int) -> Tensor:
    """Up to `max_windows` evenly spaced window starts over a validation part: fixed, so that validation losses
    at different steps compare like with like, and drawn without touching any generator."""
    high = n_tokens - context
    if high < 1:
        return torch.zeros(0, dtype=torch.int64)
    count = min(max_windows, max(1, high // context))
    return torch.linspace(0, high - 1, count).round().long()

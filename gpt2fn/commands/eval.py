"""`gpt2fn eval`: perplexity and mean loss of a model on a text file or a folder of them.

    gpt2fn eval --checkpoint out/model.safetensors --data valid.txt
    gpt2fn eval --model gpt2 --data corpus/ --stride 512 --json

The files are read as `gpt2fn train` reads them (UTF-8, every non-hidden file under a folder in sorted order,
joined with <|endoftext|>) and scored as one token stream with `gpt2fn.score`'s sliding window, whose method is
the `transformers` perplexity guide's. A progress bar goes to stderr; `--json` prints one JSON object on stdout.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from ..cli import CLIError, add_model_options, device_option, dtype_option, load_model

HELP = "perplexity and mean loss of a model on a text file or folder (sliding window)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="a text file or a folder of them")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="window length in tokens (default and maximum: the model's context length)")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="tokens between window starts, 1..context (default context // 2)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward (default 8)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def read_corpus(path: str) -> tuple[list[int], int]:
    """Token ids of the file or folder at `path`, files joined with <|endoftext|> as `gpt2fn train` joins them,
    and the number of files. Empty or binary (non-UTF-8, NUL bytes) files are refused with a ValueError."""
    from ..train.data import corpus_files, encode_documents

    files = corpus_files(path)
    return encode_documents(_scored_text(f) for f in files), len(files)


def _scored_text(f: Path) -> str:
    """A corpus file's text, refused unless it is non-empty UTF-8 text without NUL bytes."""
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--data file {str(f)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "pass text files only") from None
    if "\x00" in text:
        raise ValueError(f"--data file {str(f)!r} holds NUL bytes: it looks binary; pass text files only")
    if not text.strip():
        raise ValueError(f"--data file {str(f)!r} is empty: it has no text to score")
    return text


def run(args: argparse.Namespace) -> int:
    from ..checks import check_token_range
    from ..scoring import score

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    device, dtype = device_option(args), dtype_option(args)
    ids, n_files = read_corpus(args.data)
    params, name = load_model(args, device=device, dtype=dtype)
    cfg = params.config
    check_token_range(ids, cfg.vocab_size, what=f"--data {args.data!r} (GPT-2 tokens, read by {name})")
    context = args.context if args.context is not None else cfg.context_length
    if not 2 <= context <= cfg.context_length:
        raise CLIError(f"--context must be in [2, {cfg.context_length}] (the model's context length), got {context}")
    stride = args.stride if args.stride is not None else context // 2
    if not 1 <= stride <= context:
        raise CLIError(f"--stride must be in [1, --context={context}], got {stride}")
    s = score(params, ids, context=context, stride=stride, batch_size=args.batch_size, progress=True)
    result = {"model": name, "data": args.data, "files": n_files, "tokens": len(ids), "scored_tokens": s.n_tokens,
              "context": context, "stride": stride, "log_likelihood": s.log_likelihood,
              "mean_loss": s.mean_loss, "perplexity": s.perplexity}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name} on {args.data}: {s.n_tokens:,} tokens scored of {len(ids):,} ({n_files} file(s)), "
              f"context {context}, stride {stride}")
        ppl = f"{s.perplexity:.4f}" if math.isfinite(s.perplexity) else "inf"
        print(f"mean loss {s.mean_loss:.4f}  perplexity {ppl}")
    sys.stdout.flush()
    return 0


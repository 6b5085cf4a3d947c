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

from ..cli import CLIError

HELP = "perplexity and mean loss of a model on a text file or folder (sliding window)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="a checkpoint file or directory: seed .pth, Hugging Face, nanoGPT or gpt2fn safetensors")
    source.add_argument("--model", metavar="NAME", default=None, help="hub name such as gpt2 (default: gpt2)")
    source.add_argument("--preset", metavar="NAME", default=None,
                        help="random weights of a preset config (tiny, mini, gpt2, ...), seeded by --seed")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed for --preset weights (default 0)")
    parser.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="a text file or a folder of them")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="window length in tokens (default and maximum: the model's context length)")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="tokens between window starts, 1..context (default context // 2)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward (default 8)")
    parser.add_argument("--device", default=None, metavar="D", help="cpu, cuda, mps (default: CUDA, MPS, CPU)")
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
    import torch

    from ..generate import default_device
    from ..scoring import score

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as exc:
        raise CLIError(f"--device {args.device!r} is not a device torch knows ({exc})") from None
    ids, n_files = read_corpus(args.data)
    params, name = _model(args, device)
    cfg = params.config
    bad = max(ids)
    if bad >= cfg.vocab_size:
        raise CLIError(f"--data has GPT-2 token id {bad} but {name} has vocab_size {cfg.vocab_size}: its vocabulary "
                       "does not cover this text; evaluate a model with GPT-2's vocabulary")
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


def _model(args: argparse.Namespace, device):  # -> (GPTParams, str)
    from ..checkpoints import load
    from ..config import preset
    from ..params import init_params

    if args.preset is not None:
        return init_params(preset(args.preset), seed=args.seed, device=device), f"preset {args.preset}"
    source = args.checkpoint or args.model or "gpt2"
    return load(source, device=device), source

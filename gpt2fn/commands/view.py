"""`gpt2fn view TEXT --out view.html`: one self-contained HTML file with the attention patterns of every layer and
head, the per-token log-probabilities and the logit lens of TEXT (opens offline in any browser)."""

import argparse
from pathlib import Path

import torch

from ..cli import CLIError, add_model_options, device_option, dtype_option, load_model

HELP = "write an HTML view of TEXT: attention per layer and head, per-token log-probabilities, the logit lens"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the text to read (untrusted: shown as text, never as markup)")
    parser.add_argument("--out", type=Path, default=Path("view.html"), help="HTML file to write (default %(default)s)")
    parser.add_argument("--lens-k", type=int, default=5, help="top tokens per layer and position in the logit lens")
    parser.add_argument("--top-k", type=int, default=None,
                        help="keys kept per query in the attention view (default: as many as fit about 3 MB)")
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..checks import check_token_range
    from ..study.views import save_html, view_report
    from ..tokenizer import encode

    if args.lens_k < 1:
        raise CLIError(f"--lens-k must be >= 1, got {args.lens_k}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    ids = encode(args.text)
    if not ids:
        raise CLIError("TEXT is empty; give at least one token to read")
    params, _ = load_model(args, device=device_option(args), dtype=dtype_option(args))
    cfg = params.config
    if len(ids) > cfg.context_length:
        raise CLIError(f"TEXT is {len(ids)} tokens; this model reads at most {cfg.context_length}")
    check_token_range(ids, cfg.vocab_size, what="TEXT (GPT-2 tokens)")
    with torch.no_grad():
        view = view_report(params, torch.tensor([ids], device=params.device), lens_k=args.lens_k, top_k=args.top_k)
    path = save_html(view, args.out)
    print(f"wrote {path} ({len(ids)} tokens, {cfg.n_layers} layers x {cfg.n_heads} heads, "
          f"{path.stat().st_size / 1e6:.2f} MB)")
    return 0

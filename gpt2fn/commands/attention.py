"""`gpt2fn attention TEXT --layer L --head H --out map.png`: one head's attention pattern as a PNG heat map."""

import argparse
from pathlib import Path

import torch

from ..cli import CLIError, add_model_options, device_option, dtype_option, load_model

HELP = "draw one attention head's pattern over TEXT as a PNG heat map (token labels on both axes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the text to read")
    parser.add_argument("--layer", type=int, default=0, help="block index, 0-based; negative counts from the end")
    parser.add_argument("--head", type=int, default=0, help="head index, 0-based")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="PNG to write (default %(default)s)")
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..checks import check_layer, check_token_range
    from ..study import attention_patterns, save_attention_map, token_labels
    from ..tokenizer import encode

    params, _ = load_model(args, device=device_option(args), dtype=dtype_option(args))
    cfg = params.config
    ids = encode(args.text)
    if not ids:
        raise CLIError("TEXT is empty; give at least one token to read")
    if len(ids) > cfg.context_length:
        raise CLIError(f"TEXT is {len(ids)} tokens; this model reads at most {cfg.context_length}")
    check_token_range(ids, cfg.vocab_size, what="TEXT (GPT-2 tokens)")
    layer = check_layer(cfg, args.layer, name="--layer")
    if not 0 <= args.head < cfg.n_heads:
        raise CLIError(f"--head {args.head} is out of range: the model has {cfg.n_heads} heads "
                       f"(0..{cfg.n_heads - 1})")
    with torch.no_grad():
        pattern = attention_patterns(params, torch.tensor([ids], device=params.device), layers=[layer])[0, 0]
    labels = token_labels(ids)
    path = save_attention_map(pattern[args.head], labels, args.out,
                              title=f"layer {layer}, head {args.head}")
    print(f"wrote {path} ({len(ids)} tokens, layer {layer}, head {args.head})")
    return 0

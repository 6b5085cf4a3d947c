"""`gpt2fn attention TEXT --layer L --head H --out map.png`: one head's attention pattern as a PNG heat map."""

import argparse
from pathlib import Path

import torch

HELP = "draw one attention head's pattern over TEXT as a PNG heat map (token labels on both axes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the text to read")
    parser.add_argument("--layer", type=int, default=0, help="block index, 0-based; negative counts from the end")
    parser.add_argument("--head", type=int, default=0, help="head index, 0-based")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="PNG to write (default %(default)s)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="weights file or directory (any layout gpt2fn.load detects)")
    source.add_argument("--model", help="hub name such as gpt2 (from the local Hugging Face cache)")
    source.add_argument("--preset", help="random weights of a preset config (e.g. mini); see --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights for --preset")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")


def load_params(args: argparse.Namespace):  # -> GPTParams
    """Weights from --checkpoint, --model or --preset/--seed (default: --model gpt2)."""
    import gpt2fn
    from gpt2fn.cli import CLIError

    if args.preset is not None:
        return gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed, device=args.device)
    source = args.checkpoint if args.checkpoint is not None else (args.model or "gpt2")
    load = getattr(gpt2fn, "load", None)
    if load is None:
        raise CLIError("this build of gpt2fn has no checkpoint loader (gpt2fn.load); use --preset NAME --seed S")
    return load(source, device=args.device)


def run(args: argparse.Namespace) -> int:
    from gpt2fn.cli import CLIError
    from gpt2fn.study import attention_patterns, save_attention_map, token_labels
    from gpt2fn.tokenizer import encode

    params = load_params(args)
    cfg = params.config
    ids = encode(args.text)
    if not ids:
        raise CLIError("TEXT is empty; give at least one token to read")
    if len(ids) > cfg.context_length:
        raise CLIError(f"TEXT is {len(ids)} tokens; this model reads at most {cfg.context_length}")
    if max(ids) >= cfg.vocab_size:
        raise CLIError(f"TEXT has token id {max(ids)} but the model's vocabulary has {cfg.vocab_size} rows; "
                       "use a GPT-2-vocabulary model (e.g. --preset mini)")
    layer = args.layer + cfg.n_layers if args.layer < 0 else args.layer
    if not 0 <= layer < cfg.n_layers:
        raise CLIError(f"--layer {args.layer} is out of range: the model has {cfg.n_layers} layers "
                       f"(0..{cfg.n_layers - 1})")
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

"""`gpt2fn convert SRC DST`: any checkpoint gpt2fn loads -> gpt2fn safetensors (or a Hugging Face directory).

    gpt2fn convert gpt2_model.pth model.safetensors          # the seed's .pth -> gpt2fn safetensors
    gpt2fn convert out/ckpt.pt hf-dir/                       # a directory DST (or --format hf): config.json +
                                                             # model.safetensors for GPT2LMHeadModel
    gpt2fn convert gpt2 gpt2-bf16.safetensors --dtype bf16   # a hub name, cast on the way
"""

import argparse
from pathlib import Path

from ..cli import add_dtype_option, dtype_option

HELP = "convert a checkpoint (seed .pth, Hugging Face, nanoGPT, hub name) to gpt2fn safetensors or a HF directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint file, Hugging Face directory or hub name")
    parser.add_argument("dst", metavar="DST", help="output .safetensors file, or a directory for --format hf")
    parser.add_argument("--format", choices=("auto", "gpt2fn", "hf"), default="auto",
                        help="gpt2fn safetensors, or a Hugging Face directory (default: hf when DST is a "
                             "directory or ends with '/', else gpt2fn)")
    add_dtype_option(parser)
    parser.add_argument("--n-heads", type=int, help="attention heads, for files that do not say (default d/64)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import load_checkpoint, save, save_hf
    from ..devices import dtype_name
    from ..params import count_params

    dst = Path(args.dst)
    fmt = args.format
    if fmt == "auto":
        fmt = "hf" if dst.is_dir() or args.dst.endswith(("/", "\\")) else "gpt2fn"
    ckpt = load_checkpoint(args.src, dtype=dtype_option(args), n_heads=args.n_heads)
    params = ckpt.params
    written = save_hf(params, dst) if fmt == "hf" else save(params, dst)
    kind = "Hugging Face directory" if fmt == "hf" else "gpt2fn safetensors"
    print(f"{ckpt.source} ({ckpt.layout}, {count_params(params):,} parameters, "
          f"{dtype_name(params.dtype)}) -> {written} ({kind})")
    if fmt == "hf" and params.config.token_vocab_size is not None:
        print(f"note: the Hugging Face config has no field for token_vocab_size={params.config.token_vocab_size}; "
              "padding ids are not masked there")
    return 0

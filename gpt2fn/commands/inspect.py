"""`gpt2fn inspect PATH|NAME`: what a checkpoint is, as gpt2fn reads it.

Prints the detected layout, the files read, the config, the parameter tree with shapes and counts (one block
shown, the others summarised; `--all` lists every leaf) and what was ignored.
"""

import argparse

HELP = "show a checkpoint's detected layout, config, parameter shapes and counts, and ignored keys"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="PATH|NAME", help="checkpoint file, Hugging Face directory or hub name")
    parser.add_argument("--all", action="store_true", help="list every block's parameters, not only block 0")
    parser.add_argument("--n-heads", type=int, help="attention heads, for files that do not say (default d/64)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import LAYOUTS, load_checkpoint

    ckpt = load_checkpoint(args.source, n_heads=args.n_heads)
    print(describe(ckpt, layouts=LAYOUTS, every_block=args.all))
    return 0


def describe(ckpt, *, layouts: dict[str, str], every_block: bool = False) -> str:  # ckpt: Checkpoint
    from ..devices import dtype_name
    from ..params import count_params, named_leaves

    params, cfg = ckpt.params, ckpt.params.config
    total = count_params(params)
    nbytes = sum(t.numel() * t.element_size() for _, t in named_leaves(params))
    lines = [f"source:  {ckpt.source}",
             f"layout:  {layouts[ckpt.layout]} ({ckpt.layout})",
             "files:   " + (", ".join(str(f) for f in ckpt.files) or "-")]
    lines += [f"note:    {n}" for n in ckpt.notes]
    lines.append("config:")
    for k, v in cfg.to_dict().items():
        if k == "trained_vocab" and v is not None:  # thousands of ids: say how many and where they lie
            v = f"{len(v):,} ids ({v[0]}..{v[-1]}): the model predicts only these"
        lines.append(f"  {k:<17}{v}")
    lines.append(f"parameters: {total:,} ({dtype_name(params.dtype)}, {nbytes / 1e6:,.1f} MB)"
                 + ("; head tied to tok_emb" if params.head is None else ""))
    leaves = list(named_leaves(params))
    width = max(len(n) for n, _ in leaves) + 2
    per_block = sum(t.numel() for n, t in leaves if n.startswith("blocks.0."))
    summarised = False
    for name, t in leaves:
        if name.startswith("blocks.") and not name.startswith("blocks.0.") and not every_block:
            if not summarised:
                rest = f"blocks.1 .. blocks.{cfg.n_layers - 1}" if cfg.n_layers > 2 else "blocks.1"
                lines.append(f"  {rest:<{width}}{'(as blocks.0)':<16}{per_block * (cfg.n_layers - 1):>14,}")
                summarised = True
            continue
        lines.append(f"  {name:<{width}}{str(list(t.shape)):<16}{t.numel():>14,}")
    lines.append(f"ignored ({len(ckpt.ignored)}):" + ("" if ckpt.ignored else " nothing"))
    lines += [f"  {item}" for item in ckpt.ignored]
    return "\n".join(lines)

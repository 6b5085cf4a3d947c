"""`gpt2fn train`: train from scratch (a preset) or fine-tune loaded weights on text files; resumable.

    gpt2fn train --data corpus.txt --out runs/a --preset mini --steps 500
    gpt2fn train --data docs/ --out runs/ft --model gpt2 --context 256 --lr 1e-4   # --init is an alias
    gpt2fn train --data corpus.txt --out runs/a --steps 1000 --resume
    gpt2fn train --data corpus.txt --out runs/v --preset mini --vocab corpus    # softmax over the corpus's ids
    gpt2fn train --data corpus.txt --out runs/b --batch-size 4 --grad-accum 8 --dtype bf16   # 32 windows a step
    torchrun --nproc_per_node=2 -m gpt2fn.train --data corpus.txt --out runs/dp --preset mini
"""

import argparse
import dataclasses
import os
import sys
import typing

from ..cli import CLIError, add_model_options, device_option, load_model

HELP = "train or fine-tune a GPT-2 on text files (resumable, data parallel with torchrun)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a text file or a directory of text files")
    p.add_argument("--out", required=True, help="output directory: state, model.safetensors, metrics, loss.png")
    add_model_options(  # --model (alias --init) and --checkpoint fine-tune loaded weights; --preset starts afresh
        p, model_aliases=("--init",), default="--preset mini",
        seed_help="seeds init, data order and dropout (default 0)",
        dtype_help="compute dtype: fp32 (default), bf16 or fp16 (or float32, bfloat16, float16); master weights "
                   "and AdamW moments stay fp32, fp16 uses dynamic loss scaling", dtype_default="fp32", quantize=False)
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a config field of --preset, e.g. --set n_layers=4 --set emb_dim=192")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per micro-batch per process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="micro-batches per optimiser step (gradient accumulation; default 1): the global batch is "
                        "batch-size x K x processes, the data order depends only on it")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's context length)")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    p.add_argument("--min-lr", type=float, help="final cosine learning rate (default lr/10)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default min(100, steps/10))")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm limit, 0 = off (default 1)")
    p.add_argument("--dropout", type=float, help="dropout rate (default: the config's drop_rate)")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps (default 100)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at each validation)")
    p.add_argument("--log-every", type=int, default=10, help="metrics line every N steps (default 10)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of the corpus kept for validation")
    p.add_argument("--cache-dir", help="where tokenized corpora are cached (default ~/.cache/gpt2fn/tokens)")
    p.add_argument("--max-time", type=float, help="stop and save after this many seconds")
    p.add_argument("--stop-after", type=int, help="stop (and save) at this step; the schedule still spans --steps")
    p.add_argument("--vocab", choices=["full", "corpus"], default="full",
                   help="softmax over the whole vocabulary (default) or only the ids in the data: several times "
                        "faster for a small model, which then generates only those ids")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_overrides(items: list[str]) -> dict[str, typing.Any]:
    from ..config import GPTConfig

    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    out: dict[str, typing.Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise CLIError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        default = fields[name].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                out[name] = int(raw)
            elif isinstance(default, float):
                out[name] = float(raw)
            elif default is None:
                out[name] = None if raw.lower() == "none" else int(raw)
            else:
                out[name] = raw
        except ValueError:
            raise CLIError(f"--set {item!r}: {raw!r} is not a valid value for {name} "
                           f"(default {default!r})") from None
    return out


def _device(args: argparse.Namespace) -> str:
    """`--device` by the one policy (`gpt2fn.devices`: "auto" is CUDA, then MPS, then CPU); under torchrun an
    unnumbered "cuda" becomes this process's GPU, `cuda:$LOCAL_RANK`."""
    import torch

    device = device_option(args)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return str(device)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train import TrainConfig, train
    from ..train.distributed import setup, teardown

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a file; give a directory for the run (state, model, metrics)")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.isdir(args.out):  # temporary files a hard kill left behind (a few hundred MB each)
        from ..files import remove_stale_temps

        for path in remove_stale_temps(args.out):
            print(f"removed {path.name}, a temporary file an interrupted run left in {args.out}", file=sys.stderr)
    device = _device(args)
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(torch.device(device))
    overrides = _parse_overrides(args.set)
    if overrides and (args.model or args.checkpoint):
        raise CLIError("--set changes a preset's config; it cannot reshape loaded weights from --model/--init or "
                       "--checkpoint")
    if args.dropout is not None:
        overrides["drop_rate"] = args.dropout
    cfg = TrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, context=args.context,
        grad_accum=args.grad_accum, dtype=args.dtype,
        lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip or None, eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
        val_fraction=args.val_fraction, seed=args.seed, device=device, max_time=args.max_time,
        stop_after=args.stop_after, vocab=args.vocab,
        cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    info = setup(device)
    try:
        params = None
        from ..train.state import STATE_FILE
        resuming = args.resume and os.path.isfile(os.path.join(args.out, STATE_FILE))
        if not resuming:
            if args.model is None and args.checkpoint is None and args.context is not None:
                overrides.setdefault("context_length", args.context)  # from scratch: no wider position table than used
            params, _ = load_model(args, default_preset="mini", overrides=overrides)  # the loop places it on device
            if args.dropout is not None and (args.model or args.checkpoint):
                params = params.replace(config=params.config.replace(drop_rate=args.dropout))
        result = train(params, cfg, resume=args.resume, dist_info=info)
    finally:
        teardown(info)
    return {None: 0, "max_time": 0, "stop_after": 0, "SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by, 0)

"""Sweeps over interventions as one batched call: steering scales and head-ablation masks through `torch.func.vmap`,
checked against the loop they replace.

    python examples/intervention_sweep.py                         # random `mini` weights, offline, seconds
    python examples/intervention_sweep.py --checkpoint gpt2 --layer 6

Edits are function arguments, so `vmap` maps the edited forward over the edit's tensor: a scale `[n]`, steering
vectors `[n, d_model]` or masks `[n, ...]`; the layers before the edit run once.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import ablation_sweep, forward_with, logit_diff, steer, steering_sweep
from gpt2fn.tokenizer import encode

TEXT = "The weather today is"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=TEXT)
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=None, help="layer to steer and ablate (default: last)")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    cfg = params.config
    layer = cfg.n_layers - 1 if args.layer is None else args.layer
    ids = torch.tensor([encode(args.text)])
    good, bad = encode(" sunny")[0], encode(" rainy")[0]
    direction = params.tok_emb[good] - params.tok_emb[bad]
    site = f"blocks.{layer}.resid_post"

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, good, bad).mean()

    with torch.no_grad():
        scales = torch.linspace(-4, 4, 9)
        swept = steering_sweep(params, ids, site, direction, scales=scales, metric=metric)
        loop = torch.stack([metric(forward_with(params, ids, edit={site: steer(direction, scale=float(s))})[0])
                            for s in scales])
        print("logit(' sunny') - logit(' rainy') per steering scale (vmap):")
        print("  " + "  ".join(f"{float(s):+.0f}:{float(m):+.3f}" for s, m in zip(scales, swept, strict=True)))
        print(f"max |vmap - loop| over the scales: {float((swept - loop).abs().max()):.2e}")
        masks = torch.eye(cfg.n_heads, dtype=torch.bool)[:, :, None, None]  # one head ablated per run
        ablated = ablation_sweep(params, ids, f"blocks.{layer}.attn.z", masks, metric=metric)
        base = metric(forward_with(params, ids)[0])
        print(f"change when zero-ablating each head of layer {layer}: " + ", ".join(
            f"{h}:{float(d):+.4f}" for h, d in enumerate(ablated - base)))


if __name__ == "__main__":
    main()

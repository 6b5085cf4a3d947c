"""Attribution patching: estimate activation patching of every head, position and edge from two forwards and one
backward, then check the top estimates against exact patching.

    python examples/attribution_patching.py                         # random `mini` weights, offline, seconds
    python examples/attribution_patching.py --checkpoint gpt2       # real weights: the IOI prompt pair

AtP scores each component by `grad_corrupt(metric) . (clean - corrupt)`; EAP scores each edge sender -> receiver
the same way through the receivers' own inputs; EAP-IG (`--steps`) averages the gradient along the path from the
corrupt to the clean embeddings. Where the estimate and the exact sweep disagree, first order has failed (see
`gpt2fn.study.attribution`).
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import (
    attribution_patching,
    edge_attribution_patching,
    forward_with,
    head_patching_sweep,
    logit_diff,
)
from gpt2fn.tokenizer import encode

CLEAN = "When John and Mary went to the store, John gave a drink to"
CORRUPT = "When John and Mary went to the store, Mary gave a drink to"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5, help="integrated-gradient points for EAP-IG")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    cfg = params.config
    clean, corrupt = torch.tensor([encode(CLEAN)]), torch.tensor([encode(CORRUPT)])
    good, bad = encode(" Mary")[0], encode(" John")[0]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, good, bad).mean()

    atp = attribution_patching(params, clean, corrupt, metric, "blocks.*.attn.z")
    estimate = torch.stack([atp[f"blocks.{i}.attn.z"].sum((0, 2)) for i in range(cfg.n_layers)])
    with torch.no_grad():
        base = metric(forward_with(params, corrupt)[0])
    exact = head_patching_sweep(params, clean, corrupt, metric) - base
    r = torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1]
    print(f"AtP per head vs exact head patching: correlation {float(r):.3f}")
    print("layer.head    AtP      exact")
    for i in estimate.flatten().abs().topk(5).indices.tolist():
        layer, head = divmod(i, cfg.n_heads)
        print(f"{layer:>5}.{head:<4} {float(estimate[layer, head]):+.4f}  {float(exact[layer, head]):+.4f}")

    for name, steps in (("EAP", None), (f"EAP-IG ({args.steps} steps)", args.steps)):
        edges = edge_attribution_patching(params, clean, corrupt, metric, steps=steps)
        print(f"top edges by {name}:")
        for sender, receiver, score in edges.top(5):
            print(f"  {sender:>8} -> {receiver:<10} {score:+.4f}")


if __name__ == "__main__":
    main()

"""Head ablation: zero out one attention head at a time and see how much the next-token loss moves.

    python examples/head_ablation.py                                # random `mini` weights, offline, seconds
    python examples/head_ablation.py --checkpoint gpt2 "..."        # real weights

The edit is a pure function handed to the forward pass (`edit={"blocks.L.attn.z": ablate_head(H)}`): the head's
output is zero before the output projection, so it writes nothing to the residual stream. Nothing is registered.
"""

import argparse

import torch
import torch.nn.functional as F

import gpt2fn
from gpt2fn.study import ablate_head, forward_with
from gpt2fn.tokenizer import encode

TEXT = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the log."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=TEXT)
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean", action="store_true", help="mean-ablate (over positions) instead of zeroing")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    cfg = params.config
    tokens = torch.tensor([encode(args.text)])
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()

    with torch.no_grad():
        base, acts = forward_with(params, ids, capture="blocks.*.attn.z")
        print(f"loss without ablation: {loss(base):.4f}\nchange in loss per ablated head (layer x head):")
        print("layer " + "".join(f"{h:>9}" for h in range(cfg.n_heads)))
        for layer in range(cfg.n_layers):
            site = f"blocks.{layer}.attn.z"
            value = acts[site].mean(2, keepdim=True) if args.mean else 0.0  # [batch heads 1 head_dim]
            row = []
            for head in range(cfg.n_heads):
                logits, _ = forward_with(params, ids, edit={site: ablate_head(head, value=value)})
                row.append(loss(logits) - loss(base))
            print(f"{layer:>5} " + "".join(f"{d:+9.4f}" for d in row))


if __name__ == "__main__":
    main()

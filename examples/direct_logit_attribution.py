"""Direct logit attribution: which heads and MLPs write the logit difference straight into the output?

    python examples/direct_logit_attribution.py                     # random `mini` weights, offline, seconds
    python examples/direct_logit_attribution.py --checkpoint gpt2   # real weights: the indirect-object task

The residual stream before the final norm is a sum of components (embeddings, each head, each MLP, biases); with
the norm's scale frozen at this run's value, each component's share of logit(" Mary") - logit(" John") is a dot
product, and the shares add up to the model's logit difference exactly.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import direct_logit_attribution, forward_with, logit_diff
from gpt2fn.tokenizer import encode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="When John and Mary went to the store, John gave a drink to")
    parser.add_argument("--answers", nargs=2, default=[" Mary", " John"], metavar=("GOOD", "BAD"))
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=8, help="components shown")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    ids = torch.tensor([encode(args.prompt)])
    good, bad = (encode(a)[0] for a in args.answers)
    with torch.no_grad():
        attribution = direct_logit_attribution(params, ids, good, bad)
        actual = logit_diff(forward_with(params, ids)[0], good, bad)
    shares = {name: v[0].item() for name, v in attribution.named().items()}
    print(f"logit {args.answers[0]!r} - {args.answers[1]!r}: {actual[0]:+.4f}; "
          f"sum of the shares: {attribution.total()[0]:+.4f}")
    print("largest shares:")
    for name, value in sorted(shares.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {name:<22} {value:+.4f}")
    print("heads (rows: layers):")
    for layer, row in enumerate(attribution.heads[0].tolist()):
        print(f"  {layer:>3} " + " ".join(f"{v:+.3f}" for v in row))


if __name__ == "__main__":
    main()

"""Steering while generating: add a difference of mean activations between two prompt sets to the residual stream
at every decoding step, and compare the continuations.

    python examples/steer_generation.py                                   # random `mini` weights, offline
    python examples/steer_generation.py --checkpoint gpt2 --layer 6 --scale 8 "I think that"

The steering vector is mean(resid_post | positive prompts) - mean(resid_post | negative prompts) at one layer
(each prompt's activations averaged over its positions). `generate(..., edit={site: steer(vector)})` applies it at
the prefill and at every new token; nothing is registered on the model.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import run_with_capture, steer
from gpt2fn.tokenizer import encode

POSITIVE = ["I love this, it is wonderful", "What a great and happy day", "This is excellent and kind"]
NEGATIVE = ["I hate this, it is awful", "What a terrible and sad day", "This is horrible and cruel"]


def mean_activation(params: gpt2fn.GPTParams, prompts: list[str], site: str) -> torch.Tensor:
    """The activation at `site` averaged over positions, then over prompts: `[d_model]`."""
    means = []
    for p in prompts:
        _, acts = run_with_capture(params, torch.tensor([encode(p)]), [site])
        means.append(acts[site][0].mean(0))
    return torch.stack(means).mean(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="I think that")
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=None, help="layer whose resid_post is steered (default: middle)")
    parser.add_argument("--scale", type=float, default=8.0, help="multiple of the difference vector added")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    layer = params.config.n_layers // 2 if args.layer is None else args.layer
    site = f"blocks.{layer}.resid_post"
    with torch.no_grad():
        vector = mean_activation(params, POSITIVE, site) - mean_activation(params, NEGATIVE, site)
    options = dict(max_new_tokens=args.max_new_tokens, eos=False)
    plain = gpt2fn.generate(params, args.prompt, **options)
    towards = gpt2fn.generate(params, args.prompt, edit={site: steer(vector, scale=args.scale)}, **options)
    away = gpt2fn.generate(params, args.prompt, edit={site: steer(vector, scale=-args.scale)}, **options)
    print(f"steering {site} by {args.scale:g} x (positive - negative), |vector| = {vector.norm():.3f}")
    print(f"plain:    {args.prompt!r} -> {plain!r}")
    print(f"positive: {args.prompt!r} -> {towards!r}")
    print(f"negative: {args.prompt!r} -> {away!r}")


if __name__ == "__main__":
    main()

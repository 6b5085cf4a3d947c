"""Logit lens: what would the model predict if it stopped after each block?

    python examples/logit_lens.py                                   # random `mini` weights, offline, seconds
    python examples/logit_lens.py --checkpoint gpt2_model.pth "The Eiffel Tower is in the city of"

Each row reads the residual stream through the final layer norm and the unembedding (nostalgebraist, 2020).
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import lens_labels, logit_lens, token_labels
from gpt2fn.tokenizer import encode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="The Eiffel Tower is in the city of")
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=3, help="tokens shown per layer")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    ids = torch.tensor([encode(args.prompt)])
    with torch.no_grad():
        lens = logit_lens(params, ids, positions=[-1])  # [layer, batch, 1, vocab]
    probs = lens[:, 0, 0].softmax(-1)
    top = probs.topk(args.top, dim=-1)
    print(f"prompt: {args.prompt!r}; next-token guesses after each layer (probability):")
    for label, p, i in zip(lens_labels(params.config.n_layers), top.values, top.indices, strict=True):
        guesses = "  ".join(f"{t!r:>14} {q:5.3f}" for t, q in zip(token_labels(i), p.tolist(), strict=True))
        print(f"{label:>10}: {guesses}")


if __name__ == "__main__":
    main()

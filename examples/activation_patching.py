"""Activation patching between two prompts, over every layer x position as one `torch.func.vmap` call.

    python examples/activation_patching.py                          # random `mini` weights, offline, seconds
    python examples/activation_patching.py --checkpoint gpt2        # real weights: the indirect-object task

Run the corrupted prompt, but with the residual stream entering layer L at position P taken from the clean
prompt; record how much of the clean logit difference (" Mary" - " John") comes back (Meng et al. 2022,
Wang et al. 2022). 1.0: this (L, P) carries all the information; 0.0: none of it.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import forward_with, logit_diff, patching_sweep, token_labels
from gpt2fn.tokenizer import encode

CLEAN = "When John and Mary went to the store, John gave a drink to"
CORRUPT = "When John and Mary went to the store, Mary gave a drink to"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", default=CLEAN)
    parser.add_argument("--corrupt", default=CORRUPT)
    parser.add_argument("--answers", nargs=2, default=[" Mary", " John"], metavar=("RIGHT", "WRONG"),
                        help="single-token answers: right for the clean prompt, wrong for it")
    parser.add_argument("--site", default="resid_pre", help="per-layer site to patch (default %(default)s)")
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    clean, corrupt = torch.tensor([encode(args.clean)]), torch.tensor([encode(args.corrupt)])
    if clean.shape != corrupt.shape:
        raise SystemExit(f"the prompts must have the same number of tokens ({clean.shape[1]} vs {corrupt.shape[1]})")
    answers = [encode(a) for a in args.answers]
    if any(len(a) != 1 for a in answers):
        raise SystemExit(f"each answer must be one token; got {answers}")
    right, wrong = answers[0][0], answers[1][0]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, right, wrong).mean()

    with torch.no_grad():
        clean_diff = metric(forward_with(params, clean)[0])
        corrupt_diff = metric(forward_with(params, corrupt)[0])
        sweep = patching_sweep(params, clean, corrupt, metric, site=args.site)  # one batch: [layer, position]
    recovered = (sweep - corrupt_diff) / (clean_diff - corrupt_diff)
    print(f"logit difference {args.answers[0]!r} - {args.answers[1]!r}: clean {clean_diff:+.4f}, "
          f"corrupt {corrupt_diff:+.4f}")
    print(f"fraction recovered by patching {args.site} (rows: layers, columns: positions)")
    labels = token_labels(clean[0])
    print("      " + "".join(f"{t[:7]:>8}" for t in labels))
    for layer, row in enumerate(recovered.tolist()):
        print(f"{layer:>5} " + "".join(f"{r:8.2f}" for r in row))


if __name__ == "__main__":
    main()

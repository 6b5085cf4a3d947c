"""Per-example gradients with `vmap(grad(loss))`: one gradient per sentence, without a Python loop.

    python examples/per_example_gradients.py                        # random `mini` weights, offline, seconds
    python examples/per_example_gradients.py --checkpoint gpt2      # real weights

Prints each example's loss and gradient norm (as DP-SGD clips them; `per_example_grad_norms` gives the norms
directly) and checks one gradient against a plain `torch.func.grad` of that example alone.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import per_example_grads
from gpt2fn.tokenizer import decode, encode

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Colorless green ideas sleep furiously tonight.",
             "She sells sea shells by the sea shore today.",
             "asdf qwer zxcv uiop hjkl vbnm tyui ghjk"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    seqs = [encode(s) for s in SENTENCES]
    n = min(len(s) for s in seqs)  # equal lengths: crop to the shortest
    tokens = torch.tensor([s[:n] for s in seqs])
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    grads = per_example_grads(params, ids, targets)  # GPTParams whose leaves have a leading batch axis
    leaves = torch.utils._pytree.tree_leaves(grads)
    norms = torch.stack([leaf.flatten(1).norm(dim=1) for leaf in leaves]).norm(dim=0)
    with torch.no_grad():
        losses = [gpt2fn.loss(params, ids[i:i + 1], targets[i:i + 1]).item() for i in range(len(seqs))]
    for text, loss, norm in zip(tokens, losses, norms.tolist(), strict=True):
        print(f"loss {loss:7.4f}  |grad| {norm:9.4f}  {decode(text.tolist())!r}")

    alone = torch.func.grad(gpt2fn.loss)(params, ids[:1], targets[:1])
    err = (grads.tok_emb[0] - alone.tok_emb).abs().max().item()
    print(f"vmap(grad) vs grad of example 0 alone, max |difference| in tok_emb: {err:.2e}")


if __name__ == "__main__":
    main()

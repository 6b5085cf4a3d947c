"""Activations while generating: capture sites at the prefill and at every new token, stacked along the sequence
axis so they line up with the generated ids, optionally while steering, and check them against one forward pass.

    python examples/generate_with_capture.py                                  # random `mini` weights, offline
    python examples/generate_with_capture.py --checkpoint gpt2 --layer 6 "The Eiffel Tower is in"

`generate_tokens(..., capture=sites)` returns `(ids, acts)`; `acts[site]` has one position per token of `ids`
(the prompt from the prefill, then one per new token: the last one is run through the model too), equal to
`forward_with(params, ids, capture=sites, edit=...)`. Here: the residual stream's norm at each position, the
attention of every new token to the prompt, and the same with a steering edit applied while generating.
"""

import argparse

import torch

import gpt2fn
from gpt2fn.study import forward_with, steer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=None, help="layer whose residual stream is read (default: last)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--scale", type=float, default=4.0, help="steering scale of the edited run")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    layer = params.config.n_layers - 1 if args.layer is None else args.layer
    resid, pattern = f"blocks.{layer}.resid_post", f"blocks.{layer}.attn.pattern"
    prompt = torch.tensor([gpt2fn.encode(args.prompt)])
    n = prompt.shape[1]

    ids, acts = gpt2fn.generate_tokens(params, prompt, max_new_tokens=args.max_new_tokens, eos=False,
                                       capture=[resid, pattern])
    print(f"generated {gpt2fn.decode(ids[0, n:].tolist())!r}; captured {resid} {list(acts[resid].shape)}, "
          f"{pattern} {list(acts[pattern].shape)}")
    print("position  token            |resid|  attention to the prompt (mean over heads)")
    to_prompt = acts[pattern][0].mean(0)[:, :n].sum(-1)  # [seq]: each query's attention mass on prompt tokens
    for t in range(ids.shape[1]):
        piece = gpt2fn.decode([int(ids[0, t])])
        mark = "" if t < n else "  (new)"
        print(f"{t:8d}  {piece!r:15.15} {acts[resid][0, t].norm():8.2f}  {to_prompt[t]:.3f}{mark}")

    _, ref = forward_with(params, ids, capture=[resid, pattern])
    gap = max((acts[s] - ref[s]).abs().max().item() for s in (resid, pattern))
    print(f"max |generate capture - forward_with on the final ids|: {gap:.1e}")

    direction = torch.randn(params.config.emb_dim, generator=torch.Generator().manual_seed(args.seed))
    edit = {f"blocks.{layer}.resid_pre": steer(direction / direction.norm(), scale=args.scale)}
    steered, sacts = gpt2fn.generate_tokens(params, prompt, max_new_tokens=args.max_new_tokens, eos=False,
                                            edit=edit, capture=resid)
    _, sref = forward_with(params, steered, capture=resid, edit=edit)
    print(f"steered: {gpt2fn.decode(steered[0, n:].tolist())!r}; max |capture - forward_with(edit=)|: "
          f"{(sacts[resid] - sref[resid]).abs().max().item():.1e}")


if __name__ == "__main__":
    main()

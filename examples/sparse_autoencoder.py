"""Sparse autoencoders: load (or make) an SAE in SAE-Lens's format, read its features on a prompt, and ablate or
steer a feature while keeping the SAE's error term.

    python examples/sparse_autoencoder.py                                   # random SAE on random `mini` weights
    python examples/sparse_autoencoder.py --checkpoint gpt2 --sae path/to/blocks.8.hook_resid_pre

An SAE-Lens directory holds `cfg.json` and `sae_weights.safetensors` (e.g. one folder of the `gpt2-small-res-jb`
release, downloaded once). `prepare_for_sae` applies the weight processing the SAE was trained on (for those,
`center_writing_weights`); the logits do not change. Spliced in with its error term the SAE changes nothing until a
feature is edited.
"""

import argparse
import tempfile

import torch

import gpt2fn
from gpt2fn.study import (
    ablate_features,
    load_sae,
    prepare_for_sae,
    run_with_saes,
    sae_from_dict,
    save_sae,
    steer_features,
)
from gpt2fn.tokenizer import encode

TEXT = "The cat sat on the mat and looked out of the window"


def random_sae(params: gpt2fn.GPTParams, layer: int, d_sae: int, seed: int):
    """A random standard SAE on `blocks.{layer}.hook_resid_pre`, round-tripped through SAE-Lens's file format."""
    d = params.config.emb_dim
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    sae = sae_from_dict({"d_in": d, "d_sae": d_sae, "architecture": "standard",
                         "metadata": {"hook_name": f"blocks.{layer}.hook_resid_pre",
                                      "model_from_pretrained_kwargs": {"center_writing_weights": True}}},
                        {"W_enc": w_dec.T.contiguous(), "b_enc": torch.full((d_sae,), -0.02), "W_dec": w_dec,
                         "b_dec": torch.zeros(d)})
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, tmp)
        return load_sae(tmp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=TEXT)
    parser.add_argument("--checkpoint", help="real weights (file, directory or hub name); default: random weights")
    parser.add_argument("--sae", help="an SAE-Lens SAE directory; default: a random SAE")
    parser.add_argument("--preset", default="mini", help="config of the random weights (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=20.0, help="activation added to the steered feature")
    args = parser.parse_args(argv)

    params = (gpt2fn.load(args.checkpoint) if args.checkpoint
              else gpt2fn.init_params(gpt2fn.preset(args.preset), seed=args.seed))
    sae = load_sae(args.sae) if args.sae else random_sae(params, params.config.n_layers - 1, 512, args.seed)
    params = prepare_for_sae(params, sae)
    site = sae.config.site
    ids = torch.tensor([encode(args.text)])
    print(f"SAE {sae}")

    with torch.no_grad():
        plain, _, _ = run_with_saes(params, ids, [], capture=())
        logits, _, feats = run_with_saes(params, ids, sae)
        f = feats[site][0]  # [seq d_sae]
        print(f"spliced with the error term, max |logit change|: {float((logits - plain).abs().max()):.2e}")
        print(f"mean active features per token (L0): {float((f > 0).sum(-1).float().mean()):.1f}")
        top = f.sum(0).topk(5)
        print("features most active on the prompt:", ", ".join(
            f"{i} ({float(v):.2f})" for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        feature = int(top.indices[0])
        ablated, _, _ = run_with_saes(params, ids, sae, features={site: ablate_features(feature)})
        steered, _, _ = run_with_saes(params, ids, sae, features={site: steer_features(feature, args.scale)})
        last = logits[0, -1].log_softmax(-1)
        for name, out in (("ablated", ablated), ("steered", steered)):
            shift = float((out[0, -1].log_softmax(-1) - last).exp().sub(1).abs().max())
            print(f"feature {feature} {name}: next-token top id {int(out[0, -1].argmax())} "
                  f"(was {int(logits[0, -1].argmax())}), max relative probability change {shift:.3f}")


if __name__ == "__main__":
    main()

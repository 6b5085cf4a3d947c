"""Quick side-by-side decode speed: gpt2fn.generate_tokens vs transformers' GPT2LMHeadModel.generate.

Random GPT-2 124M weights (speed does not depend on the values), greedy, a fixed number of new tokens, the two
contenders interleaved round by round in one process so that a busy machine slows both alike. Prints the median
ms per new token of each and the ratio. For tuning the decode loop; the full suite is scripts/bench.py.

    .venv/bin/python scripts/decode_speed.py                       # batch 1, fp32
    .venv/bin/python scripts/decode_speed.py --batch 8 --dtype bfloat16 --rounds 7
"""

import argparse
import statistics
import time

import torch

import gpt2fn
from gpt2fn import generate_tokens, init_params, preset


def hf_model(cfg: gpt2fn.GPTConfig, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads)
    torch.manual_seed(0)
    return GPT2LMHeadModel(hf_cfg).eval().to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checks", action="store_true", help="keep gpt2fn's shape checks on (the library default)")
    ap.add_argument("--no-hf", action="store_true", help="time gpt2fn only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = gpt2fn.devices.parse_dtype(args.dtype)
    cfg = preset(args.preset)
    params = init_params(cfg, seed=0, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    contenders = {"gpt2fn": lambda: generate_tokens(params, ids, max_new_tokens=args.new, eos=False)}
    if not args.no_hf:
        hf = hf_model(cfg, dtype)
        mask = torch.ones_like(ids)

        def run_hf() -> None:
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                            do_sample=False, pad_token_id=0)

        contenders["transformers"] = run_hf
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with gpt2fn.shape_checks(args.checks):
        for fn in contenders.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3 / args.new)
    print(f"{args.preset} {args.dtype} batch {args.batch}, prompt {args.prompt} + {args.new} new, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (ms per step, median [min-max])")
    for name, t in times.items():
        print(f"  {name:13s} {statistics.median(t):7.2f} ms  [{min(t):.2f}-{max(t):.2f}]  "
              f"{args.batch * 1e3 / statistics.median(t):7.1f} tok/s")
    if "transformers" in times:
        ratios = [h / g for g, h in zip(times["gpt2fn"], times["transformers"], strict=True)]
        print(f"  speed-up gpt2fn / transformers: median {statistics.median(ratios):.2f}x "
              f"(per-round {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()

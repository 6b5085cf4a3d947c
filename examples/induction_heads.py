"""Induction heads: train a small 2-layer GPT on repeated random tokens, find its induction head, confirm it.

    python examples/induction_heads.py                        # 1000 steps: 1-3 minutes on 2 CPU cores
    python examples/induction_heads.py --steps 30 --batch 8   # seconds (the test suite's size; no head forms)

1. Train (`gpt2fn.train.train_step`, a functional AdamW) on random tokens in which pairs `a b` reappear later at
   random places; the loss counts only the second `b` of each pair. Predicting it means "find the earlier `a`, read
   what came after it": an induction head in layer 1 reading, through its keys, a previous-token head in layer 0
   (Elhage et al. 2021, Olsson et al. 2022). The position embeddings are fixed sinusoids (Vaswani et al. 2017),
   put back after every step: a previous-token head is then one linear map away, and the circuit forms in a few
   hundred steps (with learned positions this model sits on a plateau for thousands).
2. Detect: previous-token, duplicate-token and induction scores of every head on random tokens repeated twice.
3. Confirm by patching: clean `r r`, corrupt `r' r` (the first copy replaced, so the second half repeats nothing);
   run the corrupt prompt with one head's output (`attn.z`) from the clean run and see how much of the clean
   log-probability of the second half comes back.
4. Path patching: each layer-0 head's corrupt output sent only into layer 1's keys (then the previous-token head's
   into the induction head's keys alone).
5. K-composition (Elhage et al. 2021): how much the induction head's keys read what the previous-token head writes.
"""

import argparse
import math
import time

import torch

import gpt2fn
from gpt2fn import train as T
from gpt2fn.study import (
    Receiver,
    composition_scores,
    forward_with,
    head_detector_scores,
    head_patching_sweep,
    path_patch,
    path_patching_sweep,
    repeated_tokens,
)


def sinusoids(n: int, d: int, *, base: float = 100.0, scale: float = 0.1) -> torch.Tensor:
    """Fixed position embeddings `[n, d]`: sin/cos pairs at geometric frequencies, so that shifting by one
    position is the same rotation everywhere."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(base) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return scale * out


def planted_pairs(batch: int, ctx: int, vocab: int, gen: torch.Generator, *, p_copy: float = 0.7
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, targets)` `[batch, ctx]`: random tokens where, slot after slot of two, an earlier pair `a b` is copied
    with probability `p_copy`; targets are -100 (ignored) except at the copied `b`s."""
    x = torch.randint(0, vocab, (batch, ctx + 1), generator=gen)
    keep = torch.zeros(batch, ctx + 1, dtype=torch.bool)
    for at in range(2, ctx, 2):
        copy = torch.rand(batch, generator=gen) < p_copy
        src = (torch.rand(batch, generator=gen) * (at - 1)).long()  # an earlier pair start in 0..at-2
        rows = copy.nonzero().flatten()
        x[rows, at], x[rows, at + 1] = x[rows, src[rows]], x[rows, src[rows] + 1]
        keep[rows, at + 1] = True
    return x[:, :-1], torch.where(keep[:, 1:], x[:, 1:], -100)


def train_model(args: argparse.Namespace) -> tuple[gpt2fn.GPTParams, gpt2fn.GPTParams]:
    cfg = gpt2fn.GPTConfig(vocab_size=args.vocab, context_length=args.ctx, emb_dim=args.d_model, n_heads=args.heads,
                           n_layers=2, drop_rate=0.0, qkv_bias=True)
    positions = sinusoids(cfg.context_length, cfg.emb_dim)
    params = gpt2fn.init_params(cfg, seed=args.seed).replace(pos_emb=positions)
    init, state, gen = params, T.adamw_init(params), torch.Generator().manual_seed(args.seed)
    hp = T.AdamWHParams(weight_decay=0.0)
    start, losses = time.time(), []
    for step in range(args.steps):
        ids, targets = planted_pairs(args.batch, cfg.context_length, cfg.vocab_size, gen)
        lr = args.lr * min(1.0, (step + 1) / 50)  # a short linear warmup
        params, state, m = T.train_step(params, state, ids, targets, lr=lr, hp=hp)
        params = params.replace(pos_emb=positions)  # the positions stay fixed
        losses.append(float(m.loss))
        if (step + 1) % max(1, args.steps // 6) == 0 or step + 1 == args.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step + 1:>5}  loss on the copied tokens {recent:.3f}  ({time.time() - start:.0f} s)",
                  flush=True)
    return init, params


def show(title: str, grid: torch.Tensor) -> None:
    print(title)
    print("layer " + "".join(f"{h:>7}" for h in range(grid.shape[1])))
    for layer, row in enumerate(grid.tolist()):
        print(f"{layer:>5} " + "".join(f"{v:7.2f}" for v in row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=12, help="length of the repeated sequence for the analysis")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if 2 * args.seq_len > args.ctx or args.seq_len > args.vocab // 2:
        raise SystemExit("--seq-len must be at most ctx/2 and vocab/2 (the corrupt copy uses other tokens)")
    print(f"training a 2-layer GPT (d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}) for "
          f"{args.steps} steps on planted pairs")
    init, params = train_model(args)
    n = args.seq_len  # tokens in each copy

    # 2. detect
    scores = head_detector_scores(params, seq_len=n, batch=16, seed=1)
    show(f"\nprevious-token score (attention to the position before), on random tokens repeated twice "
         f"(seq_len {n})", scores.previous_token)
    show("duplicate-token score (to the same token's earlier occurrence)", scores.duplicate_token)
    show("induction score (to the token after its earlier occurrence)", scores.induction)
    ind = int(scores.induction[1].argmax())  # an induction head composes with a head before it: layer 1
    prev = int(scores.previous_token[0].argmax())
    print(f"\ninduction head: 1.{ind} (score {scores.induction[1, ind]:.2f}); previous-token head: 0.{prev} "
          f"(score {scores.previous_token[0, prev]:.2f})")

    # 3. confirm by patching: clean r r, corrupt r' r; metric: mean log-prob of the second half's next tokens
    gen = torch.Generator().manual_seed(2)
    clean = repeated_tokens(args.vocab, seq_len=n, batch=8, seed=gen)
    others = [torch.tensor([t for t in range(args.vocab) if t not in set(row.tolist())]) for row in clean[:, :n]]
    fresh = torch.stack([o[torch.randperm(len(o), generator=gen)[:n]] for o in others])
    corrupt = torch.cat([fresh, clean[:, n:]], dim=1)
    targets = clean[:, n + 1:]  # the second copy after its first token: predictable only by induction

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = logits[:, n:-1].log_softmax(-1)
        return logp.gather(-1, targets[..., None]).mean()

    with torch.no_grad():
        clean_m, corrupt_m = metric(forward_with(params, clean)[0]), metric(forward_with(params, corrupt)[0])
    sweep = head_patching_sweep(params, clean, corrupt, metric, site="attn.z")  # [layer, head], one batch
    recovered = (sweep - corrupt_m) / (clean_m - corrupt_m)
    print(f"\nlog-prob of the second half: clean {clean_m:.3f}, corrupt (first copy replaced) {corrupt_m:.3f}")
    show("fraction recovered by patching one head's output (attn.z, all positions) from clean into corrupt",
         recovered)

    # 4. path patching: each layer-0 component's corrupt output reaching only layer 1's keys (all heads), then
    # the previous-token head's reaching only the induction head's keys
    senders = [(0, h) for h in range(args.heads)] + [(0, "mlp")]
    paths = path_patching_sweep(params, clean, corrupt, metric, senders=senders, receivers="blocks.1.attn.k")
    lost = (clean_m - paths) / (clean_m - corrupt_m)
    print("path patching into the keys of every layer-1 head: fraction of the clean-corrupt gap lost, per sender")
    print("   " + "  ".join(f"{'0.' + str(h) if h != 'mlp' else 'mlp0':>6}" for _, h in senders))
    print("   " + "  ".join(f"{v:6.2f}" for v in lost.tolist()))
    one = path_patch(params, clean, corrupt, metric, sender=(0, prev), receivers=Receiver("blocks.1.attn.k", ind))
    print(f"path patching 0.{prev} -> keys of 1.{ind} only: {(clean_m - one) / (clean_m - corrupt_m):.2f} of the "
          "gap lost")

    # 5. K-composition
    # K-composition (Elhage et al. 2021; TransformerLens's convention, raw weights): [layer, head, layer, head]
    trained = composition_scores(params, "k")[0, :, 1, ind].tolist()
    untrained = composition_scores(init, "k")[0, :, 1, ind].tolist()
    print(f"K-composition 0.h -> 1.{ind}, trained:   " + " ".join(f"{s:.3f}" for s in trained))
    print(f"K-composition 0.h -> 1.{ind}, at init:   " + " ".join(f"{s:.3f}" for s in untrained))
    print(f"K-composition of the previous-token head 0.{prev} with the induction head 1.{ind}: "
          f"{trained[prev]:.3f} (at init {untrained[prev]:.3f})")


if __name__ == "__main__":
    main()

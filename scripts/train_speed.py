"""Train-step speed, side by side in one process: gpt2fn's functional step vs a standard nn.Module GPT.

    .venv/bin/python scripts/train_speed.py                       # preset small: 6 layers, 384 wide, ctx 256
    .venv/bin/python scripts/train_speed.py --batch-size 8 --steps 3 --rounds 3 --threads 2
    .venv/bin/python scripts/train_speed.py --memory              # peak resident memory, a process per contender

Both sides do the same work per step on the same batch: forward, next-token cross-entropy, gradients, global-norm
clipping to 1.0 and AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only):
- gpt2fn: `gpt2fn.train.train_step` = `torch.func.grad_and_value(gpt2fn.loss)` + the functional AdamW;
- baseline: a nanoGPT-style `nn.Module` (nn.Linear, fused SDPA, tied head) + `loss.backward()` +
  `clip_grad_norm_` + `torch.optim.AdamW`.
The two alternate in rounds (the machine is shared; alternating spreads any background load over both) and the
median step time of each gives tokens/s. `measure_train_speed` is importable (scripts/bench.py may reuse it).
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpt2fn  # noqa: E402
from gpt2fn.train import AdamWHParams, adamw_init, train_step  # noqa: E402

__all__ = ["ModuleGPT", "measure_train_speed"]


class _Block(nn.Module):
    def __init__(self, cfg: gpt2fn.GPTConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=cfg.qkv_bias), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, cfg.d_mlp), nn.Linear(cfg.d_mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class ModuleGPT(nn.Module):
    """The standard way: a GPT-2 as an nn.Module (nanoGPT's shape), head tied to the token embedding."""

    def __init__(self, cfg: gpt2fn.GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def measure_train_speed(config: gpt2fn.GPTConfig | None = None, *, batch_size: int = 8, context: int | None = None,
                        steps: int = 3, rounds: int = 3, warmup: int = 1, seed: int = 0,
                        checks: bool = True) -> dict[str, Any]:
    """Median step time and tokens/s of the functional step and the nn.Module baseline (same config/batch)."""
    cfg = config or gpt2fn.preset("small")
    ctx = context or cfg.context_length
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (batch_size, ctx), generator=gen)
    hp = AdamWHParams(beta1=0.9, beta2=0.95, weight_decay=0.1)

    params = gpt2fn.init_params(cfg, seed=seed)
    state = [params, adamw_init(params)]

    def functional() -> float:
        with gpt2fn.shape_checks(checks):
            p, s, m = train_step(state[0], state[1], ids, targets, lr=1e-4, hp=hp, clip_norm=1.0, donate=True)
        state[0], state[1] = p, s
        return float(m.loss)

    torch.manual_seed(seed)
    model = ModuleGPT(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))

    def module() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    contenders = {"gpt2fn (torch.func + functional AdamW)": functional,
                  "nn.Module + loss.backward() + torch.optim.AdamW": module}
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(steps):
                t, c = time.perf_counter(), time.process_time()
                loss = fn()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                assert math.isfinite(loss)
    tokens = batch_size * ctx
    rows = {name: {"median_step_s": statistics.median(wall[name]),
                   "tokens_per_s": tokens / statistics.median(wall[name]), "median_cpu_s": statistics.median(cpu[name]),
                   "tokens_per_cpu_s": tokens / statistics.median(cpu[name]), "steps_timed": len(wall[name])}
            for name in contenders}
    ours, theirs = (rows[n] for n in contenders)
    return {"config": cfg.to_dict(), "batch_size": batch_size, "context": ctx, "threads": torch.get_num_threads(),
            "shape_checks": checks, "results": rows,
            "ratio_gpt2fn_over_module": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "ratio_cpu_time": ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"]}


MEMORY_CASES = {"fused": "gpt2fn step (fused head + cross-entropy)",
                "plain": "gpt2fn step with F.cross_entropy over full logits",
                "bf16": "gpt2fn step, bf16 compute over fp32 master weights (--dtype bf16)",
                "module": "nn.Module + loss.backward() + torch.optim.AdamW"}


def _peak_rss_child(case: str, preset: str, batch_size: int, context: int | None) -> None:
    """In a fresh process: two steps of one contender, then print the peak resident memory in bytes."""
    import resource

    import gpt2fn.train.step as step_mod

    cfg = gpt2fn.preset(preset)
    ctx = context or cfg.context_length
    gen = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, cfg.vocab_size, (batch_size, ctx), generator=gen) for _ in range(2))
    if case == "module":
        model = ModuleGPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(ids, targets).backward()
            opt.step()
    else:
        if case == "plain":
            step_mod.loss_and_grads = lambda p, x, y, generator=None, **_: torch.func.grad_and_value(gpt2fn.loss)(
                p, x, y, generator=generator)
        params = gpt2fn.init_params(cfg, seed=0)
        state = adamw_init(params)
        for _ in range(2):
            params, state, _ = step_mod.train_step(params, state, ids, targets, lr=1e-4, donate=True,
                                                   dtype=torch.bfloat16 if case == "bf16" else None)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure_peak_memory(preset: str = "small", batch_size: int = 8, context: int | None = None) -> dict[str, int]:
    """Peak resident bytes of two training steps of each contender, each in its own process."""
    import subprocess

    out = {}
    for case in MEMORY_CASES:
        cmd = [sys.executable, __file__, "--child-memory", case, "--preset", preset, "--batch-size", str(batch_size)]
        if context:
            cmd += ["--context", str(context)]
        out[case] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-checks", action="store_true", help="turn gpt2fn's run-time shape checks off")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--memory", action="store_true", help="measure peak resident memory (a process per contender)")
    ap.add_argument("--child-memory", choices=list(MEMORY_CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        return _peak_rss_child(args.child_memory, args.preset, args.batch_size, args.context)
    if args.memory:
        peaks = measure_peak_memory(args.preset, args.batch_size, args.context)
        print(f"peak resident memory over two train steps, preset {args.preset}, batch {args.batch_size}:")
        for case, peak in peaks.items():
            print(f"  {MEMORY_CASES[case]:52s} {peak / 2**20:8.0f} MiB")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_train_speed(gpt2fn.preset(args.preset), batch_size=args.batch_size, context=args.context,
                                 steps=args.steps, rounds=args.rounds, checks=not args.no_checks)
    print(f"train step, preset {args.preset}, batch {result['batch_size']} x ctx {result['context']}, "
          f"{result['threads']} threads, shape checks {'on' if result['shape_checks'] else 'off'}")
    for name, row in result["results"].items():
        print(f"  {name:50s} {row['tokens_per_s']:8.0f} tok/s  ({row['median_step_s'] * 1000:.0f} ms/step wall, "
              f"{row['median_cpu_s'] * 1000:.0f} ms CPU)")
    print(f"  ratio gpt2fn / nn.Module: {result['ratio_gpt2fn_over_module']:.2f}x wall-clock, "
          f"{result['ratio_cpu_time']:.2f}x by process CPU time (robust to other load on the machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

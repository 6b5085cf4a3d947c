"""The training loop: data -> train_step -> logs, validation, plots and checkpoints that lose nothing.

    result = train(params, TrainConfig(data="corpus.txt", out="runs/a", steps=1000))
    result = train(None, TrainConfig(..., steps=2000), resume=True)     # continue from runs/a/state.safetensors

What lands in `out`:
    state.safetensors   the resumable state (params, AdamW moments, step, generator states, configs, data id),
                        written atomically at every save point, at the end and on SIGINT/SIGTERM
    model.safetensors   the weights alone, through `gpt2fn.save` (load with `gpt2fn.load`, then generate)
    metrics.jsonl       one JSON object per line: train {step, loss, lr, grad_norm, tokens_per_s, elapsed_s}
                        every `log_every` steps and validation {step, val_loss} every `eval_every` steps
    loss.png            the loss curve (train and validation)

Exact resume: the schedule is a function of the step, windows come from the saved data generator and dropout
from the saved dropout generator, so N steps straight equal N/2 + resume + N/2, bit for bit on CPU (a test pins
it). With torchrun every rank draws the same global batch of window starts and keeps its slice; only rank 0
writes; a stop request on any rank stops all of them at the same step.
"""

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import save as save_weights
from ..model import loss as lm_loss
from ..params import GPTParams, count_params
from ..tokenizer import EOT
from . import distributed as D
from .data import eval_starts, load_tokens, sample_starts, split_tokens, windows
from .optim import AdamWHParams, adamw_init, warmup_cosine
from .state import STATE_FILE, TrainState, load_state, save_state
from .step import train_step

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "MODEL_FILE", "METRICS_FILE", "PLOT_FILE"]

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's shape is the params' config; this is everything else)."""

    data: str
    """A text file or a directory of them."""
    out: str
    """Directory for the state, weights, metrics and plot."""
    steps: int = 1000
    """Total optimisation steps (a resumed run continues up to this count)."""
    batch_size: int = 8
    """Windows per step per process (the global batch is batch_size * world_size)."""
    context: int | None = None
    """Tokens per window; None: the model's context_length."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float | None = None
    """Final learning rate of the cosine; None: lr / 10."""
    warmup: int | None = None
    """Linear warmup steps; None: min(100, steps // 10)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float | None = 1.0
    """Global gradient-norm limit (None or 0: no clipping)."""
    eval_every: int = 100
    """Validation every N steps (0: only at the end)."""
    eval_windows: int = 64
    """At most this many fixed validation windows."""
    save_every: int | None = None
    """Checkpoint every N steps; None: at every validation (0: only at the end and on a signal)."""
    log_every: int = 10
    """Write a train metrics line every N steps (the mean loss over them)."""
    val_fraction: float = 0.1
    seed: int = 0
    """Seeds the data generator (and the dropout generator, offset by rank)."""
    device: str = "cpu"
    max_time: float | None = None
    """Stop (and save) after this many seconds of training, whatever `steps` says."""
    stop_after: int | None = None
    """Stop (and save) once this step is reached, as an interruption would; the schedule still spans `steps`."""
    cache_dir: str | None = None
    """Where tokenized corpora are cached; None: ~/.cache/gpt2fn/tokens."""
    progress: bool = True
    """Show a progress bar (rank 0, when stderr is a terminal)."""
    vocab: str = "full"
    """"full": the softmax spans the model's whole vocabulary. "corpus": only the ids that occur in the data
    (and <|endoftext|>), recorded as `config.trained_vocab`: a 50,257-row head costs most of a small model's
    step, and a corpus uses a few thousand ids (generation then produces only those)."""

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be at least 1, got {self.context}")
        if self.vocab not in ("full", "corpus"):
            raise ValueError(f"vocab must be 'full' or 'corpus', got {self.vocab!r}")

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, peak_lr=self.lr, total_steps=self.steps, warmup_steps=self.warmup_steps,
                             min_lr=self.final_lr)

    @property
    def hparams(self) -> AdamWHParams:
        return AdamWHParams(beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay)


@dataclass
class TrainResult:
    params: GPTParams
    step: int
    train_loss: float | None
    val_loss: float | None
    stopped_by: str | None
    """None when all steps ran; else "SIGINT", "SIGTERM", "max_time" or "stop_after"."""
    out: Path


def evaluate(params: GPTParams, tokens: np.ndarray, *, context: int, batch_size: int, max_windows: int,
             device: torch.device | str = "cpu") -> float | None:
    """Mean loss over fixed, evenly spaced windows of `tokens` (no dropout, no generator touched)."""
    starts = eval_starts(len(tokens), context=context, max_windows=max_windows)
    if len(starts) == 0:
        return None
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            ids, targets = windows(tokens, chunk, context)
            total += float(lm_loss(params, ids.to(device), targets.to(device), fused_head=True)) * len(chunk)
    return total / len(starts)


class _StopFlag:
    """Set by SIGINT/SIGTERM (a second SIGINT interrupts at once); checked between steps."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.reason = self.reason or name


@contextmanager
def _signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, flag.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _metrics_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(path: Path, records: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend choice, no global figure list

    from .state import atomic_write

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))


def _export_model(params: GPTParams, out: Path) -> Path:
    """`out/model.safetensors` through `gpt2fn.save` (the library's weights format; atomic itself)."""
    return save_weights(params, out / MODEL_FILE)


def _data_gen_seed(seed: int) -> int:
    return seed * 1_000_003 + 17


def train(params: GPTParams | None, cfg: TrainConfig, *, resume: bool = False,
          dist_info: D.DistInfo | None = None) -> TrainResult:
    """Train `params` (or the state in `cfg.out` when `resume`) for `cfg.steps` steps; see the module docstring.

    Returns when the steps are done, `max_time` has passed or a SIGINT/SIGTERM arrived; in every case the last
    state has been saved first."""
    device = torch.device(cfg.device)
    info = dist_info if dist_info is not None else D.setup(device)
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    main = info.is_main

    tokens = load_tokens(cfg.data, cache_dir=cfg.cache_dir)
    data_id = {"tokens": len(tokens), "hash": Path(tokens.filename).stem}

    if resume and state_path.is_file():
        state = load_state(state_path, device=device)
        saved = state.meta
        if saved.get("data", {}).get("hash") not in (None, data_id["hash"]):
            raise ValueError(f"--data {cfg.data!r} is not the corpus the run in {str(out)!r} was trained on "
                             f"(token hash {data_id['hash']} vs {saved['data']['hash']}); pass the same data")
        if saved.get("global_batch") not in (None, cfg.batch_size * info.world_size) and main:
            print(f"note: global batch changed from {saved['global_batch']} to "
                  f"{cfg.batch_size * info.world_size}; the run continues, but not identically", file=sys.stderr)
    else:
        if resume and main:
            print(f"note: no training state in {str(out)!r} yet; starting from the given weights", file=sys.stderr)
        if state_path.is_file():
            raise ValueError(f"{str(out)!r} already holds a training state ({STATE_FILE}); pass --resume to "
                             "continue it, or choose another --out")
        if params is None:
            raise ValueError("train() needs params unless resuming a saved state")
        # a private copy: the loop updates its buffers in place (donation), the caller's tree stays as it was
        params = D.broadcast_tree(torch.utils._pytree.tree_map(lambda t: t.detach().to(device, copy=True), params),
                                  info)
        state = TrainState(params=params, opt=adamw_init(params), step=0)
        state.rng = {}
    config = state.params.config
    context = cfg.context or config.context_length
    if context > config.context_length:
        raise ValueError(f"--context {context} exceeds the model's context_length {config.context_length}; "
                         f"use --context {config.context_length} or less")
    top = int(tokens.max())
    if top >= config.vocab_size:
        raise ValueError(f"training data {cfg.data!r} holds token id {top}, but the model's vocab_size is "
                         f"{config.vocab_size}; train a model with the GPT-2 vocabulary (vocab_size=50257)")
    if cfg.vocab == "corpus" and state.step == 0 and config.trained_vocab is None:
        present = np.zeros(config.vocab_size, dtype=bool)
        for i in range(0, len(tokens), 1 << 24):  # in slices: a large memory-mapped corpus is never copied whole
            present |= np.bincount(tokens[i:i + (1 << 24)], minlength=config.vocab_size)[:config.vocab_size] > 0
        if EOT < config.vocab_size:
            present[EOT] = True  # documents are joined with <|endoftext|>; generation may end with it
        config = config.replace(trained_vocab=tuple(int(i) for i in np.flatnonzero(present)))
        state.params = state.params.replace(config=config)
    train_tok, val_tok = split_tokens(tokens, val_fraction=cfg.val_fraction, context=context,
                                      source=f"training data {cfg.data!r}")

    data_gen = torch.Generator().manual_seed(_data_gen_seed(cfg.seed))
    drop_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + 1 + info.rank)
    if "data" in state.rng:
        data_gen.set_state(state.rng["data"])
    if f"dropout.{info.rank}" in state.rng:
        drop_gen.set_state(state.rng[f"dropout.{info.rank}"])
    hp = cfg.hparams
    reduce = D._grad_reduce(info) if info.active else None
    metrics_path, plot_path = out / METRICS_FILE, out / PLOT_FILE
    save_every = cfg.eval_every if cfg.save_every is None else cfg.save_every

    if main:
        out.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _metrics_lines(metrics_path) if r.get("step", 0) <= state.step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))  # forget steps a crash lost
        print(f"training {count_params(state.params):,} parameters on {len(train_tok):,} tokens "
              f"(+{len(val_tok):,} validation)"
              + (f", softmax over the corpus's {len(config.trained_vocab):,} distinct tokens"
                 if config.trained_vocab is not None else "")
              + f", context {context}, global batch "
              f"{cfg.batch_size * info.world_size}, {info.world_size} process(es), steps {state.step}->{cfg.steps}",
              file=sys.stderr)

    def save(step: int) -> None:
        # every rank's dropout stream is part of the state: gather them to rank 0
        rng = {"data": data_gen.get_state()}
        drop_states = [drop_gen.get_state()]
        if info.active:
            comm = device if info.backend == "nccl" else torch.device("cpu")
            mine = drop_gen.get_state().to(comm)
            gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
            torch.distributed.all_gather(gathered, mine)
            drop_states = [s.cpu() for s in gathered]
        for r, s in enumerate(drop_states):
            rng[f"dropout.{r}"] = s
        if main:
            meta = {"train_config": dataclasses.asdict(cfg), "data": data_id,
                    "global_batch": cfg.batch_size * info.world_size, "world_size": info.world_size}
            save_state(TrainState(state.params, state.opt, step, rng, meta), state_path)
            _export_model(state.params, out)
            _plot(plot_path, _metrics_lines(metrics_path))

    flag = _StopFlag()
    step = state.step
    last_loss: float | None = None
    val_loss: float | None = None
    stopped_by: str | None = None
    window: list[float] = []
    t_start = time.perf_counter()
    t_last, tokens_since = t_start, 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and main) or None, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    with _signals(flag), bar:
        while step < cfg.steps:
            lr = cfg.lr_at(step)
            starts = sample_starts(len(train_tok), batch_size=cfg.batch_size * info.world_size, context=context,
                                   generator=data_gen)
            mine = starts[info.rank * cfg.batch_size:(info.rank + 1) * cfg.batch_size]
            ids, targets = (t.to(device) for t in windows(train_tok, mine, context))
            state.params, state.opt, m = train_step(state.params, state.opt, ids, targets, lr=lr, hp=hp,
                                                    clip_norm=cfg.clip, generator=drop_gen, grad_reduce=reduce,
                                                    donate=True)
            step += 1
            last_loss = float(m.loss)
            if not math.isfinite(last_loss) and main:
                print(f"warning: loss is {last_loss} at step {step}; try a lower --lr", file=sys.stderr)
            window.append(last_loss)
            tokens_since += len(starts) * context
            now = time.perf_counter()
            tok_s = tokens_since / max(now - t_last, 1e-9)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            if main and (step % cfg.log_every == 0 or step == cfg.steps):
                rec = {"step": step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": float(m.grad_norm),
                       "tokens_per_s": tok_s, "elapsed_s": now - t_start}
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                window, t_last, tokens_since = [], now, 0
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                if main and len(val_tok) > context:
                    val_loss = evaluate(state.params, val_tok, context=context, batch_size=cfg.batch_size,
                                        max_windows=cfg.eval_windows, device=device)
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
                    bar.write(f"step {step}: train loss {last_loss:.4f}, validation loss {val_loss:.4f}",
                              file=sys.stderr)
            timed_out = cfg.max_time is not None and now - t_start >= cfg.max_time
            reason = flag.reason or ("max_time" if timed_out else None)
            if reason is None and cfg.stop_after is not None and step >= cfg.stop_after:
                reason = "stop_after"
            if D.any_rank(reason is not None, info, device if info.backend == "nccl" else "cpu"):
                stopped_by = reason or "another rank"
                break
            if save_every and step % save_every == 0 and step < cfg.steps:
                save(step)
    save(step)
    D.barrier(info)
    if main:
        if stopped_by is not None and step < cfg.steps:
            print(f"stopped by {stopped_by} at step {step}/{cfg.steps}; state saved to {state_path}; "
                  "continue with --resume", file=sys.stderr)
        else:
            print(f"done: step {step}, train loss {last_loss if last_loss is None else round(last_loss, 4)}, "
                  f"validation loss {val_loss if val_loss is None else round(val_loss, 4)}; weights in "
                  f"{out / MODEL_FILE}", file=sys.stderr)
    return TrainResult(state.params, step, last_loss, val_loss, stopped_by, out)

"""The training loop: data -> train_step -> logs, validation, plots and checkpoints that lose nothing.

    result = train(params, TrainConfig(data="corpus.txt", out="runs/a", steps=1000))
    result = train(None, TrainConfig(..., steps=2000), resume=True)     # continue from runs/a/state.safetensors

What lands in `out`:
    state.safetensors   the resumable state (params, AdamW moments, step, generator states, configs, data id),
                        written atomically at every save point, at the end and on SIGINT/SIGTERM
    model.safetensors   the weights alone, through `gpt2fn.save` (load with `gpt2fn.load`, then generate)
    metrics.jsonl       one JSON object per line: train {step, loss, lr, grad_norm, tokens_per_s, elapsed_s}
                        every `log_every` steps and validation {step, val_loss, val_ppl} every `eval_every` steps
                        (val_ppl = exp(val_loss), the perplexity); fp16 runs add loss_scale and skipped
    loss.png            the loss curve (train and validation) and the learning rate on a second axis

Every write goes through `gpt2fn.files`: the state, the weights and the plot are replaced atomically; a metrics line
is appended in one write (`files.append_line`), a line a crash cut short is dropped when the log is read, and the
log is rewritten atomically at the start of a run (keeping the steps the resumed state has).

Exact resume: the schedule is a function of the step, windows come from the saved data generator and dropout
from the saved dropout generator, so N steps straight equal N/2 + resume + N/2, bit for bit on CPU, with
any thread count, in separate processes (tests pin it). A step runs its `grad_accum` micro-batches whole, so a
stop or a checkpoint never falls inside an accumulation cycle.
With torchrun every rank draws the same global batch of window starts and keeps its slice; only rank 0
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
from ..checks import check_token_range
from ..files import append_line, atomic_write, atomic_write_text
from ..losses import perplexity
from ..model import loss as lm_loss
from ..params import GPTParams, count_params
from ..tokenizer import EOT
from . import distributed as D
from .data import eval_starts, load_tokens, sample_starts, split_tokens, windows
from .optim import AdamWHParams, adamw_init, warmup_cosine
from .precision import LossScale, compute_dtype, loss_scale_init, loss_scale_update
from .state import STATE_FILE, TrainState, load_state, save_state
from .step import train_step

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "describe_schedule", "MODEL_FILE",
           "METRICS_FILE", "PLOT_FILE"]

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
    """Windows per micro-batch per process (the global batch is batch_size * grad_accum * world_size)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (gradient accumulation, nanoGPT's gradient_accumulation_steps): each step
    draws one global batch of windows, so the data order depends on the global batch, not on how it is split."""
    dtype: str = "fp32"
    """Compute dtype: "fp32", "bf16" or "fp16" (or another name of `gpt2fn.devices.DTYPES`); fp32 master weights
    and AdamW moments either way, fp16 with dynamic loss scaling. Validation runs on the fp32 master weights."""
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
        if not (isinstance(self.grad_accum, int) and self.grad_accum >= 1):
            raise ValueError(f"grad_accum must be an integer >= 1 (micro-batches per optimiser step), got "
                             f"{self.grad_accum!r}; use --grad-accum 1 for no accumulation")
        compute_dtype(self.dtype)
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

    def schedule(self) -> dict[str, Any]:
        """The learning-rate schedule this config follows, as printed at the start of a run."""
        return {"warmup_steps": self.warmup_steps, "peak_lr": self.lr,
                "decay_steps": max(self.steps - self.warmup_steps, 0), "final_lr": self.final_lr, "steps": self.steps}

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

    @property
    def val_perplexity(self) -> float | None:
        """exp(validation loss): the perplexity of the validation text."""
        return None if self.val_loss is None else perplexity(self.val_loss)


def describe_schedule(s: dict[str, Any]) -> str:
    """One line: "warmup 10 steps to 0.0006, cosine over 90 steps to 6e-05 at step 100"."""
    peak = f"{s['peak_lr']:.3g}"
    warm = f"warmup {s['warmup_steps']} steps to {peak}" if s["warmup_steps"] else f"peak {peak}"
    return f"{warm}, cosine over {s['decay_steps']} steps to {s['final_lr']:.3g} at step {s['steps']}"


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
    """The records of `metrics.jsonl`, without a last line a crash cut short (no newline: never finished)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def _plot(path: Path, records: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend choice, no global figure list

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    lines = []
    if tr:
        lines += ax.plot(*zip(*tr, strict=True), label="train")
    if va:
        lines += ax.plot(*zip(*va, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if lrs:  # the schedule on a second axis: a resume onto a different schedule shows as a kink
        ax_lr = ax.twinx()
        lines += ax_lr.plot(*zip(*lrs, strict=True), "--", color="tab:gray", alpha=0.7, label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_ylim(bottom=0)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if lines:
        ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))


def _export_model(params: GPTParams, out: Path) -> Path:
    """`out/model.safetensors` through `gpt2fn.save` (the library's weights format; atomic itself)."""
    return save_weights(params, out / MODEL_FILE)


def _data_gen_seed(seed: int) -> int:
    return seed * 1_000_003 + 17


@dataclass
class _Corpus:
    train: np.ndarray
    val: np.ndarray
    context: int
    data_id: dict[str, Any]


def _restore_or_init(params: GPTParams | None, cfg: TrainConfig, info: D.DistInfo, device: torch.device,
                     data_id: dict[str, Any], *, resume: bool) -> TrainState:
    """The saved state in `cfg.out` (resume), checked against this run's data and batch; else a fresh state
    over a private copy of `params`."""
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = load_state(state_path, device=device)
        saved = state.meta
        if saved.get("data", {}).get("hash") not in (None, data_id["hash"]):
            raise ValueError(f"--data {cfg.data!r} is not the corpus the run in {str(out)!r} was trained on "
                             f"(token hash {data_id['hash']} vs {saved['data']['hash']}); pass the same data")
        if info.is_main:
            _note_resume_changes(saved, cfg, info, state.step)
        return state
    if resume and info.is_main:
        print(f"note: no training state in {str(out)!r} yet; starting from the given weights", file=sys.stderr)
    if state_path.is_file():
        raise ValueError(f"{str(out)!r} already holds a training state ({STATE_FILE}); pass --resume to "
                         "continue it, or choose another --out")
    if params is None:
        raise ValueError("train() needs params unless resuming a saved state")
    # a private copy: the loop updates its buffers in place (donation), the caller's tree stays as it was
    params = D.broadcast_tree(torch.utils._pytree.tree_map(lambda t: t.detach().to(device, copy=True), params), info)
    state = TrainState(params=params, opt=adamw_init(params), step=0)
    state.rng = {}
    return state


def _global_batch(cfg: TrainConfig, info: D.DistInfo) -> int:
    return cfg.batch_size * cfg.grad_accum * info.world_size


def _note_resume_changes(saved: dict[str, Any], cfg: TrainConfig, info: D.DistInfo, step: int) -> None:
    """Say on stderr what a resume changes: the global batch, its split, the compute dtype, the LR schedule."""
    if saved.get("global_batch") not in (None, _global_batch(cfg, info)):
        print(f"note: global batch changed from {saved['global_batch']} to {_global_batch(cfg, info)}; "
              "the run continues, but not identically", file=sys.stderr)
    old = saved.get("train_config") or {}
    for name in ("grad_accum", "dtype"):
        same = (compute_dtype(old[name]) == compute_dtype(cfg.dtype) if name == "dtype" and name in old
                else old.get(name) == getattr(cfg, name))
        if name in old and not same:
            print(f"note: {name} changed from {old[name]!r} to {getattr(cfg, name)!r} on --resume; the run "
                  "continues on the same windows, with different rounding", file=sys.stderr)
    keys = ("steps", "lr", "min_lr", "warmup")
    if not all(k in old for k in keys):
        return
    before = dataclasses.replace(cfg, **{k: old[k] for k in keys})
    if before.schedule() != cfg.schedule():
        what = (f"--steps changed from {old['steps']} to {cfg.steps}" if old["steps"] != cfg.steps
                else "the learning-rate options changed")
        print(f"warning: {what} on --resume, so the learning-rate schedule changed: it was "
              f"{describe_schedule(before.schedule())}, it is now {describe_schedule(cfg.schedule())} "
              f"(lr at step {step}: {before.lr_at(step):.3g} -> {cfg.lr_at(step):.3g})", file=sys.stderr)


def _corpus_and_vocabulary(state: TrainState, cfg: TrainConfig, tokens: np.ndarray,
                           data_id: dict[str, Any]) -> _Corpus:
    """Check the corpus against the model (context, vocabulary), record `--vocab corpus`'s ids in the config
    (`state.params` is replaced), and split off the validation tail."""
    config = state.params.config
    context = cfg.context or config.context_length
    if context > config.context_length:
        raise ValueError(f"--context {context} exceeds the model's context_length {config.context_length}; "
                         f"use --context {config.context_length} or less")
    check_token_range(tokens, config.vocab_size, what=f"training data {cfg.data!r}")
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
    return _Corpus(train_tok, val_tok, context, data_id)


class _Run:
    """One training run's moving parts: the state, the generators, the counters, the files; one method per
    thing a step does (step and log, evaluate, save, stop checks)."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, device: torch.device, state: TrainState,
                 corpus: _Corpus) -> None:
        self.cfg, self.info, self.device, self.state, self.corpus = cfg, info, device, state, corpus
        self.out = Path(cfg.out)
        self.main = info.is_main
        self.metrics_path, self.plot_path = self.out / METRICS_FILE, self.out / PLOT_FILE
        self.save_every = cfg.eval_every if cfg.save_every is None else cfg.save_every
        self.dtype = compute_dtype(cfg.dtype)
        self.reduce = D.grad_reduce(info) if info.active else None
        self.data_gen = torch.Generator().manual_seed(_data_gen_seed(cfg.seed))
        self.drop_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + 1 + info.rank)
        if "data" in state.rng:
            self.data_gen.set_state(state.rng["data"])
        if f"dropout.{info.rank}" in state.rng:
            self.drop_gen.set_state(state.rng[f"dropout.{info.rank}"])
        saved_scale = state.meta.get("loss_scale") if self.dtype == torch.float16 else None
        self.scale: LossScale | None = (None if self.dtype != torch.float16 else
                                        loss_scale_init() if saved_scale is None else
                                        loss_scale_init()._replace(scale=saved_scale[0], good_steps=saved_scale[1]))
        self.step = state.step
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.window: list[float] = []
        self.t_start = time.perf_counter()
        self.t_last, self.tokens_since = self.t_start, 0
        self.now, self.grad_norm, self.skipped = self.t_start, math.nan, False

    def announce(self) -> None:
        """Rank 0: forget metrics a crash lost, and print what will run, including the LR schedule."""
        if not self.main:
            return
        cfg, config, c = self.cfg, self.state.params.config, self.corpus
        self.out.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _metrics_lines(self.metrics_path) if r.get("step", 0) <= self.step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))  # forget steps a crash lost
        accum = f" ({cfg.grad_accum} micro-batches of {cfg.batch_size})" if cfg.grad_accum > 1 else ""
        print(f"training {count_params(self.state.params):,} parameters on {len(c.train):,} tokens "
              f"(+{len(c.val):,} validation)"
              + (f", softmax over the corpus's {len(config.trained_vocab):,} distinct tokens"
                 if config.trained_vocab is not None else "")
              + f", context {c.context}, global batch {_global_batch(cfg, self.info)}{accum}, "
              f"{self.info.world_size} process(es), steps {self.step}->{cfg.steps}"
              + (f", compute {cfg.dtype} (fp32 master weights)" if self.dtype is not None else ""),
              file=sys.stderr)
        print(f"learning rate: {describe_schedule(cfg.schedule())}", file=sys.stderr)

    def train_one_step(self) -> float:
        """Draw the global batch, keep this rank's share, run its micro-batches and the update; returns the lr."""
        cfg, info, state = self.cfg, self.info, self.state
        lr = cfg.lr_at(self.step)
        per_rank = cfg.batch_size * cfg.grad_accum
        starts = sample_starts(len(self.corpus.train), batch_size=per_rank * info.world_size,
                               context=self.corpus.context, generator=self.data_gen)
        mine = starts[info.rank * per_rank:(info.rank + 1) * per_rank]
        ids, targets = (t.to(self.device) for t in windows(self.corpus.train, mine, self.corpus.context))
        state.params, state.opt, m = train_step(
            state.params, state.opt, ids, targets, lr=lr, hp=cfg.hparams, clip_norm=cfg.clip,
            generator=self.drop_gen, grad_reduce=self.reduce, donate=True, micro_batches=cfg.grad_accum,
            dtype=self.dtype, loss_scale=None if self.scale is None else self.scale.scale)
        self.step += 1
        self.skipped = not bool(m.finite)
        if self.scale is not None:
            self.scale = loss_scale_update(self.scale, m.finite)
        self.last_loss, self.grad_norm = float(m.loss), float(m.grad_norm)
        self.tokens_since += len(starts) * self.corpus.context
        return lr

    def log(self, lr: float, bar: tqdm) -> None:
        """The progress bar every step; a metrics line every `log_every` steps and at the last."""
        cfg, loss = self.cfg, self.last_loss
        assert loss is not None
        if not math.isfinite(loss) and self.main:
            print(f"warning: loss is {loss} at step {self.step}; try a lower --lr", file=sys.stderr)
        self.window.append(loss)
        self.now = time.perf_counter()
        tok_s = self.tokens_since / max(self.now - self.t_last, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.update(1)
        if self.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            rec = {"step": self.step, "loss": sum(self.window) / len(self.window), "lr": lr,
                   "grad_norm": None if self.skipped else self.grad_norm,  # None: an fp16 step skipped
                   "tokens_per_s": tok_s, "elapsed_s": self.now - self.t_start}
            if self.scale is not None:
                rec |= {"loss_scale": self.scale.scale, "skipped": self.skipped}
            append_line(self.metrics_path, json.dumps(rec))
            self.window, self.t_last, self.tokens_since = [], self.now, 0

    def evaluate_if_due(self, bar: tqdm) -> None:
        """Validation loss and perplexity every `eval_every` steps and at the last (rank 0)."""
        cfg, c = self.cfg, self.corpus
        if not ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps):
            return
        if self.main and len(c.val) > c.context:
            self.val_loss = evaluate(self.state.params, c.val, context=c.context, batch_size=cfg.batch_size,
                                     max_windows=cfg.eval_windows, device=self.device)
            ppl = perplexity(self.val_loss)
            append_line(self.metrics_path, json.dumps({"step": self.step, "val_loss": self.val_loss, "val_ppl": ppl}))
            bar.write(f"step {self.step}: train loss {self.last_loss:.4f}, validation loss {self.val_loss:.4f} "
                      f"(perplexity {ppl:.2f})", file=sys.stderr)

    def stop_reason(self, flag: _StopFlag) -> str | None:
        """Why to stop now (a signal, max_time, stop_after), agreed across ranks; None: go on."""
        cfg = self.cfg
        timed_out = cfg.max_time is not None and self.now - self.t_start >= cfg.max_time
        reason = flag.reason or ("max_time" if timed_out else None)
        if reason is None and cfg.stop_after is not None and self.step >= cfg.stop_after:
            reason = "stop_after"
        comm = self.device if self.info.backend == "nccl" else "cpu"
        if D.any_rank(reason is not None, self.info, comm):
            return reason or "another rank"
        return None

    def save_if_due(self) -> None:
        if self.save_every and self.step % self.save_every == 0 and self.step < self.cfg.steps:
            self.save()

    def save(self) -> None:
        """The state (every rank's dropout stream gathered to rank 0), the weights and the plot, atomically."""
        info, device = self.info, self.device
        rng = {"data": self.data_gen.get_state()}
        drop_states = [self.drop_gen.get_state()]
        if info.active:
            comm = device if info.backend == "nccl" else torch.device("cpu")
            mine = self.drop_gen.get_state().to(comm)
            gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
            torch.distributed.all_gather(gathered, mine)
            drop_states = [s.cpu() for s in gathered]
        for r, s in enumerate(drop_states):
            rng[f"dropout.{r}"] = s
        if self.main:
            meta = {"train_config": dataclasses.asdict(self.cfg), "data": self.corpus.data_id,
                    "global_batch": _global_batch(self.cfg, info), "world_size": info.world_size}
            if self.scale is not None:
                meta["loss_scale"] = [self.scale.scale, self.scale.good_steps]
            self.out.mkdir(parents=True, exist_ok=True)
            save_state(TrainState(self.state.params, self.state.opt, self.step, rng, meta), self.out / STATE_FILE)
            _export_model(self.state.params, self.out)
            _plot(self.plot_path, _metrics_lines(self.metrics_path))

    def report(self, stopped_by: str | None) -> None:
        if not self.main:
            return
        if stopped_by is not None and self.step < self.cfg.steps:
            print(f"stopped by {stopped_by} at step {self.step}/{self.cfg.steps}; state saved to "
                  f"{self.out / STATE_FILE}; continue with --resume", file=sys.stderr)
            return
        val = (None if self.val_loss is None else
               f"{round(self.val_loss, 4)} (perplexity {perplexity(self.val_loss):.2f})")
        last = self.last_loss if self.last_loss is None else round(self.last_loss, 4)
        print(f"done: step {self.step}, train loss {last}, validation loss {val}; weights in "
              f"{self.out / MODEL_FILE}", file=sys.stderr)


def train(params: GPTParams | None, cfg: TrainConfig, *, resume: bool = False,
          dist_info: D.DistInfo | None = None) -> TrainResult:
    """Train `params` (or the state in `cfg.out` when `resume`) for `cfg.steps` steps; see the module docstring.

    Returns when the steps are done, `max_time` has passed or a SIGINT/SIGTERM arrived; in every case the last
    state has been saved first."""
    device = torch.device(cfg.device)
    info = dist_info if dist_info is not None else D.setup(device)
    tokens = load_tokens(cfg.data, cache_dir=cfg.cache_dir)
    data_id = {"tokens": len(tokens), "hash": Path(tokens.filename).stem}
    state = _restore_or_init(params, cfg, info, device, data_id, resume=resume)
    corpus = _corpus_and_vocabulary(state, cfg, tokens, data_id)
    run = _Run(cfg, info, device, state, corpus)
    run.announce()

    flag, stopped_by = _StopFlag(), None
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (cfg.progress and run.main) or None, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    with _signals(flag), bar:
        while run.step < cfg.steps:
            lr = run.train_one_step()
            run.log(lr, bar)
            run.evaluate_if_due(bar)
            stopped_by = run.stop_reason(flag)
            if stopped_by is not None:
                break
            run.save_if_due()
    run.save()
    D.barrier(info)
    run.report(stopped_by)
    return TrainResult(state.params, run.step, run.last_loss, run.val_loss, stopped_by, Path(cfg.out))

"""Benchmarks: gpt2fn next to its peers, in one process, interleaved, against the machine's physical limits.

    .venv/bin/python scripts/bench.py                         # the full run (about 10 minutes on 2 cores)
    .venv/bin/python scripts/bench.py --quick                 # fewer repeats and tokens: a fast look
    .venv/bin/python scripts/bench.py --only decode,prefill --out bench.json
    .venv/bin/python scripts/bench.py --only speculative --spec-trained runs/spec-pair   # trains the pair first

Workloads (`--only`, comma separated): `limits` (memory bandwidth, GEMM throughput), `decode` (greedy, 16-token
prompt + 128 new; batch 1 and 8; fp32 and bf16; new tokens/s and time to first token; on the CPU also CTranslate2
fp32/int8 and llama.cpp F32/F16 where their environments exist), `prefill` (one forward
over 1024 tokens, last-position and all logits), `checks` (shape checks on vs off), `train` (one optimizer step
of the small config), `load` (seconds and peak resident memory of a 124M checkpoint, a child process each),
`speculative` (batch 1: the target alone against `draft=` its own first layers, and prompt lookup on a repetitive
prompt, each beside transformers' `assistant_model=` / `prompt_lookup_num_tokens=`, with acceptance rates; with
`--spec-trained DIR` also a 6-layer target and a 2-layer draft trained on the demo's text, on held-out text),
`score` (`gpt2fn.score` over a batch of 8 texts of different lengths against a left-padded `transformers`
forward computing the same per-token losses), `patching` (activation patching of resid_pre), `attribution`
(attribution patching of every head against exact head patching), `sae` (an SAE spliced in against the unedited
forward).
The roofline (bandwidth / bytes read per decoded token) is derived when `limits` and `decode` both run.

CTranslate2 and llama.cpp run in environments of their own (`scripts/setup_peers.sh` makes them under
`GPT2FN_PEERS_DIR`, default `.peers/`; or name their Pythons with GPT2FN_CT2_PYTHON / GPT2FN_LLAMACPP_PYTHON), each
format in a child process (scripts/peer_worker.py) that converts the saved random `GPT2LMHeadModel` and then
decodes on request, interleaved with the in-process contenders; its time is its own clock around the engine's
call. Each joins the decode cases of gpt2fn's formats it is set against (CTranslate2 fp32 and llama.cpp F32: fp32;
llama.cpp F16: bf16 and fp16; CTranslate2 int8: int8) and the `formats` accuracy rows. They need GPT-2's
vocabulary: `--preset tiny --vocab-size 50257` for a fast look. Absent ones are skipped with a note.

Method: random weights (speed does not depend on the values; the `--spec-trained` pair is trained, since a
speculative speed-up depends on how often the draft agrees with the target); every contender of a case holds the
same weights (greedy ids are compared as a sanity check); contenders run interleaved, in alternating order, after
a warm-up; medians with min-max over the repeats; ratios are gpt2fn's median over the peer's.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as peers  # noqa: E402

import gpt2fn  # noqa: E402
from gpt2fn import GPTParams  # noqa: E402

WORKLOADS = ("limits", "products", "default", "decode", "formats", "beam", "speculative", "prefill", "checks",
             "train", "load", "score", "patching", "attribution", "sae", "memory")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
"""Decode formats: a floating dtype of every weight, or int8 (`gpt2fn.quantize`: int8 matrices, fp32 scales)."""
GPT2FN, HF, SEED = "gpt2fn", "transformers", "seed loop (no cache)"
COMPILED = "gpt2fn compile=True"
CACHE16 = "gpt2fn 16-bit cache"  # 16-bit weights with cache_dtype= their dtype (what llama.cpp F16 runs by default)


# ---------------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Result:
    """One contender's measurement of one case: samples and their median / min / max."""

    workload: str
    case: str
    contender: str
    metric: str
    samples: list[float]
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=min(self.samples), max=max(self.samples))
        return d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved(contenders: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device,
                warmup: dict[str, Callable[[], Any]] | None = None, at_most: dict[str, int] | None = None,
                clocks: dict[str, Callable[[], float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender: warm-ups first, then `repeats` rounds, the order alternating per round
    so that drift (thermal, other load) falls on everyone alike. The garbage collector is off while timing (as in
    `timeit`): a collection of this process's large heap would land on whichever contender happened to run.
    `at_most` caps the rounds of slow contenders (they then run in the first rounds only). A contender in another
    process reports its own seconds of the last call through `clocks` (its clock, without the pipe)."""
    for fn in (warmup or contenders).values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                if at_most is not None and len(times[name]) >= at_most.get(name, repeats):
                    continue
                sync(device)
                t0 = time.perf_counter()
                contenders[name]()
                sync(device)
                elapsed = time.perf_counter() - t0
                times[name].append(clocks[name]() if clocks is not None and name in clocks else elapsed)
    finally:
        if enabled:
            gc.enable()
    return times


# ---------------------------------------------------------------------------------------------------------------
# The machine's limits


def bench_limits(device: torch.device, *, mbytes: int = 1024, gemm_n: int = 2048, repeats: int = 5
                 ) -> list[Result]:
    """Memory bandwidth (a streaming sum reads, a copy reads and writes) and GEMM throughput per dtype."""
    n = mbytes * 2**20 // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    t = interleaved({"sum": x.sum, "copy": lambda: y.copy_(x)}, repeats=repeats, device=device)
    out = [Result("limits", "memory bandwidth", "read (sum)", "GB/s", [x.nbytes / s / 1e9 for s in t["sum"]],
                  extra={"bytes": x.nbytes}),
           Result("limits", "memory bandwidth", "copy (read+write)", "GB/s",
                  [2 * x.nbytes / s / 1e9 for s in t["copy"]], extra={"bytes": x.nbytes})]
    fp32_rate = gemm_rate(torch.float32, device)
    for name, dtype in DTYPES.items():
        n = gemm_n
        if dtype != torch.float32 and gemm_rate(dtype, device) < 0.25 * fp32_rate:
            n = min(n, 256)  # no fast kernel for this dtype (emulated): a 2048^3 product would take minutes
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = interleaved({"mm": lambda a=a, b=b: a @ b}, repeats=repeats, device=device)["mm"]
        out.append(Result("limits", f"GEMM {name}", f"{n}^3", "GFLOP/s", [2 * n**3 / s / 1e9 for s in t]))
    return out


def gemm_rate(dtype: torch.dtype, device: torch.device, n: int = 256) -> float:
    """GFLOP/s of one n^3 matrix product (best of 3): a quick probe of whether a dtype has fast kernels."""
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products run at least at half the fp32 rate (CPUs without AVX512-BF16/AMX emulate
    bf16 at a small fraction of it, so a bf16 decode there would take minutes and say nothing about gpt2fn)."""
    return gemm_rate(torch.bfloat16, device) >= 0.5 * gemm_rate(torch.float32, device)


# ---------------------------------------------------------------------------------------------------------------
# Few-row products (issue 13): what one decode step multiplies, by layout


def bench_products(config: gpt2fn.GPTConfig, *, rows: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                   repeats: int = 5) -> list[Result]:
    """GPT-2's per-step products (every block matrix with its bias, then the tied head `x @ tok_emb.T`), distinct
    random weights so nothing stays in cache, `rows` rows, fp32 on the CPU, each read in place: gpt2fn's native
    kernel (`gpt2fn.kernels.affine`/`affine_t`) against torch's `x @ W + b` (MKL). Reported as ms per step and the
    GB/s of weights read."""
    from gpt2fn.kernels import native_affine, native_affine_t  # the kernel itself, without the policy

    d, m, v = config.emb_dim, config.d_mlp, config.vocab_size
    shapes = [(d, 3 * d), (d, d), (d, m), (m, d)] * config.n_layers
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(i, o, generator=g) * 0.02 for i, o in shapes]
    bs = [torch.randn(o, generator=g) for i, o in shapes]
    head = torch.randn(v, d, generator=g) * 0.02  # the tied head: the token embedding [vocab, d_model]
    weight_bytes = (sum(i * o for i, o in shapes) + v * d) * 4
    results = []
    for n in rows:
        xs = [torch.randn(n, i, generator=g) for i, o in shapes]
        xh = torch.randn(n, d, generator=g)

        def native(xs: list[torch.Tensor] = xs, xh: torch.Tensor = xh) -> None:
            for x, w, b in zip(xs, ws, bs, strict=True):
                native_affine(x, w, b)
            native_affine_t(xh, head)

        def plain(xs: list[torch.Tensor] = xs, xh: torch.Tensor = xh) -> None:
            for x, w, b in zip(xs, ws, bs, strict=True):
                torch.addmm(b, x, w)
            xh @ head.T

        contenders = {"native (in place)": native} if gpt2fn.native.available() else {}
        contenders["x @ W + b (torch)"] = plain
        with torch.inference_mode():
            t = interleaved(contenders, repeats=repeats, device=torch.device("cpu"))
        for name, secs in t.items():
            results.append(Result("products", f"fp32 {n} rows", name, "ms", [1e3 * s for s in secs],
                                  higher_is_better=False,
                                  extra={"rows": n, "GB/s": weight_bytes / statistics.median(secs) / 1e9,
                                         "GFLOP/s": 2 * n * weight_bytes / 4 / statistics.median(secs) / 1e9}))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def gpt2fn_decoder(params: GPTParams) -> tuple[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """gpt2fn's greedy decoding: `gpt2fn.generate_tokens` when present, else a loop over `forward` + KV cache."""
    generate_tokens = getattr(gpt2fn, "generate_tokens", None)
    if generate_tokens is not None:  # the default call on the params as loaded: nothing derived is kept
        return GPT2FN, lambda ids, new: generate_tokens(params, ids, max_new_tokens=new, eos=False)

    def loop(ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.inference_mode():
            cache = gpt2fn.init_cache(params.config, ids.shape[0], ids.shape[1] + new, device=ids.device,
                                      dtype=params.dtype)
            logits, cache = gpt2fn.forward(params, ids, cache=cache, last_only=True)
            out = [ids]
            for _ in range(new - 1):
                out.append(logits[:, -1].argmax(-1, keepdim=True))
                logits, cache = gpt2fn.forward(params, out[-1], cache=cache, last_only=True)
            out.append(logits[:, -1].argmax(-1, keepdim=True))
            return torch.cat(out, dim=1)

    return GPT2FN + " (forward+cache loop)", loop


def hf_decoder(model: Any) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def run(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, use_cache=True)
    return run


def seed_decoder(model: torch.nn.Module, ctx: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    return lambda ids, new: peers.seed_greedy(model, ids, new, ctx)


def bench_decode(params: GPTParams, *, batch: int, prompt_len: int = 16, new_tokens: int = 128,
                 repeats: int = 3, ttft_repeats: int = 5, with_seed: bool = False, with_hf: bool = True,
                 with_compiled: bool = False, engines: dict[str, peers.EngineWorker] | None = None
                 ) -> list[Result]:
    """Greedy decoding of `new_tokens` after a `prompt_len` prompt: new tokens/s (all rows of the batch, prefill
    included) and time to first token, each contender on the same weights and prompt. `engines` (started by
    `bench_peers.start_engines` on the same weights) join under their labels; each result's `first_mismatch` is
    the first (row, step) where its ids leave gpt2fn's, or None."""
    device, dtype = params.device, params.dtype
    case = f"{_dtype_name(dtype)} b{batch}"
    with_hf = with_hf and dtype != torch.int8  # transformers has no int8 weight-only CPU path of its own
    # nor a fast fp16 one: its fp16 CPU products ran 10x below its bf16 (fp16 b8: 9 minutes for one case on the
    # AMD EPYC); the fp16 targets are llama.cpp F16's, so the fp16 cases leave transformers out on CPU
    with_hf = with_hf and not (dtype == torch.float16 and device.type == "cpu")
    ids = torch.randint(0, params.config.n_tokens, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    name, gen = gpt2fn_decoder(params)
    decoders = {name: gen}
    if with_hf:
        decoders[HF] = hf_decoder(peers.hf_from_params(params))
    if with_seed:
        decoders[SEED] = seed_decoder(peers.seed_from_params(params), params.config.context_length)
    if with_compiled:  # the same steps through torch.compile (one graph per batch and capacity)
        decoders[COMPILED] = lambda ids, new: gpt2fn.generate_tokens(params, ids, max_new_tokens=new, eos=False,
                                                                     compile=True)
    if dtype in (torch.bfloat16, torch.float16):  # the same weights, keys and values stored in their dtype too
        decoders[CACHE16] = lambda ids, new: gpt2fn.generate_tokens(params, ids, max_new_tokens=new, eos=False,
                                                                    cache_dtype=dtype)
    clocks = {}
    for label, worker in (engines or {}).items():
        decoders[label] = worker.generate
        clocks[label] = lambda w=worker: w.last_seconds

    outputs: dict[tuple[str, int], torch.Tensor] = {}

    def runner(n: str, new: int) -> Callable[[], Any]:
        def run() -> None:
            outputs[(n, new)] = decoders[n](ids, new)
        return run

    warm = {n: runner(n, min(4, new_tokens)) for n in decoders}
    if COMPILED in warm:  # compile the graph of the measured capacity before timing
        warm[COMPILED] = runner(COMPILED, new_tokens)
    # the seed's loop is an order of magnitude slower and its spread matters little: two rounds at most
    full = interleaved({n: runner(n, new_tokens) for n in decoders}, repeats=repeats, device=device, warmup=warm,
                       at_most={SEED: 2}, clocks=clocks)
    first = interleaved({n: runner(n, 1) for n in decoders}, repeats=ttft_repeats, device=device, warmup=warm,
                        clocks=clocks)
    ref = outputs[(name, new_tokens)][:, prompt_len:]
    results = []
    for n in decoders:
        got = outputs[(n, new_tokens)][:, prompt_len:]
        agree = float((got == ref).float().mean()) if got.shape == ref.shape else 0.0
        extra = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": _dtype_name(dtype),
                 "weight_bytes": weight_bytes(params), "compute_itemsize": params.compute_dtype.itemsize,
                 "kv_itemsize": dtype.itemsize if n == CACHE16 else params.compute_dtype.itemsize,
                 "ids_agree_with_gpt2fn": agree, "first_mismatch": first_mismatch(got, ref),
                 "ms_per_step": [1e3 * (t - statistics.median(first[n])) / max(1, new_tokens - 1)
                                 for t in full[n]]}
        results.append(Result("decode", case, n, "tok/s", [batch * new_tokens / t for t in full[n]], extra=extra))
        results.append(Result("ttft", case, n, "ms", [1e3 * t for t in first[n]], higher_is_better=False,
                              extra={"batch": batch, "prompt_len": prompt_len}))
    return results


def first_mismatch(got: torch.Tensor, ref: torch.Tensor) -> dict[str, int] | None:
    """The first step (then row) where `got`'s new ids leave `ref`'s, or None when they agree. Random weights give
    flat logits, so two correct fp32 implementations may split at a near-tie and differ from there on."""
    if got.shape != ref.shape:
        return {"row": -1, "step": -1, "gpt2fn": -1, "peer": -1}
    diff = (got.cpu() != ref.cpu()).nonzero()
    if len(diff) == 0:
        return None
    row, step = min(diff.tolist(), key=lambda rs: (rs[1], rs[0]))
    return {"row": row, "step": step, "gpt2fn": int(ref[row, step]), "peer": int(got[row, step])}


def format_params(params: GPTParams, name: str) -> GPTParams:
    """The tree of a decode format (`DTYPES`): int8 through `gpt2fn.quantize`, a floating dtype through `tree_to`."""
    if name == "int8":
        return gpt2fn.quantize(params)
    return params if DTYPES[name] == params.dtype else gpt2fn.tree_to(params, dtype=DTYPES[name])


def bench_formats(params: GPTParams, *, batch: int = 2, seq: int = 64,
                  engines: dict[str, peers.EngineWorker] | None = None) -> list[Result]:
    """The accuracy of each stored format: max and mean absolute logit error against the fp32 model on the same
    weights (one forward of `batch` x `seq` random ids), with the logits' standard deviation for scale. 2 x 64 =
    128 rows, `kernels.NATIVE_MAX_ROWS`: the products decoding runs (the native kernel, int8 as integer sums where
    the CPU has them), not torch's GEMM of a longer prefill.

    Case `fp32` holds the fp32 implementations that are not the reference (transformers, CTranslate2 fp32,
    llama.cpp F32); each 8- and 16-bit engine joins the case of gpt2fn's format it is set against (`EnginePeer`'s
    `error_case`: llama.cpp F16 -> fp16, CTranslate2 int8 -> int8)."""
    seq = min(seq, params.config.context_length)
    ids = torch.randint(0, params.config.n_tokens, (batch, seq), generator=torch.Generator().manual_seed(7))
    ids = ids.to(params.device)
    with torch.inference_mode():
        ref = gpt2fn.forward(params, ids).float()
        out = []
        for name in ("bf16", "fp16", "int8"):
            err = (gpt2fn.forward(format_params(params, name), ids).float() - ref).abs()
            out.append(Result("formats", name, GPT2FN, "max abs logit error", [float(err.max())],
                              higher_is_better=False,
                              extra={"mean_abs_error": float(err.mean()), "logit_std": float(ref.std()),
                                     "batch": batch, "seq": seq}))
        others = {HF: peers.hf_from_params(gpt2fn.tree_to(params, dtype=torch.float32))(ids).logits}
    by_label = {e.label: e for e in peers.ENGINE_PEERS}
    others.update({label: w.logits(ids.cpu()) for label, w in (engines or {}).items()})
    for label, logits in others.items():
        err = (logits.float().to(ref.device)[..., :ref.shape[-1]] - ref).abs()
        case = by_label[label].error_case if label in by_label else "fp32"
        out.append(Result("formats", case, label, "max abs logit error", [float(err.max())], higher_is_better=False,
                          extra={"mean_abs_error": float(err.mean()), "logit_std": float(ref.std()),
                                 "batch": batch, "seq": seq}))
    order = ("fp32", "bf16", "fp16", "int8")
    return sorted(out, key=lambda r: order.index(r.case))  # stable: gpt2fn first within each format


def bench_default(params: GPTParams, *, prompt: str = "Hello, it is time", repeats: int = 5) -> list[Result]:
    """The default call, as a user makes it on the params `load` returns: `gpt2fn.generate(params, prompt)` (text to
    text: tokenizing, prefill, 20 new greedy tokens, detokenizing) and `generate_tokens(params, ids)`, against
    `transformers`' `GPT2LMHeadModel.generate(ids)` at its defaults (20 new tokens here, greedy, KV cache). ms per
    call, everything included."""
    ids = torch.tensor([gpt2fn.tokenizer.encode(prompt)], device=params.device)
    hf = peers.hf_from_params(params)
    outputs: dict[str, Any] = {}

    def text() -> None:
        outputs["text"] = gpt2fn.generate(params, prompt)

    def tokens() -> None:
        outputs["tokens"] = gpt2fn.generate_tokens(params, ids)

    def theirs() -> None:
        with torch.inference_mode():
            outputs[HF] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)

    names = {"gpt2fn.generate(params, prompt)": text, "gpt2fn.generate_tokens(params, ids)": tokens, HF: theirs}
    times = interleaved(names, repeats=repeats, device=params.device)
    agree = float(torch.equal(outputs["tokens"], outputs[HF][:, :outputs["tokens"].shape[1]]))
    return [Result("default", "fp32 20 new tokens", n, "ms", [1e3 * t for t in times[n]], higher_is_better=False,
                   extra={"prompt": prompt, "ids_agree_with_transformers": agree}) for n in names]


def bench_beam(params: GPTParams, *, num_beams: int = 4, prompt_len: int = 16, new_tokens: int = 64,
               repeats: int = 3) -> list[Result]:
    """Beam search (`num_beams` beams, no EOS, length penalty 1) of `new_tokens` after a `prompt_len` prompt, batch
    1: new tokens/s of the returned hypothesis, gpt2fn's `beam_search` against transformers' `generate(num_beams=)`,
    interleaved; `ids_agree_with_gpt2fn` is 1.0 when the two return the same sequence."""
    from gpt2fn.beam import beam_search

    device = params.device
    case = f"{_dtype_name(params.dtype)} k{num_beams} {prompt_len}+{new_tokens}"
    ids = torch.randint(0, params.config.n_tokens, (1, prompt_len), generator=torch.Generator().manual_seed(4)
                        ).to(device)
    hf = peers.hf_from_params(params)
    outputs: dict[str, torch.Tensor] = {}

    def ours(new: int = new_tokens) -> None:
        with torch.inference_mode():
            outputs[GPT2FN] = beam_search(params, ids, num_beams=num_beams, max_new_tokens=new)

    def theirs(new: int = new_tokens) -> None:
        with torch.inference_mode():
            outputs[HF] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      num_beams=num_beams, do_sample=False, use_cache=True)

    times = interleaved({GPT2FN: ours, HF: theirs}, repeats=repeats, device=device,
                        warmup={GPT2FN: lambda: ours(4), HF: lambda: theirs(4)})
    ref = outputs[GPT2FN]
    results = []
    for n in (GPT2FN, HF):
        got = outputs[n]
        extra = {"num_beams": num_beams, "prompt_len": prompt_len, "new_tokens": new_tokens,
                 "ids_agree_with_gpt2fn": float(got.shape == ref.shape and torch.equal(got, ref))}
        results.append(Result("beam", case, n, "tok/s", [new_tokens / t for t in times[n]], extra=extra))
    return results


def first_layers(params: GPTParams, n_layers: int) -> GPTParams:
    """A draft made of the target's first `n_layers` blocks (its embeddings, final norm and head): the same
    vocabulary, no training needed (an early exit of the target, as in self-speculative decoding)."""
    return params.replace(config=params.config.replace(n_layers=n_layers), blocks=params.blocks[:n_layers])


def hf_trained_vocab(config: gpt2fn.GPTConfig, device: torch.device) -> dict[str, Any]:
    """`generate` keywords that keep transformers to a `--vocab corpus` model's trained ids, as gpt2fn's generation
    does (`config.trained_vocab`); none for a full-vocabulary model. A precomputed mask, as gpt2fn's: transformers'
    own `suppress_tokens` (what `gpt2fn.save_hf` writes) runs `isin` over the ~47k other ids at every step, a cost
    gpt2fn does not pay."""
    if config.trained_vocab is None:
        return {}
    from transformers import LogitsProcessor, LogitsProcessorList

    outside = torch.ones(config.vocab_size, dtype=torch.bool, device=device)
    outside[torch.tensor(config.trained_vocab, device=device)] = False

    class TrainedVocab(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(outside[:scores.shape[-1]], float("-inf"))

    return {"logits_processor": LogitsProcessorList([TrainedVocab()])}


def bench_speculative(params: GPTParams, *, draft: GPTParams | None = None, draft_layers: int | None = None,
                      prompt: torch.Tensor | None = None, lookup_prompt: torch.Tensor | None = None,
                      draft_tokens: int = 4, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 3,
                      label: str = "", extra: dict[str, Any] | None = None) -> list[Result]:
    """Speculative decoding, batch 1, greedy, `new_tokens` after a prompt: new tokens/s of the target alone
    against `draft=` a draft model on `prompt`, and against `draft="prompt_lookup"` on `lookup_prompt`; beside them
    transformers' assisted generation (`assistant_model=`, constant `num_assistant_tokens`) and prompt lookup
    (`prompt_lookup_num_tokens=`) on the same weights. `acceptance_rate` is gpt2fn's accepted / proposed drafts
    (greedy: transformers proposes and keeps the same tokens on the same pair).

    By default (random weights) the draft is the target's first `draft_layers` blocks (default a quarter), the
    prompt `prompt_len` random ids and the lookup prompt a random phrase said over and over: random weights make a
    poor draft, the rate, not the code, decides the speed-up. `bench_speculative_trained` passes a trained pair and
    prompts of their corpus instead (`[1, len]` ids each); `label` starts its case names and `extra` joins every
    result's extras (the pair's configs and training)."""
    from gpt2fn.sampling import SamplingOptions
    from gpt2fn.speculative import PromptLookup, speculative_steps

    device, cfg = params.device, params.config
    if draft is None:
        draft = first_layers(params, draft_layers or max(1, cfg.n_layers // 4))
    g = torch.Generator().manual_seed(7)
    if prompt is None:
        prompt = torch.randint(0, cfg.n_tokens, (1, prompt_len), generator=g)
    if lookup_prompt is None:
        phrase = torch.randint(0, cfg.n_tokens, (max(2, prompt_len // 4),), generator=g)
        lookup_prompt = phrase.repeat(prompt_len // phrase.numel() + 1)[:prompt_len][None]
    prompt, lookup_prompt = prompt.to(device), lookup_prompt.to(device)
    hf = peers.hf_from_params(params)
    hf_draft = peers.hf_from_params(draft)
    hf_draft.generation_config.num_assistant_tokens = draft_tokens
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_kw = dict(do_sample=False, use_cache=True, **hf_trained_vocab(cfg, device))

    def acceptance(proposer: Any, ids: torch.Tensor) -> float:
        stats: dict[str, int] = {}
        with torch.inference_mode():
            for _ in speculative_steps(params, proposer, ids, None, None, options=SamplingOptions(), eos_id=None,
                                       max_new_tokens=new_tokens, draft_tokens=draft_tokens, stats=stats):
                pass
        return stats["accepted"] / max(1, stats["proposed"])

    results = []
    layers = f"{draft.config.n_layers}/{cfg.n_layers} layers"
    for case_label, ids, proposer, hf_extra in (
            (f"draft {layers} k{draft_tokens}", prompt, draft, dict(assistant_model=hf_draft)),
            (f"prompt lookup k{draft_tokens}", lookup_prompt, PromptLookup(),
             dict(prompt_lookup_num_tokens=draft_tokens, max_matching_ngram_size=3))):
        case = f"{_dtype_name(params.dtype)} b1 {label}{case_label}"
        spec_name = f"{GPT2FN} draft={'prompt_lookup' if isinstance(proposer, PromptLookup) else 'model'}"
        hf_spec = f"{HF} {'assistant_model=' if 'assistant_model' in hf_extra else 'prompt_lookup_num_tokens='}"
        calls: dict[str, Callable[[int], torch.Tensor]] = {
            spec_name: lambda new, ids=ids, proposer=proposer: gpt2fn.generate_tokens(
                params, ids, max_new_tokens=new, eos=False, draft=proposer, draft_tokens=draft_tokens),
            f"{GPT2FN} alone": lambda new, ids=ids: gpt2fn.generate_tokens(params, ids, max_new_tokens=new,
                                                                             eos=False),
            hf_spec: lambda new, ids=ids, more=hf_extra: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **hf_kw, **more),
            f"{HF} alone": lambda new, ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                                            max_new_tokens=new, min_new_tokens=new, **hf_kw),
        }
        outputs: dict[str, torch.Tensor] = {}

        def runner(n: str, new: int, calls: dict[str, Callable[[int], torch.Tensor]] = calls,
                   outputs: dict[str, torch.Tensor] = outputs) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    outputs[n] = calls[n](new)
            return run

        times = interleaved({n: runner(n, new_tokens) for n in calls}, repeats=repeats, device=device,
                            warmup={n: runner(n, min(4, new_tokens)) for n in calls})
        rate = acceptance(proposer, ids)
        width = ids.shape[1]
        ref = outputs[f"{GPT2FN} alone"][:, width:]
        for n in calls:
            got = outputs[n][:, width:]
            more = {"prompt_len": width, "new_tokens": new_tokens, "draft_tokens": draft_tokens,
                    "draft_layers": draft.config.n_layers if "prompt" not in case_label else 0,
                    "acceptance_rate": rate,
                    "ids_agree_with_gpt2fn": float(got.shape == ref.shape and torch.equal(got, ref))}
            results.append(Result("speculative", case, n, "tok/s", [new_tokens / t for t in times[n]],
                                  extra=more | (extra or {})))
    return results


@dataclass(frozen=True)
class Recipe:
    """How one model of the trained speculative pair learns, from scratch, with `gpt2fn.train.train` on the demo's
    corpus (`gpt2fn.train.pydoc_prose`) and its recipe (windows of 128, no weight decay, softmax over the
    corpus's own ids: `vocab="corpus"`, so both models share `config.trained_vocab`)."""

    config: gpt2fn.GPTConfig
    seconds: float
    """The time budget: training stops and saves once it has passed (`TrainConfig.max_time`)."""
    steps: int
    """The cosine schedule's length, sized to the budget on a 2-core CPU; a slower machine stops earlier."""
    lr: float
    batch_size: int = 4

    def train_config(self, data: Path, out: Path, *, device: torch.device, cache_dir: Path) -> Any:
        from gpt2fn.train import TrainConfig

        return TrainConfig(data=str(data), out=str(out), steps=self.steps, batch_size=self.batch_size,
                           context=self.config.context_length, lr=self.lr, min_lr=self.lr / 20,
                           warmup=min(30, self.steps // 10), weight_decay=0.0, eval_every=0, save_every=0,
                           log_every=10, val_fraction=SPEC_VAL_FRACTION, seed=0, device=str(device),
                           max_time=self.seconds, vocab="corpus", cache_dir=str(cache_dir), progress=False)


SPEC_VAL_FRACTION = 0.05
"""The corpus's tail that neither model trains on: the prompts come from it."""
SPEC_PAIR = {  # a 6-layer target of width 384 and a 2-layer draft of width 128 (the MLP is 4x the width in both)
    "target": Recipe(gpt2fn.preset("small", context_length=128), seconds=180.0, steps=300, lr=1.5e-3),
    "draft": Recipe(gpt2fn.preset("mini", n_layers=2, context_length=128), seconds=60.0, steps=1000, lr=4e-3),
}
"""The default trained pair (`--spec-trained`); `--spec-train-seconds` changes the budgets."""
TRAINING_FILE = "training.json"


def _model_summary(params: GPTParams) -> dict[str, Any]:
    config = params.config.to_dict()
    trained = config.pop("trained_vocab")
    return {"config": config, "trained_ids": None if trained is None else len(trained),
            "parameters": gpt2fn.count_params(params)}


def trained_pair(directory: Path, *, device: torch.device, recipes: dict[str, Recipe] | None = None
                 ) -> dict[str, tuple[GPTParams, dict[str, Any]]]:
    """`{"target": (params, training), "draft": (params, training)}` from `directory`, training each one that is
    not there yet (its `Recipe`). Layout: `corpus/pydoc_topics.txt` (the text), `tokens/` (its token cache),
    and `target/`, `draft/`: each a `gpt2fn train` run folder (`model.safetensors` through `gpt2fn.save`,
    metrics, loss plot; not the training state, which only a resumed run would read) with `training.json`
    (config, seconds, steps, final training and validation loss). A model trains in `.NAME.partial/`, renamed to
    `NAME/` once complete, so an interrupted run leaves no half model to reuse. A saved model is reused whatever
    budget trained it (its `training.json` says); one whose config is not the recipe's is refused (SystemExit
    naming the fix)."""
    from gpt2fn.files import atomic_write_text
    from gpt2fn.train import pydoc_prose, train
    from gpt2fn.train.loop import MODEL_FILE
    from gpt2fn.train.state import STATE_FILE

    recipes = SPEC_PAIR if recipes is None else recipes
    corpus = directory / "corpus" / "pydoc_topics.txt"
    if not corpus.is_file():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(corpus, pydoc_prose())
    pair = {}
    for name, recipe in recipes.items():
        run = directory / name
        if not run.exists():
            partial = directory / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            with _stage(f"speculative pair: train the {name} for up to {recipe.seconds:g} s"):
                t0 = time.perf_counter()
                result = train(gpt2fn.init_params(recipe.config, seed=0),
                               recipe.train_config(corpus, partial, device=device, cache_dir=directory / "tokens"))
                seconds = time.perf_counter() - t0
            record = {**_model_summary(result.params), "budget_seconds": recipe.seconds, "train_seconds": seconds,
                      "steps": result.step, "schedule_steps": recipe.steps, "lr": recipe.lr,
                      "batch_size": recipe.batch_size, "train_loss": result.train_loss, "val_loss": result.val_loss,
                      "stopped_by": result.stopped_by}
            atomic_write_text(partial / TRAINING_FILE, json.dumps(record, indent=1))
            (partial / STATE_FILE).unlink(missing_ok=True)  # weights and AdamW moments to resume: never resumed
            os.replace(partial, run)
        if not (run / TRAINING_FILE).is_file():
            raise SystemExit(f"error: {run} holds no {TRAINING_FILE}: it is not a model this bench trained; remove "
                             "it (the bench then trains it) or pass another --spec-trained folder")
        params = gpt2fn.load(run / MODEL_FILE, device=device)
        if params.config.replace(trained_vocab=None) != recipe.config:
            raise SystemExit(f"error: {run} holds a {name} of config {params.config.replace(trained_vocab=None)}; "
                             f"this run asks for {recipe.config}: remove {run} to train it again, or pass another "
                             "--spec-trained folder")
        pair[name] = (params, json.loads((run / TRAINING_FILE).read_text()))
    return pair


def corpus_prompt(directory: Path, *, prompt_len: int, context: int) -> torch.Tensor:
    """`[1, prompt_len]` ids from the start of the corpus tail that the pair did not train on (`trained_pair`'s
    split): ordinary prose of the same documentation, so the acceptance rate is that of real text."""
    from gpt2fn.train import load_tokens, split_tokens

    tokens = load_tokens(directory / "corpus" / "pydoc_topics.txt", cache_dir=directory / "tokens")
    _, held_out = split_tokens(tokens, val_fraction=SPEC_VAL_FRACTION, context=context)
    if len(held_out) < prompt_len:
        raise SystemExit(f"error: the held-out text has {len(held_out)} tokens, fewer than the prompt's {prompt_len}")
    return torch.tensor(held_out[:prompt_len].astype("int64"))[None]


def bench_speculative_trained(directory: Path, *, device: torch.device, recipes: dict[str, Recipe] | None = None,
                              draft_tokens: int = 4, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 3
                              ) -> list[Result]:
    """`bench_speculative` on a pair trained on one text (`trained_pair`: trained first where `directory` does not
    hold it yet), with a prompt of held-out text for both the draft model and prompt lookup. Cases start with
    "trained"; every result's `pair` extra holds both models' configs, parameter counts, training seconds and
    steps, and final training and validation losses."""
    pair = trained_pair(directory, device=device, recipes=recipes)
    (target, t_info), (draft, d_info) = pair["target"], pair["draft"]
    prompt = corpus_prompt(directory, prompt_len=prompt_len,
                           context=max(target.config.context_length, draft.config.context_length))
    return bench_speculative(target, draft=draft, prompt=prompt, lookup_prompt=prompt, draft_tokens=draft_tokens,
                             new_tokens=new_tokens, repeats=repeats, label="trained ",
                             extra={"pair": {"target": t_info, "draft": d_info}})


# ---------------------------------------------------------------------------------------------------------------
# Prefill


def bench_prefill(params: GPTParams, *, seq: int = 1024, repeats: int = 3) -> list[Result]:
    """One forward over `seq` tokens, batch 1: only the last position's logits (what generation needs), and all."""
    device = params.device
    seq = min(seq, params.config.context_length)
    ids = torch.randint(0, params.config.n_tokens, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    hf = peers.hf_from_params(params)

    def g(last: bool) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return gpt2fn.forward(params, ids, last_only=last)
        return run

    def h(last: bool) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return hf(ids, use_cache=False, logits_to_keep=1 if last else 0).logits
        return run

    results = []
    for label, last in (("last logits", True), ("all logits", False)):
        t = interleaved({GPT2FN: g(last), HF: h(last)}, repeats=repeats, device=device)
        case = f"{seq} tok {label}"
        results += [Result("prefill", case, n, "tok/s", [seq / s for s in ts], extra={"seq": seq})
                    for n, ts in t.items()]
    return results


def hf_scores(hf: Any, texts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """The peer of `gpt2fn.score` for texts within the context: one left-padded forward with an attention mask and
    position ids counted from it, then each text's per-token log-probabilities of tokens 1..n-1 (fp32)."""
    from gpt2fn.model import left_pad

    ids, mask = left_pad(texts, device=device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = hf(ids, attention_mask=mask.long(), position_ids=positions, use_cache=False).logits
    logp = -torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return [logp[i, ids.shape[1] - len(t):] for i, t in enumerate(texts)]


def bench_score(params: GPTParams, *, batch: int = 8, seq: int = 256, repeats: int = 3) -> list[Result]:
    """Log-probabilities of every token of `batch` texts of lengths seq/2 .. seq (within the context, one window
    each): `gpt2fn.score` against the `transformers` forward computing the same losses (compared as a check)."""
    device = params.device
    seq = min(seq, params.config.context_length)
    gen = torch.Generator().manual_seed(0)
    lengths = [seq // 2 + (seq - seq // 2) * i // max(batch - 1, 1) for i in range(batch)]
    texts = [torch.randint(0, params.config.n_tokens, (n,), generator=gen).tolist() for n in lengths]
    hf = peers.hf_from_params(params)
    ours = gpt2fn.score(params, texts, batch_size=batch)
    with torch.inference_mode():
        theirs = hf_scores(hf, texts, device)
    diff = max(float((s.logprobs - t.cpu()).abs().max()) for s, t in zip(ours, theirs, strict=True))
    if diff > 1e-3:
        raise RuntimeError(f"score and the transformers forward disagree by {diff:.2e} nats")

    def h() -> Any:
        with torch.inference_mode():
            return hf_scores(hf, texts, device)

    t = interleaved({GPT2FN: lambda: gpt2fn.score(params, texts, batch_size=batch), HF: h},
                    repeats=repeats, device=device)
    n = sum(lengths) - batch
    return [Result("score", f"{batch} texts {lengths[0]}-{lengths[-1]} tok", name, "tok/s", [n / s for s in ts],
                   extra={"batch": batch, "tokens": n, "max_abs_diff": diff}) for name, ts in t.items()]


# ---------------------------------------------------------------------------------------------------------------
# Shape checks


def bench_checks(params: GPTParams, *, prompt_len: int = 16, new_tokens: int = 128, prefill_seq: int = 1024,
                 repeats: int = 3) -> list[Result]:
    """Seconds with run-time shape checks on vs off: one decode step (cache), a whole decode, a prefill."""
    device, cfg = params.device, params.config
    name, decode = gpt2fn_decoder(params)
    ids = torch.randint(0, cfg.n_tokens, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    seq = min(prefill_seq, cfg.context_length)
    long_ids = torch.randint(0, cfg.n_tokens, (1, seq), generator=torch.Generator().manual_seed(2)).to(device)
    cache = gpt2fn.init_cache(cfg, 1, prompt_len + 1, device=device, dtype=params.dtype)
    with torch.inference_mode():
        _, cache = gpt2fn.forward(params, ids, cache=cache)
    one = ids[:, :1]

    def with_checks(on: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with gpt2fn.shape_checks(on), torch.inference_mode():
                return fn()
        return run

    cases = {
        "decode step (1 token, cache)": lambda: gpt2fn.forward(params, one, cache=cache, last_only=True),
        f"decode {prompt_len}+{new_tokens} ({name})": lambda: decode(ids, new_tokens),
        f"prefill {seq} tok last logits": lambda: gpt2fn.forward(params, long_ids, last_only=True),
    }
    results = []
    for case, fn in cases.items():
        reps = repeats * 10 if case.startswith("decode step") else repeats
        t = interleaved({"checks on": with_checks(True, fn), "checks off": with_checks(False, fn)},
                        repeats=reps, device=device)
        results += [Result("checks", case, n, "ms", [1e3 * s for s in ts], higher_is_better=False)
                    for n, ts in t.items()]
    return results


# ---------------------------------------------------------------------------------------------------------------
# Training step


def gpt2fn_train_step(params: GPTParams, lr: float = 6e-4) -> tuple[str, Callable[[Any, Any], None]]:
    """gpt2fn's functional train step when present, else gpt2fn.loss + autograd + torch.optim.AdamW on the leaves.

    Returns `(label, step(ids, targets) -> loss)`; the step keeps its state in a closure, as a loop would."""
    train = _train_module()
    if train is not None:
        label, step = _functional_step(train, params, lr)
        if step is not None:
            return label, step
    leaves = gpt2fn.tree_map(lambda t: t.detach().clone().requires_grad_(), params)
    opt = torch.optim.AdamW(list(torch.utils._pytree.tree_leaves(leaves)), lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.1)

    def step(x: Any, y: Any) -> torch.Tensor:
        loss = gpt2fn.loss(leaves, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(torch.utils._pytree.tree_leaves(leaves)), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return GPT2FN + ".loss + torch.optim.AdamW", step


def _train_module() -> Any:
    try:
        import gpt2fn.train as train  # noqa: PLC0415
    except ImportError:
        return None
    return train


def _functional_step(train: Any, params: GPTParams, lr: float) -> tuple[str, Any]:
    """Adapt to gpt2fn.train's step API: `init_adamw(params, ...)` / `train_step(params, opt, ids, targets, ...)`
    returning `(params, opt, loss[, ...])`. Returns `(label, None)` when the API is not recognised."""
    init = next((getattr(train, n) for n in ("init_adamw", "adamw_init", "init_optimizer") if hasattr(train, n)),
                None)
    step_fn = next((getattr(train, n) for n in ("train_step", "step") if hasattr(train, n)), None)
    if init is None or step_fn is None:
        return GPT2FN, None
    state = {"params": params, "opt": init(params)}

    def step(x: Any, y: Any) -> torch.Tensor:
        out = step_fn(state["params"], state["opt"], x, y, lr=lr)
        state["params"], state["opt"] = out[0], out[1]
        return getattr(out[2], "loss", out[2])

    return GPT2FN + f".train.{step_fn.__name__}", step


def bench_train(config: gpt2fn.GPTConfig, *, batch: int = 8, device: torch.device, repeats: int = 3,
                with_hf: bool = True) -> list[Result]:
    """Tokens/s of one AdamW step (forward, backward, update) on `batch` sequences of the full context."""
    seq = config.context_length
    params = gpt2fn.init_params(config, seed=0, device=device)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, config.n_tokens, (batch, seq), generator=g).to(device)
    y = torch.randint(0, config.n_tokens, (batch, seq), generator=g).to(device)
    label, gstep = gpt2fn_train_step(params)

    def module_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        # the same work as gpt2fn's step: clip the global norm to 1.0, decay matrices only
        ps = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))

        def run() -> None:
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    nano = peers.nano_from_params(params)
    contenders = {label: lambda: gstep(x, y),
                  "nn.Module (nanoGPT) + torch.optim.AdamW": module_step(nano, lambda: nano(x, y))}
    if with_hf:
        hf = peers.hf_from_params(params).train()
        contenders["transformers + torch.optim.AdamW"] = module_step(hf, lambda: hf(x, labels=y).loss)
    t = interleaved(contenders, repeats=repeats, device=device)
    case = f"{config.n_layers}L/{config.emb_dim}/ctx{seq}/b{batch}"
    return [Result("train", case, n, "tok/s", [batch * seq / s for s in ts], extra={"batch": batch, "seq": seq})
            for n, ts in t.items()]


# ---------------------------------------------------------------------------------------------------------------
# Loading (a child process per measurement)


def _memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process's address space, from /proc/self/status.

    Not `getrusage().ru_maxrss`: Linux carries that high-water mark across `execve`, so a child started from the
    benchmark (several GB resident) would report the parent's peak. VmHWM belongs to the new address space."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def child_load(kind: str, path: str, n_heads: str = "0") -> dict[str, Any]:
    """Run in a fresh process: load `path` the `kind` way, touch every weight, report seconds and peak RSS.

    The memory figure is (peak RSS - RSS before loading) / bytes of the loaded weights: 1.0 means the weights and
    nothing else; a memory-mapped file counts as resident once its pages are touched."""
    t0 = time.perf_counter()
    import safetensors.torch  # noqa: PLC0415
    imported = time.perf_counter() - t0
    rss0, peak0 = _memory()
    t0 = time.perf_counter()
    if kind == "gpt2fn.load":
        obj = gpt2fn.load(path, n_heads=int(n_heads) or None)
    elif kind == "safetensors.load_file":
        obj = safetensors.torch.load_file(path)
    elif kind == "torch.load":
        obj = torch.load(path, weights_only=True, map_location="cpu")
    elif kind.startswith("gpt2fn.generate_tokens"):  # the user's path: load, then decode (8 tokens, batch 1)
        obj = gpt2fn.load(path)
        if kind.endswith("int8"):
            obj = gpt2fn.quantize(obj)
        ids = torch.randint(0, obj.config.n_tokens, (1, 16), generator=torch.Generator().manual_seed(0))
        gpt2fn.generate_tokens(obj, ids, max_new_tokens=8, eos=False)
    else:
        raise ValueError(f"unknown load kind {kind!r}")
    loaded = time.perf_counter() - t0
    leaves = [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]
    total = sum(float(t.float().sum()) if t.dtype != torch.float32 else float(t.sum()) for t in leaves)
    ready = time.perf_counter() - t0
    weight_bytes = sum(t.nbytes for t in {t.data_ptr(): t for t in leaves}.values())
    rss1, peak1 = _memory()
    return {"kind": kind, "import_s": imported, "load_s": loaded, "ready_s": ready, "rss_before": rss0,
            "peak_before": peak0, "rss_after": rss1, "peak_rss": peak1,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weight_bytes": weight_bytes, "checksum": total}


def write_checkpoints(directory: Path, *, config: gpt2fn.GPTConfig, seed_config: gpt2fn.GPTConfig
                      ) -> dict[str, Path]:
    """A gpt2fn safetensors file (`gpt2fn.save` when present) and a seed-format `.pth` state dict."""
    params = gpt2fn.init_params(config, seed=0)
    st = directory / "gpt2fn.safetensors"
    save = getattr(gpt2fn, "save", None)
    if save is not None:
        save(params, st)
    else:
        import safetensors.torch  # noqa: PLC0415
        safetensors.torch.save_file({k: v.contiguous() for k, v in gpt2fn.params_to_dict(params).items()}, st,
                                    metadata={"gpt2fn_config": json.dumps(config.to_dict())})
    del params
    seed_params = gpt2fn.init_params(seed_config, seed=0)
    pth = directory / "seed.pth"
    torch.save(peers.seed_state_dict(seed_params), pth)
    return {"safetensors": st, "pth": pth}


def bench_load(*, config: gpt2fn.GPTConfig, seed_config: gpt2fn.GPTConfig, repeats: int = 3,
               directory: Path | None = None) -> list[Result]:
    """Seconds until every weight is in memory and peak resident memory, one fresh process per measurement.

    The files were just written, so they are in the page cache: this is the warm-cache load."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2fn-bench-")))
        files = write_checkpoints(directory, config=config, seed_config=seed_config)
        kinds: list[tuple[str, str, Path]] = [("safetensors.load_file", "safetensors", files["safetensors"]),
                                             ("torch.load", "pth", files["pth"])]
        if hasattr(gpt2fn, "load"):
            kinds = [("gpt2fn.load", "safetensors", files["safetensors"]),  # the config is inside the file
                     ("gpt2fn.load", "pth", files["pth"])] + kinds
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(k, f): [] for k, f, _ in kinds}
        for r in range(repeats):
            for kind, fmt, path in kinds if r % 2 == 0 else kinds[::-1]:
                heads = seed_config.n_heads if fmt == "pth" else 0  # the seed's .pth does not record it
                runs[(kind, fmt)].append(_spawn_load(kind, path, heads))
        sizes = {fmt: path.stat().st_size for _, fmt, path in kinds}
    results = []
    for (kind, fmt), rs in runs.items():
        case = f"{fmt} ({sizes[fmt] / 1e6:.0f} MB file)"
        weight_bytes = rs[0]["weight_bytes"]
        extra = {"file_bytes": sizes[fmt], "weight_bytes": weight_bytes,
                 "load_s": [r["load_s"] for r in rs], "import_s": [r["import_s"] for r in rs],
                 "rss_before": [r["rss_before"] for r in rs], "peak_rss": [r["peak_rss"] for r in rs]}
        results.append(Result("load", case, kind, "s", [r["ready_s"] for r in rs], higher_is_better=False,
                              extra=extra))
        results.append(Result("load memory", case, kind, "x weights",
                              [(r["peak_rss"] - r["rss_before"]) / weight_bytes for r in rs],
                              higher_is_better=False, extra={"weight_bytes": weight_bytes}))
    return results


def bench_memory(*, config: gpt2fn.GPTConfig, directory: Path | None = None) -> list[Result]:
    """Peak resident memory of the default decode on the params `load` returns, in a fresh process, over the bytes
    of the weights: `gpt2fn.generate_tokens(gpt2fn.load(path), ids, max_new_tokens=8)` (1.0: the weights and
    nothing else; the KV cache, activations and torch's own libraries come on top)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2fn-bench-")))
        path = directory / "model.safetensors"
        params = gpt2fn.init_params(config, seed=0)
        gpt2fn.save(params, path)
        del params
        gc.collect()
        run = _spawn_load("gpt2fn.generate_tokens", path)
    weight_bytes = run["weight_bytes"]
    return [Result("memory", f"generate_tokens {weight_bytes / 1e9:.2f} GB weights", GPT2FN, "x weights",
                   [run["peak_rss"] / weight_bytes], higher_is_better=False,
                   extra={"weight_bytes": weight_bytes, "peak_rss": run["peak_rss"], "rss_before": run["rss_before"],
                          "peak_over_start": (run["peak_rss"] - run["rss_before"]) / weight_bytes})]


def _spawn_load(kind: str, path: Path, n_heads: int = 0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child-load", kind, str(path), str(n_heads)],
                          capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"load child ({kind} {path.name}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The roofline, ratios, targets


def weight_bytes(params: GPTParams) -> int:
    """Bytes of the weights one decode step reads: every leaf (int8 values and their fp32 scales, for an int8 tree)
    but the position embedding, of which a step reads one row."""
    return sum(t.numel() * t.element_size() for name, t in gpt2fn.named_leaves(params) if name != "pos_emb")


def decode_bytes_per_step(config: gpt2fn.GPTConfig, *, dtype: torch.dtype, batch: int, prompt_len: int,
                          new_tokens: int, weights: int | None = None, kv_itemsize: int | None = None
                          ) -> tuple[float, float]:
    """(bytes read, matmul FLOPs) per decode step, averaged over the decode: every weight once (the token
    embedding as the tied head; one row of each embedding is negligible) plus the KV cache so far. `weights`
    and `kv_itemsize` (as measured on the tree: `weight_bytes`, `compute_dtype`) override the estimate from
    `dtype`, which assumes every weight and the cache in it."""
    size = torch.empty((), dtype=dtype).element_size()
    d, layers = config.emb_dim, config.n_layers
    block = layers * (d * 3 * d + 3 * d + d * d + d + 2 * d * config.d_mlp + config.d_mlp + d + 4 * d)
    head = config.vocab_size * d
    weights = (block + head + 2 * d) * size if weights is None else weights
    avg_len = prompt_len + new_tokens / 2
    kv = batch * 2 * layers * d * avg_len * (size if kv_itemsize is None else kv_itemsize)
    flops = 2 * batch * (block + head) + batch * 4 * layers * d * avg_len
    return weights + kv, flops


def roofline(results: list[Result], config: gpt2fn.GPTConfig) -> list[dict[str, Any]]:
    """Decode's upper bound per case: batch / max(bytes / bandwidth, FLOPs / GEMM rate); gpt2fn's fraction."""
    bw = next((r.median for r in results if r.workload == "limits" and r.contender == "read (sum)"), None)
    gemm = {r.case.removeprefix("GEMM "): r.median for r in results
            if r.workload == "limits" and r.case.startswith("GEMM")}
    if bw is None:
        return []
    rows = []
    for r in results:
        if r.workload != "decode" or not r.contender.startswith(GPT2FN):
            continue
        e = r.extra
        dtype = DTYPES[e["dtype"]]
        nbytes, flops = decode_bytes_per_step(config, dtype=dtype, batch=e["batch"], prompt_len=e["prompt_len"],
                                              new_tokens=e["new_tokens"], weights=e.get("weight_bytes"),
                                              kv_itemsize=e.get("kv_itemsize"))
        # on CPU gpt2fn's products run in fp32 whatever the storage (GPTParams.compute_dtype)
        rate = gemm.get("fp32" if e.get("compute_itemsize", e.get("kv_itemsize")) == 4 else e["dtype"],
                        float("inf"))
        t_mem, t_flop = nbytes / (bw * 1e9), flops / (rate * 1e9)
        limit = e["batch"] / max(t_mem, t_flop)
        rows.append({"case": r.case, "contender": r.contender, "bytes_per_step": nbytes, "flops_per_step": flops,
                     "bandwidth_gbs": bw,
                     "bound": "memory" if t_mem >= t_flop else "compute", "roofline_tok_s": limit,
                     "gpt2fn_tok_s": r.median, "fraction": r.median / limit})
    return rows


@dataclass(frozen=True)
class Target:
    workload: str
    case: str
    contender: str
    peer: str | None
    goal: float
    kind: str  # "ratio>=": median / peer median >= goal; "overhead<=": on / off - 1 <= goal; "abs<=": median <= goal

    def evaluate(self, results: list[Result]) -> dict[str, Any] | None:
        mine = _find(results, self.workload, self.case, self.contender)
        if mine is None:
            return None
        row: dict[str, Any] = {"workload": self.workload, "case": mine.case, "contender": mine.contender,
                               "peer": self.peer, "goal": self.goal, "kind": self.kind}
        if self.kind == "abs<=":
            row["value"] = mine.median
            row["met"] = mine.median <= self.goal
            return row
        peer = _find(results, self.workload, self.case, self.peer or "")
        if peer is None:
            return None
        ratio = mine.median / peer.median
        if self.kind == "overhead<=":
            row["value"] = ratio - 1
            row["met"] = ratio - 1 <= self.goal
        else:
            ratio = ratio if mine.higher_is_better else 1 / ratio
            row["value"] = ratio
            row["met"] = ratio >= self.goal
        return row


def _find(results: list[Result], workload: str, case: str, contender: str) -> Result | None:
    return next((r for r in results if r.workload == workload and r.case.startswith(case)
                 and r.contender.startswith(contender)), None)


TARGETS = (
    Target("decode", "fp32 b1", GPT2FN, HF, 2.1, "ratio>="),
    Target("decode", "bf16 b1", GPT2FN, HF, 1.4, "ratio>="),
    Target("decode", "fp32 b8", GPT2FN, HF, 2.5, "ratio>="),
    Target("beam", "fp32 k4", GPT2FN, HF, 1.5, "ratio>="),
    Target("decode", "fp32 b32", GPT2FN, HF, 1.7, "ratio>="),
    # issue 20: the CPU engines (rows absent, so targets unevaluated, where their environments are not installed)
    Target("decode", "fp32 b1", GPT2FN, "ctranslate2 fp32", 1.15, "ratio>="),
    Target("decode", "fp32 b1", GPT2FN, "llama.cpp F32", 1.15, "ratio>="),
    Target("decode", "fp32 b8", GPT2FN, "ctranslate2 fp32", 1.5, "ratio>="),
    Target("decode", "fp32 b8", GPT2FN, "llama.cpp F32", 1.5, "ratio>="),
    Target("decode", "fp32 b32", GPT2FN, "ctranslate2 fp32", 1.3, "ratio>="),
    Target("decode", "fp32 b32", GPT2FN, "llama.cpp F32", 1.3, "ratio>="),
    # issue 21: 16- and 8-bit decoding against the engines' own formats, and accuracy no worse than theirs
    Target("decode", "bf16 b1", GPT2FN, "llama.cpp F16", 1.1, "ratio>="),
    Target("decode", "bf16 b8", GPT2FN, "llama.cpp F16", 1.1, "ratio>="),
    Target("decode", "fp16 b1", GPT2FN, "llama.cpp F16", 1.1, "ratio>="),
    Target("decode", "fp16 b8", GPT2FN, "llama.cpp F16", 1.1, "ratio>="),
    Target("decode", "int8 b1", GPT2FN, "ctranslate2 int8", 1.2, "ratio>="),
    Target("decode", "int8 b8", GPT2FN, "ctranslate2 int8", 1.2, "ratio>="),
    Target("formats", "fp16", GPT2FN, "llama.cpp F16", 1.0, "ratio>="),
    Target("formats", "int8", GPT2FN, "ctranslate2 int8", 1.0, "ratio>="),
    Target("prefill", "1024 tok last", GPT2FN, HF, 1.0, "ratio>="),
    Target("train", "", GPT2FN, "nn.Module", 1.0, "ratio>="),
    Target("score", "", GPT2FN, HF, 1.0, "ratio>="),
    Target("checks", "decode 16+", "checks on", "checks off", 0.10, "overhead<="),
    Target("load", "safetensors", "gpt2fn.load", None, 1.5, "abs<="),
    Target("load memory", "safetensors", "gpt2fn.load", None, 1.3, "abs<="),
    Target("load", "pth", "gpt2fn.load", None, 1.5, "abs<="),
    Target("load memory", "pth", "gpt2fn.load", None, 1.3, "abs<="),
)


def peer_ratios(results: list[Result]) -> list[dict[str, Any]]:
    """Every contender's median over the first contender of its case (gpt2fn, or 'checks off'), better = >1."""
    rows = []
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.case), []).append(r)
    for (workload, case), rs in groups.items():
        if workload in ("limits", "load", "load memory", "formats"):  # formats: errors, set against by TARGETS
            continue
        base = rs[0]
        for r in rs[1:]:
            speedup = base.median / r.median if base.higher_is_better else r.median / base.median
            rows.append({"workload": workload, "case": case, "contender": base.contender, "peer": r.contender,
                         "speedup": speedup})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "shape_checks_default": gpt2fn.checks_enabled(), "native_kernel": gpt2fn.native.status(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with contextlib.suppress(ImportError):
        import transformers  # noqa: PLC0415
        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def table(results: list[Result], ratios: list[dict[str, Any]], targets: list[dict[str, Any]],
          roof: list[dict[str, Any]]) -> str:
    """A markdown table: one row per contender and case, with the speedup of the case's first contender over it."""
    speed = {(r["workload"], r["case"], r["peer"]): r["speedup"] for r in ratios}
    goal = {(t["workload"], t["case"], t["contender"]): t for t in targets}
    lines = ["| workload | case | contender | median | min-max | unit | gpt2fn speedup | target |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in results:
        s = speed.get((r.workload, r.case, r.contender))
        t = goal.get((r.workload, r.case, r.contender))
        tgt = ""
        if t is not None:
            sign = ">=" if t["kind"] == "ratio>=" else "<="
            value = f"{t['value']:+.1%}" if t["kind"] == "overhead<=" else _fmt(t["value"])
            goal_s = f"{t['goal']:.0%}" if t["kind"] == "overhead<=" else _fmt(t["goal"])
            tgt = f"{value} {sign} {goal_s} {'met' if t['met'] else '**MISSED**'}"
        lines.append(f"| {r.workload} | {r.case} | {r.contender} | {_fmt(r.median)} | "
                     f"{_fmt(min(r.samples))}-{_fmt(max(r.samples))} | {r.metric} | "
                     f"{'' if s is None else f'{s:.2f}x'} | {tgt} |")
    if roof:
        lines += ["", "| decode case | contender | bound | bytes/step | roofline tok/s | tok/s | fraction |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r.get('contender', GPT2FN)} | {r['bound']} | {r['bytes_per_step'] / 1e6:.0f} MB | "
                  f"{_fmt(r['roofline_tok_s'])} | {_fmt(r['gpt2fn_tok_s'])} | {r['fraction']:.0%} |" for r in roof]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Study: activation patching (resid_pre x every layer x every position)

TL_PATCHING = """
import json, sys, time
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.patching import get_act_patch_resid_pre
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"]); torch.manual_seed(0)
hf = GPT2LMHeadModel(GPT2Config(n_layer=a["n_layers"], n_embd=a["d_model"], n_head=a["n_heads"])).eval()
bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
bridge.enable_compatibility_mode(no_processing=True)
g = torch.Generator().manual_seed(0)
clean, corrupt = (torch.randint(0, hf.config.vocab_size, (1, a["seq"]), generator=g) for _ in range(2))
_, cache = bridge.run_with_cache(clean)
times = []
for _ in range(a["repeats"]):
    t = time.perf_counter()
    with torch.no_grad():
        get_act_patch_resid_pre(bridge, corrupt, cache, lambda lg: (lg[:, -1, 5] - lg[:, -1, 11]).mean())
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times}))
"""


def bench_patching(params: GPTParams, *, seq: int = 12, repeats: int = 3) -> tuple[list[Result], list[str]]:
    """Activation patching of `resid_pre` at every layer x position (random weights, one prompt of `seq` tokens):
    `patching_sweep` as one batch vs its per-cell loop, and TransformerLens's `get_act_patch_resid_pre` when
    GPT2FN_TL_PYTHON names a Python with transformer_lens 4.x (run there in a subprocess, same model shape)."""
    from gpt2fn.study import logit_diff, patching_sweep
    cfg, device = params.config, params.device
    g = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(0, cfg.n_tokens, (1, seq), generator=g).to(device) for _ in range(2))

    def metric(lg: torch.Tensor) -> torch.Tensor:
        return logit_diff(lg, 5, 11).mean()

    t = interleaved({"gpt2fn batched": lambda: patching_sweep(params, clean, corrupt, metric),
                     "gpt2fn loop": lambda: patching_sweep(params, clean, corrupt, metric, vectorize=False)},
                    repeats=repeats, device=device, warmup={"gpt2fn batched": lambda: patching_sweep(
                        params, clean, corrupt, metric, layers=[0], positions=[0])}, at_most={"gpt2fn loop": 1})
    case = f"resid_pre {cfg.n_layers} layers x {seq} pos"
    results = [Result("patching", case, n, "s", ts, higher_is_better=False) for n, ts in t.items()]
    notes = []
    tl = os.environ.get("GPT2FN_TL_PYTHON")
    if not tl:
        notes.append("patching: TransformerLens skipped (set GPT2FN_TL_PYTHON to a Python with transformer_lens 4.x)")
    else:
        arg = json.dumps({"threads": torch.get_num_threads(), "n_layers": cfg.n_layers, "d_model": cfg.emb_dim,
                          "n_heads": cfg.n_heads, "seq": seq, "repeats": repeats})
        proc = subprocess.run([tl, "-c", TL_PATCHING, arg], capture_output=True, text=True, cwd=tempfile.gettempdir())
        if proc.returncode != 0:
            notes.append(f"patching: TransformerLens failed ({proc.stderr.strip().splitlines()[-1:]})")
        else:
            secs = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            results.append(Result("patching", case, "TransformerLens", "s", secs, higher_is_better=False))
    return results, notes


# ---------------------------------------------------------------------------------------------------------------
# Study: attribution patching over every head; SAE splice overhead


def bench_attribution(params: GPTParams, *, seq: int = 12, repeats: int = 3) -> tuple[list[Result], list[str]]:
    """Every head of every layer (`attn.z`, summed over positions), one prompt pair of `seq` tokens: attribution
    patching (two forwards, one backward) against exact activation patching (`head_patching_sweep`, batched) and
    EAP over every edge. TransformerLens has no attribution-patching function (its tutorials write the hooks by
    hand), so it has no row here."""
    from gpt2fn.study import attribution_patching, edge_attribution_patching, head_patching_sweep, logit_diff
    cfg, device = params.config, params.device
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.n_tokens, (1, seq), generator=g).to(device)
    corrupt = clean.clone()
    corrupt[:, seq // 2] = (clean[:, seq // 2] + 1) % cfg.n_tokens

    def metric(lg: torch.Tensor) -> torch.Tensor:
        return logit_diff(lg, 5, 11).mean()

    t = interleaved({"gpt2fn AtP": lambda: attribution_patching(params, clean, corrupt, metric, "blocks.*.attn.z"),
                     "gpt2fn EAP (all edges)": lambda: edge_attribution_patching(params, clean, corrupt, metric),
                     "gpt2fn head_patching_sweep": lambda: head_patching_sweep(params, clean, corrupt, metric)},
                    repeats=repeats, device=device, at_most={"gpt2fn head_patching_sweep": max(1, repeats - 1)})
    case = f"attn.z {cfg.n_layers} layers x {cfg.n_heads} heads, {seq} tok"
    notes = ["attribution: TransformerLens has no attribution-patching function to time (hand-written hooks only)"]
    return [Result("attribution", case, n, "s", ts, higher_is_better=False) for n, ts in t.items()], notes


def bench_sae(params: GPTParams, *, seq: int = 128, expansion: int = 32, repeats: int = 5) -> list[Result]:
    """One forward of `seq` tokens with a random standard SAE (`expansion x d_model` features, as SAE-Lens's
    `gpt2-small-res-jb`) spliced into the middle layer's `resid_pre` with its error term, and with one feature
    ablated, against the unedited forward."""
    from gpt2fn.study import ablate_features, forward_with, run_with_saes, sae_from_dict
    cfg, device = params.config, params.device
    d, n = cfg.emb_dim, expansion * cfg.emb_dim
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d, n, generator=g) / d ** 0.5, "b_enc": torch.zeros(n),
         "W_dec": torch.randn(n, d, generator=g) / d ** 0.5, "b_dec": torch.zeros(d)}
    layer = cfg.n_layers // 2
    sae = sae_from_dict({"d_in": d, "d_sae": n, "metadata": {"hook_name": f"blocks.{layer}.hook_resid_pre"}},
                        {k: v.to(device=device, dtype=params.dtype) for k, v in w.items()})
    ids = torch.randint(0, cfg.n_tokens, (1, seq), generator=g).to(device)
    site = sae.config.site
    with torch.no_grad():
        t = interleaved({GPT2FN: lambda: forward_with(params, ids),
                         "gpt2fn + SAE (error term)": lambda: run_with_saes(params, ids, sae),
                         "gpt2fn + SAE, 1 feature ablated": lambda: run_with_saes(
                             params, ids, sae, features={site: ablate_features(0)})},
                        repeats=repeats, device=device)
    case = f"{seq} tok, SAE {d}->{n} at {site}"
    return [Result("sae", case, name, "s", ts, higher_is_better=False) for name, ts in t.items()]


# ---------------------------------------------------------------------------------------------------------------
# Main


@dataclass
class Plan:
    """What a run measures, from the command line."""

    only: tuple[str, ...] = WORKLOADS
    preset: str = "gpt2"
    train_preset: str = "small"
    seed_preset: str = "seed"
    memory_preset: str = "gpt2-xl"  # the model whose decode peak RSS the memory workload measures
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    dtypes: tuple[str, ...] | None = None  # None: every format of DTYPES
    prompt_len: int = 16
    new_tokens: int = 128
    prefill_len: int = 1024
    train_batch: int = 8
    repeats: int = 3
    compiled: bool = True
    engines: bool = True  # CTranslate2 and llama.cpp in the fp32 decode cases, where their environments exist
    vocab_size: int | None = None  # overrides the preset's (the engines need GPT-2's 50257)
    limit_mb: int = 1024
    gemm_n: int = 2048
    spec_trained: str | None = None  # the speculative workload also measures the pair trained in this folder
    spec_seconds: tuple[float, float] = (SPEC_PAIR["target"].seconds, SPEC_PAIR["draft"].seconds)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and tokens, smaller limit probes")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated workloads of {WORKLOADS}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON results")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the README's Performance section (machine, command, table) to this file")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 3, --quick 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 128, --quick 16)")
    p.add_argument("--batches", default=None, help="decode batch sizes, comma separated (default 1,2,4,8,16,32)")
    p.add_argument("--dtypes", default=None, help="decode formats of fp32,bf16,fp16,int8 (default all)")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the torch.compile decode rows (they compile for tens of seconds first)")
    p.add_argument("--no-engines", action="store_true",
                   help="skip the CTranslate2 and llama.cpp decode rows (they convert the model first)")
    p.add_argument("--preset", default="gpt2", help="model for decode/prefill/checks/load (default gpt2, 124M)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override the preset's vocabulary (the CTranslate2/llama.cpp rows need GPT-2's 50257)")
    p.add_argument("--train-preset", default="small", help="model for the train step (default small)")
    p.add_argument("--memory-preset", default="gpt2-xl",
                   help="model whose decode peak RSS the memory workload measures (default gpt2-xl, 1.5B)")
    p.add_argument("--seed-preset", default="seed", help="model for the seed-format .pth load (default seed)")
    p.add_argument("--spec-trained", type=Path, default=None, metavar="DIR",
                   help="the speculative workload also measures a pair trained on the demo's text: a 6-layer, "
                        "384-wide target and a 2-layer, 128-wide draft, trained first (for --spec-train-seconds) "
                        "where DIR does not hold them yet, then reused")
    p.add_argument("--spec-train-seconds", default=None, metavar="TARGET,DRAFT",
                   help="training budgets of the --spec-trained pair in seconds (default 180,60)")
    p.add_argument("--child-load", nargs=3, metavar=("KIND", "PATH", "N_HEADS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    only = tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = sorted(set(only) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"error: --only got unknown workloads {unknown}; choose from {WORKLOADS}")
    plan = Plan(only=only, preset=args.preset, train_preset=args.train_preset, seed_preset=args.seed_preset,
                memory_preset=args.memory_preset)
    if args.quick:
        plan.repeats, plan.new_tokens, plan.prefill_len, plan.limit_mb, plan.gemm_n = 2, 16, 256, 256, 1024
    plan.repeats = args.repeats or plan.repeats
    plan.compiled = not (args.no_compiled or args.quick)
    plan.engines = not args.no_engines
    plan.vocab_size = args.vocab_size
    plan.new_tokens = args.new_tokens or plan.new_tokens
    if args.spec_train_seconds and not args.spec_trained:
        raise SystemExit("error: --spec-train-seconds sets the budgets of the --spec-trained pair: add "
                         "--spec-trained DIR, or drop it")
    if args.spec_trained:
        if "speculative" not in plan.only:
            raise SystemExit("error: --spec-trained measures a trained pair in the speculative workload: add "
                             "speculative to --only, or drop --spec-trained")
        plan.spec_trained = str(args.spec_trained)
    if args.spec_train_seconds:
        try:
            target_s, draft_s = (float(x) for x in args.spec_train_seconds.split(","))
        except ValueError:
            raise SystemExit(f"error: --spec-train-seconds takes two numbers, TARGET,DRAFT (e.g. 180,60); got "
                             f"{args.spec_train_seconds!r}") from None
        if not (target_s > 0 and draft_s > 0):
            raise SystemExit(f"error: --spec-train-seconds must be positive; got {args.spec_train_seconds!r}")
        plan.spec_seconds = (target_s, draft_s)
    if args.batches:
        plan.batches = tuple(int(b) for b in args.batches.split(","))
    if args.dtypes:
        plan.dtypes = tuple(d.strip() for d in args.dtypes.split(","))
        if set(plan.dtypes) - set(DTYPES):
            raise SystemExit(f"error: --dtypes must be of {sorted(DTYPES)}, got {args.dtypes!r}")
    return plan


def plan_config(plan: Plan) -> gpt2fn.GPTConfig:
    cfg = gpt2fn.preset(plan.preset)
    return cfg if plan.vocab_size is None else cfg.replace(vocab_size=plan.vocab_size)


def start_engines(params: GPTParams, stack: contextlib.ExitStack, wanted: tuple[peers.EnginePeer, ...]
                  ) -> tuple[dict[str, peers.EngineWorker], list[str]]:
    """The `wanted` CTranslate2 / llama.cpp workers on `params` (converted in a temporary folder that `stack`
    removes, after it has closed them), and notes on those that do not run."""
    if params.device.type != "cpu":
        return {}, [f"decode: CTranslate2 and llama.cpp skipped: they run on the CPU, this run on {params.device}"]
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2fn-engines-")))
    with _stage("engines: convert and load"):
        workers, notes = peers.start_engines(params, work, threads=torch.get_num_threads(), peers=wanted)
    for w in workers.values():
        stack.callback(w.close)
    return workers, notes


def mismatch_notes(results: list[Result]) -> list[str]:
    """A note for every fp32 engine whose greedy ids left gpt2fn's (near-tied logits can do that; the logit-error
    rows say whether the two compute the same function)."""
    fp32 = {p.label for p in peers.ENGINE_PEERS if "fp32" in p.cases}
    return [f"decode {r.case}: {r.contender} ids differ from gpt2fn's from step {m['step']} of row {m['row']} "
            f"(gpt2fn {m['gpt2fn']}, {r.contender} {m['peer']})"
            for r in results if r.workload == "decode" and r.contender in fp32
            and (m := r.extra.get("first_mismatch")) is not None]


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    yield
    print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run(plan: Plan, device: torch.device) -> tuple[list[Result], list[str]]:
    """Every workload of the plan, in order; returns the results and notes on what was skipped and why."""
    results: list[Result] = []
    notes: list[str] = []
    cfg = plan_config(plan)
    needs_model = {"default", "decode", "formats", "beam", "speculative", "prefill", "checks", "score", "patching",
                   "attribution", "sae"} & set(plan.only)
    params = gpt2fn.init_params(cfg, seed=0, device=device) if needs_model else None
    if "limits" in plan.only:
        with _stage("limits"):
            results += bench_limits(device, mbytes=plan.limit_mb, gemm_n=plan.gemm_n, repeats=max(3, plan.repeats))
    if "products" in plan.only:
        if device.type == "cpu":
            with _stage("products"):
                results += bench_products(cfg, repeats=plan.repeats + 2)
        else:
            notes.append("products skipped: the few-row layouts are CPU layouts")
    if "default" in plan.only:
        with _stage("default call"):
            results += bench_default(params, repeats=plan.repeats + 2)
    dtypes = plan.dtypes or ("fp32", "bf16", "fp16", "int8")
    with contextlib.ExitStack() as stack:
        # CTranslate2 / llama.cpp: converted once, alive for the decode cases of their formats and the formats rows
        wanted = tuple(e for e in peers.ENGINE_PEERS if "formats" in plan.only
                       or ("decode" in plan.only and set(e.cases) & set(dtypes)))
        engines: dict[str, peers.EngineWorker] = {}
        if plan.engines and wanted:
            engines, why = start_engines(params, stack, wanted)
            notes += why
        if "decode" in plan.only:
            # transformers computes in the weights' dtype: beside gpt2fn's 16-bit rows only where that is fast
            hf_half = bf16_is_fast(device)
            if not hf_half:
                notes.append(f"transformers' 16-bit decode rows skipped: bf16 matrix products on this {device.type} "
                             "run at under half the fp32 rate (gpt2fn's 16-bit weights compute in fp32 on CPU)")
            for dt in dtypes:
                p = format_params(params, dt)
                joining = {e.label: engines[e.label] for e in peers.ENGINE_PEERS
                           if e.label in engines and dt in e.cases}
                for b in plan.batches:
                    with _stage(f"decode {dt} b{b}"):
                        got = bench_decode(p, batch=b, prompt_len=plan.prompt_len, new_tokens=plan.new_tokens,
                                           repeats=plan.repeats, with_seed=(dt == "fp32" and b == 1),
                                           with_hf=dt == "fp32" or hf_half,
                                           with_compiled=plan.compiled and b in (1, 8) and dt == "fp32",
                                           engines=joining)
                    results += got
                    notes += mismatch_notes(got)
                del p
        if "formats" in plan.only:
            with _stage("formats"):
                results += bench_formats(params, engines=engines)
    if "beam" in plan.only:
        with _stage("beam fp32 k4"):
            results += bench_beam(params, prompt_len=plan.prompt_len, new_tokens=min(64, plan.new_tokens),
                                  repeats=plan.repeats)
    if "speculative" in plan.only:
        with _stage("speculative b1"):
            results += bench_speculative(params, prompt_len=plan.prompt_len, new_tokens=min(64, plan.new_tokens),
                                         repeats=plan.repeats)
        if plan.spec_trained is not None:
            target_s, draft_s = plan.spec_seconds
            recipes = {"target": dataclasses.replace(SPEC_PAIR["target"], seconds=target_s),
                       "draft": dataclasses.replace(SPEC_PAIR["draft"], seconds=draft_s)}
            with _stage(f"speculative b1, the pair trained in {plan.spec_trained}"):
                results += bench_speculative_trained(Path(plan.spec_trained), device=device, recipes=recipes,
                                                     prompt_len=plan.prompt_len,
                                                     new_tokens=min(64, plan.new_tokens), repeats=plan.repeats)
    if "prefill" in plan.only:
        with _stage("prefill"):
            # prefills are short and the two contenders close: two more rounds than the decodes
            results += bench_prefill(params, seq=plan.prefill_len, repeats=plan.repeats + 2)
    if "checks" in plan.only:
        with _stage("checks"):
            results += bench_checks(params, prompt_len=plan.prompt_len, new_tokens=plan.new_tokens,
                                    prefill_seq=plan.prefill_len, repeats=plan.repeats)
    if "score" in plan.only:
        with _stage("score"):
            results += bench_score(params, seq=min(256, plan.prefill_len), repeats=plan.repeats + 2)
    if "patching" in plan.only:
        with _stage("patching"):
            found, why = bench_patching(params, repeats=plan.repeats)
            results, notes = results + found, notes + why
    if "attribution" in plan.only:
        with _stage("attribution"):
            found, why = bench_attribution(params, repeats=plan.repeats)
            results, notes = results + found, notes + why
    if "sae" in plan.only:
        with _stage("sae"):
            results += bench_sae(params, seq=min(128, plan.prefill_len), repeats=plan.repeats + 2)
    del params
    gc.collect()
    if "train" in plan.only:
        with _stage("train"):
            results += bench_train(gpt2fn.preset(plan.train_preset), batch=plan.train_batch, device=device,
                                   repeats=plan.repeats)
    if "memory" in plan.only:
        with _stage(f"memory ({plan.memory_preset})"):
            results += bench_memory(config=gpt2fn.preset(plan.memory_preset))
    if "load" in plan.only:
        with _stage("load"):
            results += bench_load(config=cfg, seed_config=gpt2fn.preset(plan.seed_preset), repeats=plan.repeats)
    return results, notes


def report(results: list[Result], notes: list[str], plan: Plan, device: torch.device, argv: Sequence[str]
           ) -> dict[str, Any]:
    """Everything a run found, as one JSON-ready dict (the markdown table included)."""
    cfg = plan_config(plan)
    ratios = peer_ratios(results)
    targets = [row for t in TARGETS if (row := t.evaluate(results)) is not None]
    roof = roofline(results, cfg)
    return {"command": " ".join(["python scripts/bench.py", *argv]), "machine": machine_info(device),
            "plan": asdict(plan), "results": [r.to_json() for r in results], "ratios": ratios,
            "targets": targets, "roofline": roof, "notes": notes,
            "table": table(results, ratios, targets, roof) + "".join(f"\n\nNote: {n}" for n in notes)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_load:
        print(json.dumps(child_load(*args.child_load)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan_from(args)
    device = torch.device(args.device)
    out = report(*run(plan, device), plan, device, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print("\n" + machine_line(out["machine"]) + "\n")
    print(out["table"])
    print(f"\nJSON: {args.out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_section(out))
        print(f"Markdown: {args.markdown}")
    return 0


def machine_line(m: dict[str, Any]) -> str:
    load = m.get("load_average")
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, {m['cpu_capability']}, "
            f"torch {m['torch']}, transformers {m.get('transformers', '-')}, device {m['device']}"
            + (f" ({m['gpu']})" if "gpu" in m else "")
            + (f", load average at the end {load[0]:.1f}" if load else ""))


def markdown_section(out: dict[str, Any]) -> str:
    """The README's Performance section: what was measured, on what, with which command, and the table."""
    return "\n".join([
        "## Performance",
        "",
        "gpt2fn next to its peers in one process, on the same random GPT-2 124M weights (speed does not depend on",
        "the values; greedy ids are compared as a check), contenders interleaved after a warm-up; medians with",
        "min-max over the rounds. *gpt2fn speedup* is gpt2fn's median over the row's (above 1: gpt2fn is faster).",
        "Decode: 16-token prompt + 128 new tokens, tokens/s over all rows of the batch, prefill included; ttft: time",
        "to the first new token. The roofline divides the measured read bandwidth by the bytes a decode step must",
        "read (every weight once, plus the KV cache).",
        "",
        f"Machine: {machine_line(out['machine'])}.",
        "",
        "```bash",
        out["command"].replace("python ", ".venv/bin/python ", 1),
        "```",
        "",
        out["table"],
        "",
    ])


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    raise SystemExit(main())

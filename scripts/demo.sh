#!/usr/bin/env bash
# The main job, on any machine: set up the environment, then generate text with gpt2fn.
#
# - If GPT-2 weights are available (the Hugging Face cache, or a download when the network allows), it loads
#   them with `gpt2fn.load("gpt2")` and generates from them.
# - Otherwise it trains a small GPT-2 from scratch for about two minutes on the CPU, on text every Python has
#   offline: the prose paragraphs of the documentation CPython ships in `pydoc_data.topics` (about 50k tokens),
#   then generates from it.
# Either way it says which weights it used.
#
#   GPT2FN_DEMO_OUT        training output directory (default: <checkout>/runs/demo; replaced on each training)
#   GPT2FN_DEMO_TRAIN=1    skip the GPT-2 lookup and train anyway
#   GPT2FN_DEMO_OFFLINE=0  also try to download GPT-2 (default: cache only, so an offline machine never waits)
#   GPT2FN_DEMO_SECONDS    training time budget in seconds (default 120)
#   GPT2FN_DEMO_THREADS    torch threads for training (default 2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
py="${GPT2FN_VENV:-$root/.venv}/bin/python"
cd "$root"
export GPT2FN_DEMO_OUT="${GPT2FN_DEMO_OUT:-$root/runs/demo}"
# Keep freed tensors in the heap instead of returning them to the kernel: a training step frees and re-allocates
# its 25 MB logits several times, and page faults on fresh memory otherwise cost a large share of each step.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"
exec "$py" - <<'PY'
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import gpt2fn
from gpt2fn.cli import main as cli

PROMPTS = ["The for statement", "A class definition", "The value of"]
out = Path(os.environ["GPT2FN_DEMO_OUT"])


def show(params, label: str, *, max_new_tokens: int, temperature: float, top_k: int,
         repetition_penalty: float | None = None) -> None:
    penalty = f", repetition penalty {repetition_penalty}" if repetition_penalty else ""
    print(f"\n=== generating with {label} (temperature {temperature}, top_k {top_k}{penalty}, seeds 0..) ===\n")
    for i, prompt in enumerate(PROMPTS):
        text = gpt2fn.generate(params, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, repetition_penalty=repetition_penalty, seed=i)
        print(f"--- {prompt!r} ->\n{prompt}{text}\n")


def pretrained():
    if os.environ.get("GPT2FN_DEMO_TRAIN") == "1":
        return None
    if os.environ.get("GPT2FN_DEMO_OFFLINE", "1") != "0":
        os.environ["HF_HUB_OFFLINE"] = "1"  # cache only: never wait on a network that is not there
    try:
        return gpt2fn.load("gpt2")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        print(f"GPT-2 weights are not available here ({str(exc).splitlines()[0][:160]}...)")
        return None


params = pretrained()
if params is not None:
    show(params, "OpenAI GPT-2 124M weights (Hugging Face cache)", max_new_tokens=40, temperature=0.8, top_k=40)
    sys.exit(0)

# --- train a small GPT-2 on CPython's own documentation text ---
from gpt2fn.train.data import pydoc_prose  # noqa: E402 - its docstring says how the text is cleaned and why

seconds = float(os.environ.get("GPT2FN_DEMO_SECONDS", "120"))
threads = int(os.environ.get("GPT2FN_DEMO_THREADS", "2"))
if out.exists():
    shutil.rmtree(out)
corpus = out / "corpus" / "pydoc_topics.txt"
corpus.parent.mkdir(parents=True)
corpus.write_text(pydoc_prose())
print(f"training a small GPT-2 from scratch for about {seconds:.0f} s on {threads} CPU threads, on CPython's "
      f"pydoc_data documentation text ({corpus.stat().st_size / 1e6:.2f} MB) -> {out}")
# --vocab corpus: the softmax spans the ~3,500 ids this text uses instead of all 50,257, which would otherwise
# cost most of each step of a model this small; generation then produces only those ids. Six layers of width
# 128 beat four of 160 in the same time (validation 5.10 against 5.30 at step 900), and a width of at most 160
# keeps each embedding-sized buffer (50,257 x d fp32) under malloc's 32 MiB mmap limit, so it is reused rather
# than page-faulted in afresh each step (192 wide spent 70 s of the two minutes in the kernel). The budget stops training early on a slower machine (the schedule assumes
# the step count below).
args = ["train", "--data", str(corpus), "--out", str(out), "--preset", "mini", "--vocab", "corpus",
        "--set", "n_layers=6", "--set", "emb_dim=128", "--set", "n_heads=4", "--context", "128",
        "--batch-size", os.environ.get("GPT2FN_DEMO_BATCH", "4"),
        "--steps", os.environ.get("GPT2FN_DEMO_STEPS", "900"), "--lr", "4e-3", "--min-lr", "2e-4",
        "--warmup", "30", "--weight-decay", "0.0", "--eval-every", "100", "--log-every", "10",
        "--val-fraction", "0.05", "--max-time", str(seconds), "--threads", str(threads), "--device", "cpu",
        "--seed", "0"]
t0 = time.perf_counter()
code = cli(args)
if code != 0:
    sys.exit(code)
records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
train_loss = [r for r in records if "loss" in r][-1]
val = [r for r in records if "val_loss" in r]
print(f"\ntrained {train_loss['step']} steps in {time.perf_counter() - t0:.0f} s: train loss {train_loss['loss']:.3f}"
      + (f", validation loss {val[-1]['val_loss']:.3f}" if val else "")
      + f" (uniform guessing over 50257 tokens is {torch.log(torch.tensor(50257.0)):.2f}); "
      f"loss curve {out / 'loss.png'}")
params = gpt2fn.load(out / "model.safetensors")
show(params, f"the small GPT-2 just trained on pydoc_data ({out / 'model.safetensors'}, "
     f"{gpt2fn.count_params(params):,} parameters)", max_new_tokens=60, temperature=0.5, top_k=10,
     repetition_penalty=1.3)  # a two-minute model reads best on its most frequent phrases
PY

"""Generation reads the weights the caller holds: no copy of them, for any head layout, shown by the peak memory
of a process decoding a model whose weights dwarf everything else (each case in a fresh subprocess)."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, sys, torch, gpt2fn
case = json.loads(sys.argv[1])
torch.set_num_threads(2)  # CPU decoding runs on two threads

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

cfg = gpt2fn.preset("tiny").replace(vocab_size=50257, context_length=64, emb_dim=256, n_heads=4, n_layers=4,
                                    **case["config"])
dtype = getattr(torch, case["dtype"])
params = gpt2fn.init_params(cfg, seed=0, dtype=dtype)
weights = sum(t.numel() * t.element_size() for t in gpt2fn.params_to_dict(params).values())
ids = torch.randint(0, 50257, (case["batch"], 6), generator=torch.Generator().manual_seed(0))

def run():
    if case["call"] == "copy, then generate_tokens":  # the control: what a decode layout (a copy) looks like
        copy = torch.utils._pytree.tree_map(torch.clone, params)
        return gpt2fn.generate_tokens(copy, ids, max_new_tokens=8)
    if case["call"] == "generate_tokens":
        return gpt2fn.generate_tokens(params, ids, max_new_tokens=8)
    if case["call"] == "generate":
        return gpt2fn.generate(params, ["Hello, it is time"] * case["batch"], max_new_tokens=8)
    if case["call"] == "stream":
        return list(gpt2fn.stream(params, "Hello, it is time", max_new_tokens=8))
    if case["call"] == "beams":
        return gpt2fn.generate_tokens(params, ids, max_new_tokens=6, num_beams=3)
    if case["call"] == "score":
        return gpt2fn.score(params, ids)

run()  # warm-up: torch's and the allocator's first-call costs are not the weights'
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset this process's peak RSS (VmHWM) to its current RSS
before = status("VmRSS")
run()
print(json.dumps({"weights": weights, "growth": status("VmHWM") - before}))
"""

_CASES = {
    "generate_tokens, tied head": dict(call="generate_tokens", config={}, dtype="float32", batch=1),
    "generate_tokens batch 8, tied head": dict(call="generate_tokens", config={}, dtype="float32", batch=8),
    "generate, untied head, no biases": dict(call="generate", config=dict(tie_head=False, bias=False,
                                                                          qkv_bias=False), dtype="float32", batch=2),
    "stream": dict(call="stream", config={}, dtype="float32", batch=1),
    "beam search": dict(call="beams", config={}, dtype="float32", batch=1),
    "score": dict(call="score", config={}, dtype="float32", batch=1),
    "generate_tokens, bf16": dict(call="generate_tokens", config={}, dtype="bfloat16", batch=1),
}


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux's /proc peak-RSS reset (clear_refs)")


def _growth(case: dict) -> dict:
    """Peak memory growth of the second call in a fresh process. glibc's mmap threshold is fixed, so a large
    buffer freed by the warm-up goes back to the system and a copy made again shows (by default glibc raises the
    threshold after the first free and keeps such buffers in its heap for reuse, which would hide it)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(case)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_proc
def test_the_probe_sees_a_copy_of_the_weights():
    """The control: a call that copies the weights shows as peak growth of about their size."""
    got = _growth(dict(call="copy, then generate_tokens", config={}, dtype="float32", batch=1))
    assert got["growth"] >= 0.8 * got["weights"], got


@needs_proc
@pytest.mark.parametrize("case", list(_CASES))
def test_decoding_adds_no_copy_of_the_weights_to_peak_memory(case):
    """The model holds 61 MiB of weights (fp32; the tied 50257-row embedding is most of it). A copy of the blocks
    or of the head, as the decode layout made before, would add 25-60 MiB to the peak; decoding itself needs a KV
    cache and a few vocabulary-wide rows of logits."""
    got = _growth(_CASES[case])
    assert got["growth"] <= 0.1 * got["weights"], (
        f"peak memory grew by {got['growth'] / 2**20:.1f} MiB while decoding {got['weights'] / 2**20:.1f} MiB of "
        f"weights ({got['growth'] / got['weights']:.0%})")

"""A CTranslate2 or llama.cpp contender for scripts/bench.py, run by the peer's own Python (scripts/setup_peers.sh
makes the environments). Standalone: the standard library, numpy and the engine; gpt2fn is not importable there.

    PY peer_worker.py convert ENGINE FORMAT HF_DIR OUT       # a saved GPT2LMHeadModel -> the engine's format
    PY peer_worker.py serve ENGINE FORMAT MODEL --threads 2  # answer JSON requests, one per line (bench.py)
    PY peer_worker.py run ENGINE FORMAT HF_DIR --batch 8     # convert, decode, time and check in one go

ENGINE / FORMAT: `ctranslate2` with `float32` or `int8_float32` (int8 weights, fp32 activations; the converter's
`--quantization`), `llama.cpp` with `F32` or `F16` (convert_hf_to_gguf.py's `--outtype`). HF_DIR holds the model
(`save_pretrained`) with GPT-2's `vocab.json` / `merges.txt`: both converters read the vocabulary from it.

`serve` requests: {"op": "generate", "prompts": [[id, ...], ...], "new_tokens": N} -> {"ids": new ids per row,
"seconds": the engine's call on this process's clock}; {"op": "logits", "prompts": ..., "out": path} -> the logits
of every position, [batch, seq, vocab] float32, saved with numpy.save; {"op": "quit"}. Replies go to the
original stdout; the engines' own output is sent to stderr so that it cannot corrupt them.

Decoding is greedy and never stops early: the end-of-text id is generated like any other, as gpt2fn's
`generate_tokens(..., eos=False)` does. Prompts in one request have equal lengths (no padding).
- CTranslate2: `Generator.generate_batch(..., include_prompt_in_result=False, sampling_topk=1, end_token=[])` (the
  prompt goes through the decoder at once, then the decoding loop; `end_token=[]` disables stopping) and
  `Generator.forward_batch` for the logits.
- llama.cpp: its C API through llama-cpp-python's bindings (`llama_batch` + `llama_decode`), as llama.cpp's
  `batched` example does: the batch's prompts in one `llama_decode`, then one token per sequence per step, a
  sequence id per row, argmax over the step's logits. llama-cpp-python's `Llama.generate` decodes one sequence only
  and runs a sampler chain per token; the C API is what serves several rows. The KV cache has the weights' type
  (F32 -> F32 cache, the fp32 contender; F16 -> F16, llama.cpp's default); flash attention is llama.cpp's default
  (auto); with several rows each sequence keeps its own cache (`kv_unified=False`, llama.h's advice when the
  sequences share no prefix). To try other settings: GPT2FN_LLAMACPP_KV_TYPE=f16|f32 (the cache's type) and
  GPT2FN_LLAMACPP_FLASH_ATTN=auto|on|off; both pass through bench.py to its workers.
"""

import argparse
import contextlib
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = {"ctranslate2": ("float32", "int8_float32"), "llama.cpp": ("F32", "F16")}


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def gguf_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: GPT2FN_LLAMACPP_CONVERT, else the sdist that setup_peers.sh unpacked
    beside this environment (the converter of the library that was built)."""
    env = os.environ.get("GPT2FN_LLAMACPP_CONVERT")
    if env:
        return Path(env)
    found = sorted(glob.glob(str(Path(sys.prefix).parent / "llamacpp-src" / "*" / "vendor" / "llama.cpp"
                                 / "convert_hf_to_gguf.py")))
    if not found:
        raise FileNotFoundError(f"no convert_hf_to_gguf.py under {Path(sys.prefix).parent / 'llamacpp-src'}; run "
                                "scripts/setup_peers.sh llamacpp or set GPT2FN_LLAMACPP_CONVERT")
    return Path(found[-1])


def convert(engine: str, fmt: str, hf_dir: Path, out: Path) -> Path:
    """Convert the saved model into `out` (a CTranslate2 model directory or a .gguf file), atomically: written
    under a temporary name and renamed when complete."""
    _check(engine, fmt)
    tmp = out.with_name(out.name + ".partial")
    if engine == "ctranslate2":
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(hf_dir)).convert(str(tmp), quantization=fmt, force=True)
    else:
        subprocess.run([sys.executable, str(gguf_converter()), str(hf_dir), "--outtype", fmt.lower(),
                        "--outfile", str(tmp)], check=True, stdout=sys.stderr)
    os.replace(tmp, out)
    return out


def _check(engine: str, fmt: str) -> None:
    if fmt not in FORMATS.get(engine, ()):
        raise ValueError(f"unknown engine/format {engine}/{fmt}; choose from {FORMATS}")


# ---------------------------------------------------------------------------------------------------------------
# Engines: generate(prompts, new) -> new ids per row; logits(prompts) -> [batch, seq, vocab]


class CT2:
    def __init__(self, model: Path, fmt: str, threads: int) -> None:
        import ctranslate2

        self.version = "ctranslate2 " + ctranslate2.__version__
        self.gen = ctranslate2.Generator(str(model), device="cpu", compute_type=fmt, intra_threads=threads,
                                         inter_threads=1)
        self.vocab = json.loads((model / "vocabulary.json").read_text())

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        res = self.gen.generate_batch(tokens, max_length=new, include_prompt_in_result=False, beam_size=1,
                                      sampling_topk=1, end_token=[])
        return [list(r.sequences_ids[0]) for r in res]

    def logits(self, prompts: list[list[int]]) -> np.ndarray:
        return np.array(self.gen.forward_batch(prompts), dtype=np.float32)


class LlamaCpp:
    def __init__(self, model: Path, fmt: str, threads: int) -> None:
        import llama_cpp as L

        self.L, self.threads, self.fmt = L, threads, fmt
        self.version = "llama-cpp-python " + L.__version__
        self._silence = L.llama_log_callback(lambda level, text, user: None)  # kept alive: C holds the pointer
        L.llama_log_set(self._silence, ctypes.c_void_p())
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.ctx: Any = None
        self.batch: Any = None  # one llama_batch per context, as large as its prefill
        self.shape = (0, 0)  # (rows, tokens per row) the context was made for

    def _context(self, rows: int, length: int) -> Any:
        """A context for `rows` sequences of up to `length` tokens each (remade when a request needs more)."""
        L = self.L
        if self.ctx is not None and rows == self.shape[0] and length <= self.shape[1]:
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
            return self.ctx
        self.close_context()
        per_seq = -(-length // 256) * 256
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = rows * per_seq, rows, rows == 1
        cp.n_batch = max(cp.n_batch, rows * length)
        cp.n_ubatch = min(cp.n_ubatch, cp.n_batch)
        cp.n_threads = cp.n_threads_batch = self.threads
        kv = os.environ.get("GPT2FN_LLAMACPP_KV_TYPE", self.fmt).upper()
        cp.type_k = cp.type_v = {"F32": L.GGML_TYPE_F32, "F16": L.GGML_TYPE_F16}[kv]
        flash = os.environ.get("GPT2FN_LLAMACPP_FLASH_ATTN", "auto")
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash]
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {rows} rows x {length} tokens")
        self.batch = L.llama_batch_init(rows * per_seq, 0, 1)
        self.shape = (rows, per_seq)
        return self.ctx

    def close_context(self) -> None:
        if self.ctx is not None:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = self.batch = None

    def _decode(self, ctx: Any, rows: list[list[int]], start: int, every: bool) -> np.ndarray:
        """One `llama_decode` of row r's tokens at positions start.. in sequence r; the logits of every token
        (`every`) or of each row's last, in row order."""
        L, batch = self.L, self.batch
        k = 0
        for s, row in enumerate(rows):
            for j, tok in enumerate(row):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, start + j, 1
                batch.seq_id[k][0] = s
                batch.logits[k] = every or j == len(row) - 1
                k += 1
        batch.n_tokens = k
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(k if every else len(rows), self.n_vocab))

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        ctx = self._context(len(prompts), len(prompts[0]) + new)
        out = [[] for _ in prompts]
        logits = self._decode(ctx, prompts, 0, every=False)
        for step in range(new):
            nxt = logits.argmax(axis=1).tolist()
            for row, tok in zip(out, nxt, strict=True):
                row.append(tok)
            if step + 1 < new:
                logits = self._decode(ctx, [[t] for t in nxt], len(prompts[0]) + step, every=False)
        return out

    def logits(self, prompts: list[list[int]]) -> np.ndarray:
        ctx = self._context(len(prompts), len(prompts[0]))
        flat = self._decode(ctx, prompts, 0, every=True).copy()
        return flat.reshape(len(prompts), len(prompts[0]), self.n_vocab)


def load(engine: str, fmt: str, model: Path, threads: int) -> CT2 | LlamaCpp:
    _check(engine, fmt)
    return (CT2 if engine == "ctranslate2" else LlamaCpp)(model, fmt, threads)


def converted_name(engine: str, fmt: str) -> str:
    return f"ct2-{fmt}" if engine == "ctranslate2" else f"model-{fmt}.gguf"


# ---------------------------------------------------------------------------------------------------------------
# Commands


def serve(engine: str, fmt: str, model: Path, threads: int) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies; fd 1 itself now points at stderr
    os.dup2(2, 1)
    peer = load(engine, fmt, model, threads)

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")

    reply({"ready": True, "engine": engine, "format": fmt, "version": peer.version, "threads": threads})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "generate":
                t0 = time.perf_counter()
                ids = peer.generate(req["prompts"], req["new_tokens"])
                reply({"ids": ids, "seconds": time.perf_counter() - t0})
            elif req["op"] == "logits":
                logits = peer.logits(req["prompts"])
                np.save(req["out"], logits)
                reply({"shape": list(logits.shape)})
            else:
                reply({"error": f"unknown op {req['op']!r}"})
        except Exception as exc:  # the parent reports it as a note and goes on without this contender
            reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def run(args: argparse.Namespace) -> int:
    """Convert, then decode `repeats` times after a warm-up; JSON on stdout: tok/s (best and median), the new ids,
    and the max abs logit error of one forward over the prompts against transformers' fp32 model."""
    hf_dir, work = Path(args.hf_dir), Path(args.work or args.hf_dir)
    model = work / converted_name(args.engine, args.format)
    if not model.exists():
        with contextlib.redirect_stdout(sys.stderr):
            convert(args.engine, args.format, hf_dir, model)
    rng = np.random.default_rng(args.batch)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompts = rng.integers(0, vocab, (args.batch, args.prompt_len)).tolist()
    ref = reference_logits(hf_dir, prompts, args.threads)
    peer = load(args.engine, args.format, model, args.threads)
    err = float(np.abs(peer.logits(prompts) - ref).max())
    peer.generate(prompts, min(4, args.new_tokens))
    secs, ids = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ids = peer.generate(prompts, args.new_tokens)
        secs.append(time.perf_counter() - t0)
    rate = [args.batch * args.new_tokens / s for s in secs]
    print(json.dumps({"engine": args.engine, "format": args.format, "version": peer.version,
                      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "threads": args.threads, "tok_s_best": max(rate), "tok_s_median": statistics.median(rate),
                      "seconds": secs, "max_abs_logit_error": err, "logit_std": float(ref.std()),
                      "prompts": prompts, "ids": ids}))
    return 0


def reference_logits(hf_dir: Path, prompts: list[list[int]], threads: int) -> np.ndarray:
    """transformers' fp32 logits over the prompts, in a child process (torch's OpenMP and the engine's stay apart)."""
    code = ("import json, sys, numpy, torch\nfrom transformers import GPT2LMHeadModel\n"
            "torch.set_num_threads(int(sys.argv[3]))\n"
            "m = GPT2LMHeadModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
            "with torch.no_grad():\n"
            "    numpy.save(sys.argv[4], m(torch.tensor(json.loads(sys.argv[2]))).logits.numpy())\n")
    out = Path(hf_dir) / "reference-logits.npy"
    subprocess.run([sys.executable, "-c", code, str(hf_dir), json.dumps(prompts), str(threads), str(out)],
                   check=True, stdout=sys.stderr)
    return np.load(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("convert", "serve", "run"):
        s = sub.add_parser(name)
        s.add_argument("engine", choices=sorted(FORMATS))
        s.add_argument("format")
        s.add_argument("hf_dir" if name != "serve" else "model")
        if name == "convert":
            s.add_argument("out")
        else:
            s.add_argument("--threads", type=int, default=2)
        if name == "run":
            s.add_argument("--work", default=None, help="where the converted model goes (default: HF_DIR)")
            s.add_argument("--batch", type=int, default=1)
            s.add_argument("--prompt-len", type=int, default=16)
            s.add_argument("--new-tokens", type=int, default=128)
            s.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "convert":
        convert(args.engine, args.format, Path(args.hf_dir), Path(args.out))
        return 0
    if args.cmd == "serve":
        return serve(args.engine, args.format, Path(args.model), args.threads)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

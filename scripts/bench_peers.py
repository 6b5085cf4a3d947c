"""The peers gpt2fn is measured against, built on the same random weights as a gpt2fn parameter tree.

- `SeedGPT`: the seed repository's from-scratch `GPTModel` (an `nn.Module`: separate W_query/W_key/W_value
  `nn.Linear`s, explicit masked softmax, hand-written LayerNorm and GELU), with `seed_greedy`, the seed's
  no-cache decoding loop (the whole sequence goes through the model again for every new token).
- `NanoGPT`: a nanoGPT-style module (fused c_attn, SDPA, tied head) for the training-step baseline.
- `hf_model`: `transformers.GPT2LMHeadModel` holding the same weights (Conv1D stores `[in, out]`, as gpt2fn).
- `EngineWorker`: CTranslate2 or llama.cpp in an environment of its own (scripts/setup_peers.sh), converted from
  the saved `GPT2LMHeadModel` (`save_hf_dir`) and served by scripts/peer_worker.py in a child process.

Each builder copies the weights out of a gpt2fn `GPTParams`, so every contender computes the same function and
greedy decoding gives the same ids (checked by the benchmark). Benchmark helpers only: nothing in gpt2fn imports
this module.
"""

import contextlib
import itertools
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gpt2fn
from gpt2fn import GPTConfig, GPTParams

__all__ = ["SeedGPT", "seed_greedy", "seed_from_params", "seed_state_dict", "NanoGPT", "nano_from_params",
           "hf_model", "hf_from_params", "EnginePeer", "ENGINE_PEERS", "engine_python", "gpt2_tokenizer_files",
           "save_hf_dir", "EngineWorker", "start_engines"]


# ---------------------------------------------------------------------------------------------------------------
# The seed's from-scratch GPTModel (layout and code style of the seed's model.py)


class _LayerNorm(nn.Module):
    def __init__(self, emb_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class _GELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class _FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg.emb_dim, cfg.d_mlp), _GELU(), nn.Linear(cfg.d_mlp, cfg.emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.d_out, self.num_heads, self.head_dim = d, cfg.n_heads, cfg.head_dim
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.register_buffer("mask", torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1))

    def forward(self, x: Tensor) -> Tensor:
        b, num_tokens, _ = x.shape
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
        context = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


class _TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = _MultiHeadAttention(cfg)
        self.ff = _FeedForward(cfg)
        self.norm1 = _LayerNorm(cfg.emb_dim, cfg.ln_eps)
        self.norm2 = _LayerNorm(cfg.emb_dim, cfg.ln_eps)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class SeedGPT(nn.Module):
    """The seed's `GPTModel`: embeddings, blocks, final norm, `out_head` (tied to `tok_emb` when the config says)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[_TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = _LayerNorm(cfg.emb_dim, cfg.ln_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.out_head.weight = self.tok_emb.weight

    def forward(self, in_idx: Tensor) -> Tensor:
        seq_len = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.final_norm(self.trf_blocks(self.drop_emb(x)))
        return self.out_head(x)


def seed_greedy(model: nn.Module, idx: Tensor, max_new_tokens: int, context_size: int) -> Tensor:
    """The seed's `generate_tokens_greedy`: no cache, the whole (cropped) sequence through the model per token."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def seed_state_dict(params: GPTParams) -> dict[str, Tensor]:
    """The seed's state-dict names and `[out, in]` orientation for a gpt2fn tree (mask buffers included)."""
    cfg = params.config
    d = cfg.emb_dim
    sd: dict[str, Tensor] = {"tok_emb.weight": params.tok_emb, "pos_emb.weight": params.pos_emb}
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1).to(params.dtype)
    for i, b in enumerate(params.blocks):
        p = f"trf_blocks.{i}."
        w_q, w_k, w_v = b.attn.w_qkv.split(d, dim=1)
        for name, w in (("W_query", w_q), ("W_key", w_k), ("W_value", w_v)):
            sd[p + f"att.{name}.weight"] = w.T.contiguous()
        if b.attn.b_qkv is not None:
            for name, bias in zip(("W_query", "W_key", "W_value"), b.attn.b_qkv.split(d), strict=True):
                sd[p + f"att.{name}.bias"] = bias.clone()
        sd[p + "att.out_proj.weight"] = b.attn.w_out.T.contiguous()
        sd[p + "att.out_proj.bias"] = _bias(b.attn.b_out, d, params)
        sd[p + "att.mask"] = mask.clone()  # one buffer per layer, as the seed's module saves them
        sd[p + "ff.layers.0.weight"] = b.mlp.w_fc.T.contiguous()
        sd[p + "ff.layers.0.bias"] = _bias(b.mlp.b_fc, cfg.d_mlp, params)
        sd[p + "ff.layers.2.weight"] = b.mlp.w_proj.T.contiguous()
        sd[p + "ff.layers.2.bias"] = _bias(b.mlp.b_proj, d, params)
        for n, norm in (("norm1", b.norm1), ("norm2", b.norm2)):
            sd[p + f"{n}.scale"] = norm.scale
            sd[p + f"{n}.shift"] = _bias(norm.shift, d, params)
    sd["final_norm.scale"] = params.final_norm.scale
    sd["final_norm.shift"] = _bias(params.final_norm.shift, d, params)
    sd["out_head.weight"] = params.tok_emb if params.head is None else params.head.T.contiguous()
    return sd


def _bias(b: Tensor | None, n: int, params: GPTParams) -> Tensor:
    return torch.zeros(n, dtype=params.dtype, device=params.device) if b is None else b


def seed_from_params(params: GPTParams) -> SeedGPT:
    """A `SeedGPT` in eval mode holding `params`' weights (same device and dtype)."""
    model = SeedGPT(params.config).to(device=params.device, dtype=params.dtype)
    sd = seed_state_dict(params)
    if params.config.tie_head:
        sd.pop("out_head.weight")
    _load(model, sd, allowed_missing={"out_head.weight"} if params.config.tie_head else set())
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# nanoGPT-style module: the training baseline


class _NanoBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.ln_1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.c_fc = nn.Linear(d, cfg.d_mlp)
        self.mlp_proj = nn.Linear(cfg.d_mlp, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (no dropout): fused q/k/v, SDPA, head tied to `wte`; `forward(idx, targets) -> loss`."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.h = nn.ModuleList([_NanoBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def nano_from_params(params: GPTParams) -> NanoGPT:
    """A `NanoGPT` in train mode holding `params`' weights (the config must have biases and a tied head)."""
    cfg = params.config
    if not (cfg.tie_head and cfg.qkv_bias and cfg.bias):
        raise ValueError(f"NanoGPT needs tie_head, qkv_bias and bias; got {cfg}")
    model = NanoGPT(cfg).to(device=params.device, dtype=params.dtype)
    sd: dict[str, Tensor] = {"wte.weight": params.tok_emb, "wpe.weight": params.pos_emb,
                             "ln_f.weight": params.final_norm.scale, "ln_f.bias": params.final_norm.shift}
    for i, b in enumerate(params.blocks):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": b.norm1.scale, p + "ln_1.bias": b.norm1.shift,
                   p + "c_attn.weight": b.attn.w_qkv.T, p + "c_attn.bias": b.attn.b_qkv,
                   p + "c_proj.weight": b.attn.w_out.T, p + "c_proj.bias": b.attn.b_out,
                   p + "ln_2.weight": b.norm2.scale, p + "ln_2.bias": b.norm2.shift,
                   p + "c_fc.weight": b.mlp.w_fc.T, p + "c_fc.bias": b.mlp.b_fc,
                   p + "mlp_proj.weight": b.mlp.w_proj.T, p + "mlp_proj.bias": b.mlp.b_proj})
    _load(model, sd)
    return model.train()


# ---------------------------------------------------------------------------------------------------------------
# transformers.GPT2LMHeadModel


def hf_model(cfg: GPTConfig, **kwargs: Any) -> Any:
    """An untrained `GPT2LMHeadModel` shaped like `cfg` (SDPA attention, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (cfg.tie_head and cfg.qkv_bias and cfg.bias and cfg.mlp_dim is None):
        raise ValueError(f"GPT2LMHeadModel needs tie_head, qkv_bias, bias and the default mlp_dim; got {cfg}")
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, layer_norm_epsilon=cfg.ln_eps,
                        activation_function="gelu_new" if cfg.gelu == "tanh" else "gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=min(50256, cfg.vocab_size - 1), eos_token_id=min(50256, cfg.vocab_size - 1),
                        **kwargs)
    return GPT2LMHeadModel(hf_cfg)


def hf_from_params(params: GPTParams, **kwargs: Any) -> Any:
    """A `GPT2LMHeadModel` in eval mode holding `params`' weights (same device and dtype)."""
    model = hf_model(params.config, attn_implementation="sdpa", **kwargs)
    model = model.to(device=params.device, dtype=params.dtype)
    sd: dict[str, Tensor] = {"transformer.wte.weight": params.tok_emb, "transformer.wpe.weight": params.pos_emb,
                             "transformer.ln_f.weight": params.final_norm.scale,
                             "transformer.ln_f.bias": params.final_norm.shift}
    for i, b in enumerate(params.blocks):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": b.norm1.scale, p + "ln_1.bias": b.norm1.shift,
                   p + "attn.c_attn.weight": b.attn.w_qkv, p + "attn.c_attn.bias": b.attn.b_qkv,
                   p + "attn.c_proj.weight": b.attn.w_out, p + "attn.c_proj.bias": b.attn.b_out,
                   p + "ln_2.weight": b.norm2.scale, p + "ln_2.bias": b.norm2.shift,
                   p + "mlp.c_fc.weight": b.mlp.w_fc, p + "mlp.c_fc.bias": b.mlp.b_fc,
                   p + "mlp.c_proj.weight": b.mlp.w_proj, p + "mlp.c_proj.bias": b.mlp.b_proj})
    _load(model, sd, allowed_missing={"lm_head.weight"})
    model.generation_config.eos_token_id = None  # random weights: never stop early, always decode every token
    model.generation_config.pad_token_id = 0
    return model.eval()


def _load(model: nn.Module, sd: dict[str, Tensor], allowed_missing: set[str] = frozenset()) -> None:
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in allowed_missing and not k.endswith("attn.bias")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{type(model).__name__}: missing {missing}, unexpected {result.unexpected_keys}")


def same_weights_check(params: GPTParams, ids: Tensor) -> dict[str, float]:
    """Max |logit difference| of each peer against gpt2fn.forward on `ids` (fp32 sanity check)."""
    with torch.inference_mode():
        ref = gpt2fn.forward(params, ids)
        out = {"seed": (seed_from_params(params)(ids) - ref).abs().max().item()}
        try:
            out["transformers"] = (hf_from_params(params)(ids).logits - ref).abs().max().item()
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------
# CTranslate2 and llama.cpp: in environments of their own, served by scripts/peer_worker.py

WORKER = Path(__file__).resolve().parent / "peer_worker.py"
GPT2_VOCAB = 50257


@dataclass(frozen=True)
class EnginePeer:
    """One contender served by peer_worker.py: its label in the tables, the engine and its stored format, the
    gpt2fn decode formats whose cases it joins (bench.py's DTYPES) and the accuracy case it is set against. The
    fp32 ones compute what gpt2fn's fp32 decoding does, so their greedy ids are held against gpt2fn's."""

    label: str
    engine: str  # "ctranslate2" | "llama.cpp"
    format: str  # ctranslate2: "float32" | "int8_float32"; llama.cpp: "F32" | "F16"
    cases: tuple[str, ...]
    error_case: str


ENGINE_PEERS = (EnginePeer("ctranslate2 fp32", "ctranslate2", "float32", ("fp32",), "fp32"),
                EnginePeer("ctranslate2 int8", "ctranslate2", "int8_float32", ("int8",), "int8"),
                EnginePeer("llama.cpp F32", "llama.cpp", "F32", ("fp32",), "fp32"),
                EnginePeer("llama.cpp F16", "llama.cpp", "F16", ("bf16", "fp16"), "fp16"))
# engine -> (the variable naming its Python, its environment's folder under the peers directory)
_ENGINE_ENV = {"ctranslate2": ("GPT2FN_CT2_PYTHON", "ct2"), "llama.cpp": ("GPT2FN_LLAMACPP_PYTHON", "llamacpp")}


def engine_python(engine: str) -> tuple[Path | None, str]:
    """(the Python of `engine`'s environment, "") or (None, why not): the variable GPT2FN_CT2_PYTHON /
    GPT2FN_LLAMACPP_PYTHON, else `<peers dir>/ct2|llamacpp/bin/python`, where the peers dir is GPT2FN_PEERS_DIR or
    `<checkout>/.peers` (scripts/setup_peers.sh makes both)."""
    var, folder = _ENGINE_ENV[engine]
    if os.environ.get(var):
        py = Path(os.environ[var])
        return (py, "") if py.is_file() else (None, f"{var}={py} is not a file")
    peers = Path(os.environ.get("GPT2FN_PEERS_DIR") or Path(__file__).resolve().parents[1] / ".peers")
    py = peers / folder / "bin" / "python"
    if py.is_file():
        return py, ""
    return None, f"no {py} (run scripts/setup_peers.sh {folder}, or set {var})"


def gpt2_tokenizer_files(directory: Path) -> None:
    """GPT-2's `vocab.json` and `merges.txt` from the BPE table gpt2fn reads (`gpt2fn.tokenizer.bpe_path`): the
    converters of CTranslate2 and llama.cpp take the vocabulary from the model directory.

    The tiktoken table lists each token's bytes with its rank; the id is the rank, the vocab key the bytes through
    GPT-2's byte-to-unicode map. A merge is recovered from its rank: the token of rank r is what byte-pair merging
    of its bytes with the merges ranked below r leaves as exactly two parts, and those two parts are merge r - 256
    (OpenAI's `merges.txt` order)."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from gpt2fn.tokenizer import BPE_SHA256, EOT, EOT_TEXT, bpe_path

    path = bpe_path()
    if not path.is_file():
        raise FileNotFoundError(f"the GPT-2 BPE table is not at {path}; run `python -m gpt2fn.tokenizer fetch`")
    ranks = load_tiktoken_bpe(str(path), expected_hash=BPE_SHA256)
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, below=rank)
        if len(parts) != 2:
            raise ValueError(f"BPE table token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(token): rank for token, rank in ranks.items()} | {EOT_TEXT: EOT}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
         "unk_token": EOT_TEXT, "add_prefix_space": False}))


def _bpe(ranks: dict[bytes, int], token: bytes, *, below: int) -> list[bytes]:
    """Byte-pair merging of `token`'s bytes with the merges of rank < `below`, lowest rank first."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b, below), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank >= below:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def save_hf_dir(params: GPTParams, directory: Path) -> Path:
    """`params` as a saved fp32 `GPT2LMHeadModel` (safetensors + config.json) with GPT-2's tokenizer files: what
    ct2-transformers-converter and convert_hf_to_gguf.py read. Needs GPT-2's vocabulary of 50257 ids."""
    cfg = params.config
    if cfg.vocab_size != GPT2_VOCAB or cfg.n_tokens != GPT2_VOCAB:
        raise ValueError(f"the CTranslate2 and llama.cpp converters read GPT-2's tokenizer ({GPT2_VOCAB} ids); this "
                         f"config has vocab_size {cfg.vocab_size} (use e.g. --vocab-size {GPT2_VOCAB})")
    fp32 = gpt2fn.tree_to(params, device="cpu", dtype=torch.float32)
    hf_from_params(fp32).save_pretrained(directory)
    # OpenAI's released config.json names the context twice; convert_hf_to_gguf.py reads `n_ctx`, which
    # transformers 5 no longer writes
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}, indent=2))
    gpt2_tokenizer_files(directory)
    return directory


class EngineWorker:
    """One `EnginePeer` in a child process of its own Python: converted from `hf_dir` into `work_dir`, loaded
    once, then asked for greedy decodes and logits over JSON lines. `last_seconds` is the engine's own time of the
    last decode (its clock around the call, without the pipe). The child's output goes to a log in `work_dir`."""

    def __init__(self, peer: EnginePeer, python: Path, hf_dir: Path, work_dir: Path, *, threads: int) -> None:
        self.peer, self.work_dir = peer, work_dir
        slug = f"{peer.engine}-{peer.format}"
        self.log_path = work_dir / f"{slug}.log"
        self._log: IO[str] = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        model = work_dir / (f"ct2-{peer.format}" if peer.engine == "ctranslate2" else f"model-{peer.format}.gguf")
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
        self.proc: subprocess.Popen[str] | None = None
        try:
            subprocess.run([str(python), str(WORKER), "convert", peer.engine, peer.format, str(hf_dir), str(model)],
                           stdout=self._log, stderr=self._log, check=True, env=env)
            self.proc = subprocess.Popen([str(python), str(WORKER), "serve", peer.engine, peer.format, str(model),
                                          "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, text=True, env=env)
            self.info = self._read()
        except Exception:
            self.close()
            raise
        self.last_seconds = float("nan")

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.peer.label} worker exited ({self.tail()})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.peer.label}: {msg['error']}")
        return msg

    def request(self, **msg: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def generate(self, ids: Tensor, new: int) -> Tensor:
        """Greedy decoding of `new` tokens after each row of `ids`: `[batch, seq + new]`, as gpt2fn returns."""
        got = self.request(op="generate", prompts=ids.tolist(), new_tokens=new)
        self.last_seconds = got["seconds"]
        return torch.cat([ids.cpu(), torch.tensor(got["ids"], dtype=ids.dtype)], dim=1)

    def logits(self, ids: Tensor) -> Tensor:
        out = self.work_dir / f"{self.peer.engine}-{self.peer.format}-logits.npy"
        self.request(op="logits", prompts=ids.tolist(), out=str(out))
        return torch.from_numpy(np.load(out))

    def tail(self, lines: int = 5) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "no output"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):  # a child that died has closed its end
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_engines(params: GPTParams, work_dir: Path, *, threads: int,
                  peers: tuple[EnginePeer, ...] = ENGINE_PEERS) -> tuple[dict[str, EngineWorker], list[str]]:
    """Every peer whose environment is present, converted from `params` and started; (workers by label, notes on
    each one skipped and why). The caller closes the workers."""
    notes: list[str] = []
    pythons = {}
    for engine in dict.fromkeys(p.engine for p in peers):
        labels = [p.label for p in peers if p.engine == engine]
        py, why = engine_python(engine)
        if py is None:
            notes.append(f"decode: {', '.join(labels)} skipped: {why}")
        else:
            pythons.update(dict.fromkeys(labels, py))
    if not pythons:
        return {}, notes
    hf_dir = work_dir / "hf"
    try:
        save_hf_dir(params, hf_dir)
    except (ValueError, FileNotFoundError) as exc:
        return {}, notes + [f"decode: {', '.join(pythons)} skipped: {exc}"]
    workers: dict[str, EngineWorker] = {}
    for peer in peers:
        if peer.label not in pythons:
            continue
        try:
            workers[peer.label] = EngineWorker(peer, pythons[peer.label], hf_dir, work_dir, threads=threads)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            log = work_dir / f"{peer.engine}-{peer.format}.log"
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) if log.exists() else ""
            notes.append(f"decode: {peer.label} failed to start ({exc}; {tail})")
    return workers, notes

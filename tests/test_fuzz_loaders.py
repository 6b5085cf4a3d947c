"""Fuzzing the loaders: small valid checkpoints of every layout, mutated by a seeded mutator, must each either
load and give finite logits of the right shape, or raise one CheckpointError naming the file -- within a time
limit (a hang is a failure).

Mutations: truncation; byte flips in the structural parts (safetensors header, the pickle of a torch.save
archive or of a legacy pickle, JSON files); the safetensors header length and tensor offsets/shapes/dtypes;
JSON config values of the wrong type or absurd (infinity, NaN, bools, lists, deep nesting); tensors of the wrong
rank, shape or dtype; missing, extra and renamed keys, key names with huge block indices; the last block removed;
sharded-index values of the wrong type; archive members and shard files removed. Tensor payload bytes are not
flipped: a flipped exponent is a valid, finite-looking checkpoint of another model.

`GPT2FN_FUZZ_CASES` (default 12 per layout) sets the number of mutated files per layout.
"""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from reference_models import NanoGPT, SeedGPTModel, randomize
from safetensors import safe_open
from safetensors.torch import save_file

import gpt2fn
from gpt2fn import CheckpointError, forward, init_params, load, save
from gpt2fn.checkpoints import save_hf

CASES = int(os.environ.get("GPT2FN_FUZZ_CASES", "12"))
LIMIT_S = 10
VOCAB, CTX, D = 61, 16, 64


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"load did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------------------
# Valid checkpoints of every layout: each writer fills a directory and returns the path to load


def _hf(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=2, n_head=2, tie_word_embeddings=tie,
                     bos_token_id=0, eos_token_id=0)
    return randomize(GPT2LMHeadModel(cfg), seed=1)


def _seed_cfg() -> dict:
    return dict(vocab_size=VOCAB, context_length=CTX, emb_dim=D, n_heads=2, n_layers=2, drop_rate=0.1, qkv_bias=True)


def _native(tie: bool) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        cfg = gpt2fn.GPTConfig(vocab_size=VOCAB, context_length=CTX, emb_dim=D, n_heads=2, n_layers=2, tie_head=tie)
        return save(init_params(cfg, seed=0), d / "model.safetensors")
    return write


def _save_hf(d: Path) -> Path:
    return save_hf(init_params(gpt2fn.preset("tiny"), seed=0), d / "hf")


def _pretrained(form: str) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        model, out = _hf(tie=form != "untied"), d / "hf"
        if form == "sharded":
            model.save_pretrained(out, max_shard_size="20KB")
        elif form == "bin":
            model.save_pretrained(out, safe_serialization=False)
        elif form == "bare":
            out.mkdir()
            sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
            return out / "model.safetensors"
        else:
            model.save_pretrained(out)
        return out
    return write


def _seed(form: str) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        sd = randomize(SeedGPTModel(_seed_cfg()), seed=2).state_dict()
        obj = {"model_state_dict": sd, "config": _seed_cfg(), "epoch": 3} if form == "wrapped" else sd
        torch.save(obj, d / "model.pth", _use_new_zipfile_serialization=form != "legacy")
        return d / "model.pth"
    return write


def _nano(bias: bool) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        args = dict(n_layer=2, n_head=2, n_embd=D, block_size=CTX, bias=bias, vocab_size=VOCAB)
        model = randomize(NanoGPT(**args), seed=3)
        torch.save({"model": model.state_dict(), "model_args": {**args, "dropout": 0.0}, "iter_num": 5},
                   d / "ckpt.pt")
        return d / "ckpt.pt"
    return write


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "gpt2fn-tied": _native(True), "gpt2fn-untied": _native(False), "save_hf": _save_hf,
    "hf-pretrained": _pretrained("dir"), "hf-untied": _pretrained("untied"), "hf-bin": _pretrained("bin"),
    "hf-sharded": _pretrained("sharded"), "hf-bare": _pretrained("bare"),
    "seed-raw": _seed("raw"), "seed-wrapped": _seed("wrapped"), "seed-legacy": _seed("legacy"),
    "nanogpt-bias": _nano(True), "nanogpt-nobias": _nano(False),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for name, write in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, write(d))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The mutator

_ODD_VALUES = [float("inf"), float("-inf"), float("nan"), True, False, None, "abc", "", [1], ["gelu"], {"a": 1},
               -1, 0, 10**30, 1.5, 1e308]
_DEEP = "__DEEP__"


def _dumps(obj) -> str:
    return json.dumps(obj).replace(json.dumps(_DEEP), "[" * 100_000 + "]" * 100_000)


def _mutate_dict(rng: random.Random, cfg: dict, pickled: bool) -> dict:
    cfg = dict(cfg)
    op = rng.choice(["value", "value", "drop", "add", "deep"])
    keys = list(cfg) or ["n_head"]
    key = rng.choice(keys)
    if op == "drop":
        cfg.pop(key, None)
    elif op == "add":
        cfg[rng.choice(["n_layer", "n_layers", "n_head", "n_heads", "scale_attn_weights", "model_type"])] = \
            rng.choice(_ODD_VALUES)
    elif op == "deep":
        cfg[key] = _nest(300) if pickled else _DEEP
    else:
        cfg[key] = rng.choice(_ODD_VALUES)
    return cfg


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _block_keys(sd: dict) -> list[str]:
    return [k for k in sd if any(part.isdigit() for part in k.split("."))]


def _mutate_tensors(rng: random.Random, sd: dict) -> dict:
    sd = dict(sd)
    keys = list(sd)
    key = rng.choice(keys)
    t = sd[key]
    op = rng.choice(["drop", "extra", "huge", "rank", "rank", "shape", "dtype", "rename", "last-block"])
    if op == "drop":
        del sd[key]
    elif op == "extra":
        sd[key.replace("weight", "weight2") if "weight" in key else key + ".x"] = t.clone()
    elif op == "huge":
        blocks = _block_keys(sd) or keys
        k = rng.choice(blocks)
        index = rng.choice(["1000000000000000000000000000000", "9" * 5000, "7", "123456"])
        parts = k.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        sd[".".join(parts[:i] + [index] + parts[i + 1:])] = sd[k].clone()
    elif op == "rank":
        sd[key] = rng.choice([t.reshape(-1), t.reshape(-1)[0].clone(), t[None], t.reshape(-1)[:0]]).contiguous()
    elif op == "shape":
        dim = rng.randrange(t.ndim) if t.ndim else 0
        sd[key] = t.narrow(dim, 0, max(t.shape[dim] - rng.choice([1, 2]), 0)).contiguous() if t.ndim else t[None]
    elif op == "dtype":
        sd[key] = t.to(rng.choice([torch.int32, torch.int64, torch.bool, torch.float64, torch.float16]))
    elif op == "rename":
        blocks = _block_keys(sd)
        if blocks:
            k = rng.choice(blocks)
            sd[k.replace(".0.", ".5.").replace(".1.", ".3.")] = sd.pop(k)
    else:  # every key of the highest block index removed
        last = max((int(p) for k in _block_keys(sd) for p in k.split(".") if p.isdigit()), default=None)
        sd = {k: v for k, v in sd.items() if f".{last}." not in f".{k}."}
    return {k: v.contiguous() if v.ndim else v.clone() for k, v in sd.items()}


def _flip(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        if hi > lo:
            i = rng.randrange(lo, hi)
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _mutate_safetensors(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    op = rng.choice(["tensors", "tensors", "meta", "flip", "length", "offsets", "truncate"])
    if op in ("tensors", "meta"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if op == "meta" and "gpt2fn.config" in meta:
            cfg = _mutate_dict(rng, json.loads(meta["gpt2fn.config"]), pickled=False)
            meta["gpt2fn.config"] = _dumps(cfg)
        else:
            sd = _mutate_tensors(rng, sd)
        save_file(sd, str(path), metadata=meta)
    elif op == "flip":
        path.write_bytes(_flip(rng, data, 0, 8 + hlen))
    elif op == "length":
        new = rng.choice([0, 1, hlen - 1, hlen + 1, hlen + 8, len(data), 2**63, 2**64 - 1])
        path.write_bytes(struct.pack("<Q", new) + data[8:])
    elif op == "offsets":
        header = json.loads(data[8:8 + hlen])
        name = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[name]
        field = rng.choice(["data_offsets", "shape", "dtype"])
        entry[field] = {"data_offsets": [rng.choice([0, 4, 10**12]), rng.choice([0, 8, 10**12])],
                        "shape": rng.choice([[], [0], [10**12, 10**12], [-1], ["a"]]),
                        "dtype": rng.choice(["I64", "BOOL", "F64", "X9", 5])}[field]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + hlen:])
    else:
        path.write_bytes(data[:rng.randrange(len(data))])


def _mutate_torch(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    zipped = data[:4] == b"PK\x03\x04"
    op = rng.choice(["tensors", "tensors", "meta", "flip", "truncate"] + (["member"] if zipped else []))
    if op in ("tensors", "meta"):
        obj = torch.load(path, weights_only=True)
        holder = next((k for k in ("model", "model_state_dict") if isinstance(obj, dict) and k in obj), None)
        meta_key = next((k for k in ("model_args", "config") if isinstance(obj, dict) and k in obj), None)
        if op == "meta" and meta_key:
            obj[meta_key] = _mutate_dict(rng, obj[meta_key], pickled=True)
        elif holder:
            obj[holder] = _mutate_tensors(rng, obj[holder])
        else:
            obj = _mutate_tensors(rng, obj)
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    elif op == "truncate":
        path.write_bytes(data[:rng.randrange(len(data))])
    elif not zipped:  # a legacy pickle: flip bytes before the raw storages at its end
        obj = torch.load(path, weights_only=True)
        sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else {}
        payload = sum(t.untyped_storage().nbytes() for t in sd.values() if isinstance(t, torch.Tensor))
        path.write_bytes(_flip(rng, data, 0, max(len(data) - payload, 1)))
    else:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = z.namelist()
        drop = rng.choice(names) if op == "member" else None
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
            for n in names:
                if n == drop:
                    continue
                content = z.read(n)
                if op == "flip" and n.endswith("data.pkl"):
                    content = _flip(rng, content, 0, len(content))
                w.writestr(n, content)
        path.write_bytes(out.getvalue())


def _mutate_json(rng: random.Random, path: Path) -> None:
    text = path.read_text()
    op = rng.choice(["dict", "dict", "dict", "flip", "truncate", "top"])
    if op == "dict":
        obj = json.loads(text)
        if "weight_map" in obj:
            wm = dict(obj["weight_map"])
            k = rng.choice(list(wm))
            wm[k] = rng.choice([5, None, ["a"], "../model.safetensors", "absent.safetensors", _DEEP])
            obj["weight_map"] = wm
        else:
            obj = _mutate_dict(rng, obj, pickled=False)
        path.write_text(_dumps(obj))
    elif op == "flip":
        path.write_bytes(_flip(rng, text.encode(), 0, len(text)))
    elif op == "truncate":
        path.write_text(text[:rng.randrange(len(text))])
    else:
        path.write_text(rng.choice(["[1, 2]", "null", "5", _dumps(_DEEP)]))


def mutate(rng: random.Random, root: Path) -> str:
    """Apply one mutation to one file under `root`; returns what was done (for the failure message)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pth", ".pt",
                                                                                ".bin", ".json"))
    files = [p for p in files if p.name != "generation_config.json"]
    path = rng.choice(files)
    if path.suffix == ".json":
        _mutate_json(rng, path)
    elif rng.random() < 0.05 and len(files) > 2:
        path.unlink()  # a shard (or the weights) removed
        return f"removed {path.name}"
    elif path.suffix == ".safetensors":
        _mutate_safetensors(rng, path)
    else:
        _mutate_torch(rng, path)
    return f"mutated {path.name}"


# ---------------------------------------------------------------------------------------------------------------


def check_case(target: Path, what: str) -> str:
    try:
        with time_limit(LIMIT_S):
            params = load(target)
    except CheckpointError as exc:
        assert str(target) in str(exc), f"{what}: the error does not name {target}: {exc}"
        return "refused"
    cfg = params.config
    ids = (torch.arange(min(4, cfg.context_length)) % cfg.vocab_size)[None]
    logits = forward(params, ids)
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size), what
    assert torch.isfinite(logits).all(), f"{what}: loaded, but the logits are not finite"
    return "loaded"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mutated_checkpoints_load_finite_or_raise_one_checkpoint_error(originals, tmp_path, layout):
    directory, path = originals[layout]
    assert check_case(path, "the unmutated file") == "loaded"
    rng = random.Random(f"{layout}-16")
    outcomes = []
    for case in range(CASES):
        root = tmp_path / f"case{case}"
        shutil.copytree(directory, root)
        target = root / path.relative_to(directory)
        what = f"{layout} case {case}: " + mutate(rng, root)
        try:
            outcomes.append(check_case(target, what))
        except CheckpointError:
            raise
        except AssertionError:
            raise
        except Exception as exc:  # anything else escaping load is the defect this test is for
            raise AssertionError(f"{what}: {type(exc).__name__} escaped: {exc}") from exc
        shutil.rmtree(root)
    assert "refused" in outcomes, f"{layout}: no mutation was refused; the mutator does nothing"

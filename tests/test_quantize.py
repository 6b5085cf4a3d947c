"""16-bit and int8 weights: the kernel's products against the fp32 product of the widened (dequantized) weights,
`quantize`'s error bound per column, decoding a quantized tree equal to decoding its dequantized copy, saving and
loading, the refusals, and the fallbacks (torch's product under autograd, without the kernel)."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2fn
from gpt2fn import native
from gpt2fn.kernels import affine, affine_t, native_applies
from gpt2fn.quantize import QuantizedWeightsError, quantize_matrix

needs_native = pytest.mark.skipif(not native.available(), reason=f"the native kernel is {native.status()}")
HALF = [torch.bfloat16, torch.float16]


def _stored(w: torch.Tensor, kind: str, axis: int = 1):
    """`w` in the stored format `kind`, and the fp32 matrix it stands for."""
    if kind == "int8":
        m = quantize_matrix(w, axis=axis)
        return m, m.dequantize()
    h = w.to(getattr(torch, kind))
    return h, h.float()


def _tolerance(kind: str, x: torch.Tensor, wide_in_out: torch.Tensor) -> torch.Tensor:
    """How far the kernel's product may be from the fp32 product of the widened weights, per output: fp32 rounding,
    plus for int8 on the integer path (`native.int8_integer`) the rounding of each input row to 16-bit integers,
    at most half a step `max|x| / amax` per element, amax = min(32767, (2**31 - 1) // 127 // K), times
    sum_k |w[k, c]|."""
    fp = 1e-4 + 1e-5 * (x.abs() @ wide_in_out.abs())
    if kind != "int8" or not native.int8_integer():
        return fp
    amax = min(32767, (2**31 - 1) // 127 // x.shape[-1])
    step = x.abs().amax(-1, keepdim=True) / amax
    return fp + 0.5 * step * wide_in_out.abs().sum(0)[None] * (1 + 1e-5)


@needs_native
@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["bfloat16", "float16", "int8"]), rows=st.integers(1, 80), d_in=st.integers(1, 81),
       d_out=st.integers(1, 150), bias=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_16_and_8_bit_products_equal_the_widened_fp32_product(threads, kind, rows, d_in, d_out, bias, seed):
    """Rows 1..80, odd and even widths, 1 and 2 threads: read in place by the kernel, widened in registers; the
    bias fp32 or stored in 16 bits (a 16-bit tree's), widened by the kernel too."""
    g = torch.Generator().manual_seed(seed)
    w, wide = _stored(torch.randn(d_in, d_out, generator=g), kind)
    b = None if bias is None else torch.randn(d_out, generator=g).to(bias)
    x = torch.randn(rows, d_in, generator=g)
    assert native_applies(x, w, b)
    want = x @ wide if b is None else x @ wide + b.float()
    err = (affine(x, w, b) - want).abs()
    assert bool((err <= _tolerance(kind, x, wide)).all()), float((err - _tolerance(kind, x, wide)).max())


@needs_native
@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["bfloat16", "float16", "int8"]), rows=st.integers(1, 40), d_in=st.integers(1, 100),
       vocab=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_16_and_8_bit_tied_heads_equal_the_widened_fp32_product(threads, kind, rows, d_in, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    e, wide = _stored(torch.randn(vocab, d_in, generator=g), kind, axis=0)
    x = torch.randn(rows, d_in, generator=g)
    assert native_applies(x, e)
    err = (affine_t(x, e) - x @ wide.T).abs()
    assert bool((err <= _tolerance(kind, x, wide.T)).all()), float((err - _tolerance(kind, x, wide.T)).max())


@needs_native
@pytest.mark.skipif(not native.int8_integer(), reason="int8 products widen to fp32 on this CPU (no AVX-512BW)")
@pytest.mark.parametrize("head", [False, True])
def test_int8_integer_products_are_exact_sums_independent_of_threads_and_rows(head):
    """On the integer path every output is an exact int32 sum times two scales: the same bits on 1 and 2 threads,
    for a row alone and inside a batch, and a row holding inf or NaN makes only its own outputs NaN."""
    g = torch.Generator().manual_seed(0)
    m = quantize_matrix(torch.randn(300, 96, generator=g) if head else torch.randn(96, 300, generator=g),
                        axis=0 if head else 1)
    b = None if head else torch.randn(300, generator=g)
    x = torch.randn(9, 96, generator=g)
    product = (lambda v: affine_t(v, m)) if head else (lambda v: affine(v, m, b))
    outs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(product(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(product(x[3:4]), outs[0][3:4])
    bad = x.clone()
    bad[2, 5] = float("inf")
    bad[4, 0] = float("nan")
    y = product(bad)
    assert y[[2, 4]].isnan().all() and torch.equal(y[[0, 1, 3, 5, 6, 7, 8]], outs[0][[0, 1, 3, 5, 6, 7, 8]])


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "int8"])
def test_torch_products_of_stored_weights_are_the_same_function(kind):
    """Where the kernel does not apply (autograd here), torch computes the same product from the same storage."""
    g = torch.Generator().manual_seed(0)
    w, wide = _stored(torch.randn(40, 33, generator=g), kind)
    b = torch.randn(33, generator=g)
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    assert not native_applies(x, w, b)
    y = affine(x, w, b)
    torch.testing.assert_close(y, x @ wide + b, atol=1e-4, rtol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, wide.sum(1).expand(5, 40), atol=1e-4, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(1, 64), d_out=st.integers(1, 64), axis=st.sampled_from([0, 1]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_quantize_then_dequantize_errs_at_most_half_a_step_per_column(d_in, d_out, axis, scale, seed):
    w = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(seed)) * scale
    w[0] = 0.0  # an all-zero row/column (axis 0) stays exactly zero
    m = quantize_matrix(w, axis=axis)
    assert m.q.dtype == torch.int8 and m.q.abs().max() <= 127
    step = m.scale[None, :] if axis == 1 else m.scale[:, None]
    assert bool(((m.dequantize() - w).abs() <= step / 2 * (1 + 1e-5)).all())
    top = w.abs().amax(dim=1 - axis)
    torch.testing.assert_close(m.scale[top > 0], top[top > 0] / 127)


@pytest.fixture(scope="module")
def model():
    cfg = gpt2fn.GPTConfig(vocab_size=211, context_length=48, emb_dim=48, n_heads=3, n_layers=2)
    return gpt2fn.init_params(cfg, 3)


@pytest.mark.parametrize("tie", [True, False])
def test_greedy_decoding_of_an_int8_tree_equals_its_dequantized_copy(threads, model, tie):
    """The quantized tree and the fp32 tree it stands for are the same function (up to rounding): the same greedy
    tokens for a left-padded batch, and logits within float rounding."""
    params = gpt2fn.init_params(model.config.replace(tie_head=tie), 5)
    q = gpt2fn.quantize(params)
    d = gpt2fn.dequantize(q)
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 7, 8], [0, 0, 9, 10, 11]])
    mask = ids != 0
    torch.testing.assert_close(gpt2fn.generate_tokens(q, ids, pad_mask=mask, max_new_tokens=12),
                               gpt2fn.generate_tokens(d, ids, pad_mask=mask, max_new_tokens=12), rtol=0, atol=0)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(gpt2fn.forward(q, ids), gpt2fn.forward(d, ids), atol=1e-4, rtol=1e-4)
    prompt = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(gpt2fn.generate_tokens(q, prompt, num_beams=2, max_new_tokens=4),
                               gpt2fn.generate_tokens(d, prompt, num_beams=2, max_new_tokens=4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_16_bit_weights_compute_in_fp32_on_cpu(threads, model, dtype):
    """bf16/fp16 weights on CPU are storage: activations and the KV cache are fp32, so the logits are the fp32
    model's on the widened weights, and decoding equals it."""
    h = gpt2fn.tree_to(model, dtype=dtype)
    wide = gpt2fn.tree_to(h, dtype=torch.float32)
    assert h.compute_dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        got = gpt2fn.forward(h, ids)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, gpt2fn.forward(wide, ids), atol=1e-4, rtol=1e-4)
    prompt = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(gpt2fn.generate_tokens(h, prompt, max_new_tokens=8),
                               gpt2fn.generate_tokens(wide, prompt, max_new_tokens=8), rtol=0, atol=0)


def test_an_int8_tree_saves_and_loads_exactly(model, tmp_path):
    q = gpt2fn.quantize(model)
    path = gpt2fn.save(q, tmp_path / "q.safetensors")
    back = gpt2fn.load(path)
    assert isinstance(back.tok_emb, gpt2fn.Int8Matrix)
    a, b = dict(gpt2fn.named_leaves(q)), dict(gpt2fn.named_leaves(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with pytest.raises(gpt2fn.CheckpointError, match="dequantize"):
        gpt2fn.load(path, dtype="bf16")


def test_functions_that_differentiate_or_edit_weights_refuse_int8(model):
    q = gpt2fn.quantize(model)
    ids = torch.tensor([[1, 2, 3]])
    for call in (lambda: gpt2fn.loss(q, ids, ids), lambda: gpt2fn.fold_layer_norm(q),
                 lambda: gpt2fn.center_unembed(q), lambda: gpt2fn.study.attn_weights(q, 0)):
        with pytest.raises(QuantizedWeightsError, match="gpt2fn.dequantize"):
            call()
    with pytest.raises(ValueError, match="already quantized"):
        gpt2fn.quantize(q)
    with pytest.raises(ValueError, match="unknown quantization format"):
        gpt2fn.quantize(model, "int4")


def test_gradients_with_respect_to_activations_run_on_int8_weights(model):
    """Reading a quantized model is allowed under autograd (site gradients): torch's product of the stored int8."""
    q = gpt2fn.quantize(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    grads = gpt2fn.site_grads(q, ids, ["blocks.1.resid_pre"], lambda logits: logits[0, -1, 0])
    want = gpt2fn.site_grads(gpt2fn.dequantize(q), ids, ["blocks.1.resid_pre"], lambda logits: logits[0, -1, 0])
    torch.testing.assert_close(grads["blocks.1.resid_pre"], want["blocks.1.resid_pre"], atol=1e-4, rtol=1e-4)


def test_without_the_kernel_16_and_8_bit_trees_decode_the_same():
    """GPT2FN_NATIVE=0 (as with no compiler): torch's products on the same storage, the same tokens."""
    code = """
import gpt2fn, torch
from gpt2fn import native
cfg = gpt2fn.GPTConfig(vocab_size=97, context_length=32, emb_dim=24, n_heads=3, n_layers=2)
p = gpt2fn.init_params(cfg, 1)
outs = [gpt2fn.generate_tokens(t, torch.tensor([[1, 2, 3]]), max_new_tokens=6).tolist()
        for t in (gpt2fn.quantize(p), gpt2fn.tree_to(p, dtype=torch.bfloat16))]
print(native.available(), outs)
"""
    env = dict(os.environ)
    runs = []
    for flag in ("0", "1"):
        env["GPT2FN_NATIVE"] = flag
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(done.stdout.strip())
    assert runs[0].startswith("False")
    if native.available():
        assert runs[1].startswith("True") and runs[0].split(" ", 1)[1] == runs[1].split(" ", 1)[1]

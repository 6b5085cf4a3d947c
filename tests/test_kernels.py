"""The products of `gpt2fn.kernels`: `affine(x, W, b)` and the tied head's `affine_t(x, E)` read the stored matrices
in place and equal `x @ W + b` (`x @ E.T`) up to float rounding, through the native kernel and through torch's
product, with any rows, widths, strides and thread counts; the policy picks torch's product wherever the kernel
does not apply."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fn import native
from gpt2fn.kernels import NATIVE_MAX_ROWS, affine, affine_t, native_applies

needs_native = pytest.mark.skipif(not native.available(), reason=f"the native kernel is {native.status()}")


def _strided(t: torch.Tensor, gap: int) -> torch.Tensor:
    """`t` `[n, m]` as a view with `gap` unused floats after each row (unit stride along m)."""
    if gap == 0:
        return t
    wide = torch.zeros(t.shape[0], t.shape[1] + gap)
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


@needs_native
@settings(max_examples=60)
@given(rows=st.integers(1, 80), d_in=st.integers(1, 81), d_out=st.integers(1, 200), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2,)]), w_gap=st.sampled_from([0, 3, 16]), x_gap=st.sampled_from([0, 5]),
       seed=st.integers(0, 2**31 - 1))
def test_the_in_place_kernel_equals_the_plain_product(threads, rows, d_in, d_out, bias, lead, w_gap, x_gap, seed):
    """Rows 1..80 (register blocks of up to 8 and their remainders, K in chunks), odd and even widths (bands of 1-3
    vectors and the columns past the last whole vector), matrices that are views with a row stride wider than
    their width, strided inputs."""
    g = torch.Generator().manual_seed(seed)
    w = _strided(torch.randn(d_in, d_out, generator=g), w_gap)
    b = torch.randn(d_out, generator=g) if bias else None
    x = _strided(torch.randn(max(1, len(lead) and lead[0]) * rows, d_in, generator=g), x_gap)
    x = x.view(*lead, rows, d_in) if lead else x
    n = x.numel() // d_in
    assert native_applies(x, w, b) is (n <= NATIVE_MAX_ROWS)
    want = x @ w if b is None else x @ w + b
    torch.testing.assert_close(affine(x, w, b), want, atol=1e-5, rtol=1e-5)


@needs_native
@settings(max_examples=30)
@given(rows=st.integers(1, 20), d_in=st.integers(1, 200), d_out=st.integers(1, 120), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_a_rows_product_has_the_same_bits_on_any_thread_count_and_in_any_batch(rows, d_in, d_out, bias, dtype, seed):
    """The kernel cuts the reduction into pieces fixed by the width alone (halves, from 64 inputs), so the sums of a
    row are the same whether 1, 2 or 3 threads share the matrix, and whether the row is alone or one of a batch:
    batched decoding and speculative verification see the logits a row would get alone. The tied head's dot
    products are whole rows of E, so the same holds for it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(rows, d_in, generator=g)
    e = w.T.contiguous()  # as a tied head [out, in]
    before = torch.get_num_threads()
    try:
        outs, heads = [], []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(affine(x, w, b))
            heads.append(affine_t(x, e))
        alone = torch.cat([affine(x[i:i + 1], w, b) for i in range(rows)])
        head_alone = torch.cat([affine_t(x[i:i + 1], e) for i in range(rows)])
    finally:
        torch.set_num_threads(before)
    for other in (*outs[1:], alone):
        assert torch.equal(outs[0], other)
    for other in (*heads[1:], head_alone):
        assert torch.equal(heads[0], other)
    want = x @ w.float() if b is None else x @ w.float() + b
    torch.testing.assert_close(outs[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(heads[0], x @ w.float(), atol=1e-4, rtol=1e-4)


@needs_native
@settings(max_examples=40)
@given(rows=st.integers(1, 80), d_in=st.integers(1, 100), vocab=st.integers(1, 300), gap=st.sampled_from([0, 7]),
       seed=st.integers(0, 2**31 - 1))
def test_the_tied_head_is_read_in_place(threads, rows, d_in, vocab, gap, seed):
    """`x @ tok_emb.T` on the token embedding `[vocab, d_model]` as stored: each vocabulary row is contiguous, the
    dot-product orientation; groups of 8 (one row) or 4 columns and their remainders, `d_model` past whole vectors."""
    g = torch.Generator().manual_seed(seed)
    e = _strided(torch.randn(vocab, d_in, generator=g), gap)
    x = torch.randn(rows, d_in, generator=g)
    assert native_applies(x, e)
    torch.testing.assert_close(affine_t(x, e), x @ e.T, atol=1e-5, rtol=1e-5)


@needs_native
def test_gpt2_sized_products_at_decode_row_counts(threads):
    """GPT-2 124M's shapes: `w_qkv` [768, 2304], `w_proj` [3072, 768] (a reduction of 3072 in chunks) and the tied
    head [50257, 768] (one column past the last group), at the row counts decoding uses."""
    g = torch.Generator().manual_seed(0)
    for d_in, d_out in ((768, 2304), (3072, 768)):
        w, b = torch.randn(d_in, d_out, generator=g) * 0.02, torch.randn(d_out, generator=g)
        for rows in (1, 2, 8, 9, 32, 64):
            x = torch.randn(rows, d_in, generator=g)
            torch.testing.assert_close(affine(x, w, b), torch.addmm(b, x, w), atol=1e-4, rtol=1e-4)
    e = torch.randn(50257, 768, generator=g) * 0.02
    for rows in (1, 3, 8):
        x = torch.randn(rows, 768, generator=g)
        torch.testing.assert_close(affine_t(x, e), x @ e.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("case", "x", "w"), [
    ("bf16", torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)),
    ("fp16", torch.randn(2, 8, dtype=torch.float16), torch.randn(8, 4, dtype=torch.float16)),
    ("columns strided", torch.randn(2, 8), torch.randn(4, 8).T),
    ("a prefill", torch.randn(NATIVE_MAX_ROWS + 1, 8), torch.randn(8, 4)),
    ("no rows", torch.randn(0, 8), torch.randn(8, 4)),
    ("meta device", torch.empty(2, 8, device="meta"), torch.empty(8, 4, device="meta")),
])
def test_the_policy_takes_torchs_product_where_the_kernel_does_not_apply(case, x, w):
    assert not native_applies(x, w)
    if x.device.type != "meta":
        want = (x.float() @ w.float()).to(x.dtype)
        torch.testing.assert_close(affine(x, w, None), want, atol=1e-2, rtol=1e-2)


def test_a_product_of_mismatched_widths_is_torchs_error_not_a_read_past_the_matrix():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch"):
        affine(torch.randn(2, 5), torch.randn(4, 3), None)
    with pytest.raises(RuntimeError):
        affine(torch.randn(2, 4), torch.randn(4, 3), torch.randn(5))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch"):
        affine_t(torch.randn(2, 5), torch.randn(7, 4))


@pytest.mark.parametrize("rows", [1, 3])
def test_products_compose_with_grad_vmap_and_compile(rows):
    """Under autograd and `torch.func` the product is torch's (differentiable); under `torch.compile` the native
    kernel is one opaque operator (`gpt2fn::affine`) and gives the same values."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(12, 37, generator=g), torch.randn(37, generator=g), torch.randn(rows, 12, generator=g)
    e = torch.randn(29, 12, generator=g)
    gx = torch.func.grad(lambda x: affine(x, w, b).square().sum())(x)
    torch.testing.assert_close(gx, torch.func.grad(lambda x: (x @ w + b).square().sum())(x), atol=1e-5, rtol=1e-5)
    gw = torch.func.grad(lambda w: affine(x, w, b).square().sum())(w)
    torch.testing.assert_close(gw, torch.func.grad(lambda w: (x @ w + b).square().sum())(w), atol=1e-5, rtol=1e-5)
    ge = torch.func.grad(lambda e: affine_t(x, e).square().sum())(e)
    torch.testing.assert_close(ge, torch.func.grad(lambda e: (x @ e.T).square().sum())(e), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():
        wg = w.clone().requires_grad_(True)
        assert not native_applies(x, wg, b)
        affine(x, wg, b).sum().backward()
        torch.testing.assert_close(wg.grad, x.sum(0)[:, None].expand(12, 37), atol=1e-5, rtol=1e-5)
    per_row = torch.func.vmap(lambda r: affine(r[None], w, b)[0])(x)
    torch.testing.assert_close(per_row, x @ w + b, atol=1e-5, rtol=1e-5)
    torch.compiler.reset()
    compiled = torch.compile(lambda x, w, b, e: (affine(x, w, b), affine(x, w, None), affine_t(x, e)),
                             fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, b, e), (x @ w + b, x @ w, x @ e.T), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sharp_rows():
    """A tiny model with its token embedding scaled up (greedy choices far above rounding), 32 prompts, and the
    greedy ids each gets alone, with two threads."""
    from gpt2fn import generate_tokens, init_params, preset

    params = init_params(preset("tiny").replace(emb_dim=48), seed=0)
    params = params.replace(tok_emb=params.tok_emb * 30)
    ids = torch.randint(0, 97, (32, 4), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = torch.cat([generate_tokens(params, ids[i:i + 1], max_new_tokens=5) for i in range(32)])
    finally:
        torch.set_num_threads(before)
    return params, ids, alone


@pytest.mark.parametrize("batch", [2, 3, 8, 17, 32])
def test_greedy_batches_decode_each_row_as_gpt2fn_alone(sharp_rows, batch):
    from gpt2fn import generate_tokens

    params, ids, alone = sharp_rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(generate_tokens(params, ids[:batch], max_new_tokens=5), alone[:batch])
    finally:
        torch.set_num_threads(before)


_OTHER_ISA = """
import sys, torch
from gpt2fn import native
native._FLAGS = tuple(g for f in native._FLAGS for g in (sys.argv[1].split() if f.startswith("-march=") else [f]))
from gpt2fn.kernels import affine, affine_t
if not native.available():
    sys.exit("no build: " + native.status())
g = torch.Generator().manual_seed(0)
for trial in range(int(sys.argv[2])):
    rows, d_in, d_out = (int(torch.randint(1, n, (1,), generator=g)) for n in (21, 201, 121))
    w = torch.randn(d_in, d_out, generator=g).to([torch.float32, torch.bfloat16, torch.float16][trial % 3])
    x, e = torch.randn(rows, d_in, generator=g), w.T.contiguous()
    outs = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        outs.append((affine(x, w, None), affine_t(x, e)))
    torch.set_num_threads(2)
    outs.append((torch.cat([affine(x[i:i + 1], w, None) for i in range(rows)]),
                 torch.cat([affine_t(x[i:i + 1], e) for i in range(rows)])))
    for y, h in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(h, outs[0][1]), (trial, rows, d_in, d_out, w.dtype)
    torch.testing.assert_close(outs[0][0], x @ w.float(), atol=1e-4, rtol=1e-4)
print(native.vector_width())
"""


def _cpu_has(*flags: str) -> bool:
    have = set(native._cpu_flags().split())
    return all(f in have for f in flags)


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the other builds are x86-64's")
@pytest.mark.parametrize(("target", "floats", "flags"), [
    ("-march=x86-64", 4, ()),
    ("-march=x86-64-v3 -mtune=znver3", 8, ("avx2", "fma")),
], ids=["sse2", "avx2-znver3"])
def test_the_builds_for_other_x86_cpus_keep_a_rows_bits(tmp_path, target, floats, flags):
    """The kernel compiled for another x86-64 target than this CPU's, in a process of its own: `-march=x86-64`
    (SSE2, 4 floats a vector) and AVX2 + FMA tuned for the AMD EPYC 7003 (8 floats; the CPU of docs/performance.md
    run 6, whose tuning leaves some accumulations unfused). A row's product has the same bits on 1, 2 or 3 threads
    and alone or in a batch, as on the native build. On an AVX-512 machine this is the only test of the narrower
    code paths, where register blocks, bands and FMA fusing differ."""
    if not _cpu_has(*flags):
        pytest.skip(f"this CPU cannot run the {target} build (needs {', '.join(flags)})")
    run = subprocess.run([sys.executable, "-c", _OTHER_ISA, target, "40"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    if run.returncode != 0 and "no build: off: the build failed" in run.stderr:
        pytest.skip(f"this compiler does not build {target}: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(floats)


_PROBE = """
import torch, gpt2fn
from gpt2fn import native
params = gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)
ids = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(0))
out = gpt2fn.generate_tokens(params, ids, max_new_tokens=4)
x = torch.randn(2, 24)
print(native.status())
print(gpt2fn.kernels.native_applies(x, params.blocks[0].attn.w_qkv), out.shape[1])
"""


@pytest.mark.parametrize(("env", "says"), [
    ({"GPT2FN_NATIVE": "0"}, "off: GPT2FN_NATIVE=0"),
    ({"CXX": "false"}, "off: the build failed"),
    ({"CXX": "/nonexistent/c++"}, "off: no C++ compiler found"),
], ids=["switched off", "build fails", "no compiler"])
def test_without_the_native_kernel_decoding_takes_torchs_products(tmp_path, env, says):
    """The kernel is never required: switched off, failing to build, or with no compiler, `status` says why and
    decoding runs on torch's products over the same weights."""
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})
    assert run.returncode == 0, run.stderr
    status, applies = run.stdout.strip().splitlines()[-2:]
    assert status.startswith(says) and applies == "False 7"


@needs_native
def test_the_native_build_is_cached_per_machine_and_loaded_once():
    path = native.status().removeprefix("on: ").split(" (")[0]
    assert os.path.exists(path) and os.path.dirname(path).startswith(os.path.dirname(os.path.dirname(path)))
    assert native.library() is native.library() and native.vector_width() in (4, 8, 16)


# ---------------------------------------------------------------- the native attention of a decode step


def _visible(b: int, width: int, kind: str, g: torch.Generator) -> torch.Tensor | None:
    """A decode step's mask: each row sees a random subset of the slots and always the last (its own)."""
    if kind == "none":
        return None
    if kind == "shared":  # [1, width]: every row sees the same slots
        m = torch.rand(1, width, generator=g) < 0.7
        m[:, -1] = True
        return m
    m = torch.rand(b, 1, 1, width, generator=g) < 0.7
    m[..., -1] = True
    return m


@needs_native
@settings(max_examples=40)
@given(batch=st.integers(1, 4), heads=st.integers(1, 3), head_dim=st.integers(1, 70), width=st.integers(1, 40),
       capacity_gap=st.integers(0, 9), kind=st.sampled_from(["rows", "shared", "none"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_decode_attention_equals_torchs_on_the_widened_cache(threads, batch, heads, head_dim, width, capacity_gap,
                                                            kind, dtype, seed):
    """One query per row and head over the slots written so far of a cache (a view into buffers of a larger
    capacity), 16-bit caches read in place: softmax over the visible slots, every head_dim (vectors and the
    columns past them), masks per row, shared, or none."""
    from gpt2fn.kernels import attend_applies, native_attend

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, head_dim, generator=g).transpose(1, 2)  # strided, as split from w_qkv
    keys = torch.randn(batch, heads, width + capacity_gap, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, width + capacity_gap, head_dim, generator=g).to(dtype)
    k, v = keys[:, :, :width], values[:, :, :width]
    mask = _visible(batch, width, kind, g)
    assert attend_applies(q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(native_attend(q, k, v, mask), want, atol=2e-6, rtol=2e-5)


def test_decode_attention_takes_torchs_where_the_kernel_does_not_apply():
    from gpt2fn.kernels import attend_applies

    q, k = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 5, 8)
    assert not attend_applies(torch.randn(2, 3, 2, 8), k, k, None)  # two queries: a prefill or a verify
    assert not attend_applies(q.double(), k.double(), k.double(), None)
    assert not attend_applies(q, k, k.half(), None)  # keys and values of different dtypes
    assert not attend_applies(q, k, k, torch.ones(2, 1, 1, 5))  # a float mask
    with torch.enable_grad():
        assert not attend_applies(q.requires_grad_(True), k, k, None)
    if native.available():
        assert attend_applies(torch.randn(2, 3, 1, 8), k, k, None)


def _slot_written(buf: torch.Tensor, slot: int, new: torch.Tensor) -> torch.Tensor:
    """`buf` with `new` `[batch, heads, head_dim]` (fp32) written at `slot`, rounded to `buf`'s dtype by torch."""
    out = buf.clone()
    out[:, :, slot] = new.to(buf.dtype)
    return out


@needs_native
@settings(max_examples=40)
@given(batch=st.integers(1, 4), heads=st.integers(1, 3), head_dim=st.integers(1, 70), width=st.integers(1, 40),
       capacity_gap=st.integers(0, 9), kind=st.sampled_from(["rows", "shared"]), slot_back=st.integers(0, 39),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_the_one_call_decode_attention_writes_the_slot_and_equals_writing_it_then_attending(
        threads, batch, heads, head_dim, width, capacity_gap, kind, slot_back, dtype, seed):
    """`native_attend_append` (a one-token step's attention in one call, from the qkv product): the new key and value
    land in the slot with the bits torch's `.to` rounds them to, nothing else in the buffers changes, and `z` has
    the bits of `native_attend` on the cache written by torch, its heads merged."""
    from gpt2fn.kernels import attend_append_applies, native_attend, native_attend_append

    g = torch.Generator().manual_seed(seed)
    d = heads * head_dim
    qkv = torch.randn(batch, 1, 3 * d, generator=g) * 3
    capacity = width + capacity_gap
    keys = torch.randn(batch, heads, capacity, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, capacity, head_dim, generator=g).to(dtype)
    slot = width - 1 - slot_back % width
    slots = torch.tensor([slot])
    mask = _visible(batch, width, kind, g)
    mask[..., slot] = True  # a query sees its own slot
    q, k_new, v_new = qkv.view(batch, 3, heads, head_dim).unbind(1)
    want_k, want_v = _slot_written(keys, slot, k_new), _slot_written(values, slot, v_new)
    want = native_attend(q[:, :, None], want_k[:, :, :width], want_v[:, :, :width], mask)
    assert attend_append_applies(qkv, keys, values, slots, mask, heads)
    z = native_attend_append(qkv, keys, values, slots, mask)
    assert z.shape == (batch, 1, d)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert torch.equal(z, want.reshape(batch, 1, d))


@needs_native
def test_the_one_call_decode_attention_refuses_a_slot_outside_the_mask_and_what_it_cannot_read():
    from gpt2fn.kernels import attend_append_applies, native_attend_append

    qkv, k = torch.randn(2, 1, 3 * 3 * 8), torch.zeros(2, 3, 10, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert attend_append_applies(qkv, k, k.clone(), torch.tensor([4]), mask, 3)
    before = k.clone()
    with pytest.raises(ValueError, match="slot to write, 5, is not one of the 5 slots"):
        native_attend_append(qkv, k, k.clone(), torch.tensor([5]), mask)
    assert torch.equal(k, before)  # refused before writing anything
    v = k.clone()
    assert not attend_append_applies(torch.randn(2, 2, 72), k, v, torch.tensor([4, 5]), mask, 3)  # two tokens
    assert not attend_append_applies(qkv, k, v, torch.tensor([4]), mask, 2)  # another head count
    assert not attend_append_applies(qkv, k, v.half(), torch.tensor([4]), mask, 3)  # keys and values differ
    assert not attend_append_applies(qkv, k, v, torch.tensor([4.0]), mask, 3)  # a float slot
    assert not attend_append_applies(qkv, k, v, torch.tensor([4]), torch.ones(2, 1, 1, 11, dtype=torch.bool), 3)
    assert not attend_append_applies(qkv.double(), k.double(), v.double(), torch.tensor([4]), mask, 3)
    with torch.enable_grad():
        assert not attend_append_applies(qkv.requires_grad_(True), k, v, torch.tensor([4]), mask, 3)


@needs_native
def test_an_input_strided_along_its_features_is_read_as_its_values():
    """`affine` hands its input to the kernel as it is where it can: a 2-D input whose features are not adjacent
    (a transposed view) or a 3-D one that is not contiguous must still give the plain product."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(16, 24, generator=g), torch.randn(24, generator=g)
    xt = torch.randn(16, 3, generator=g).T  # [3, 16] with stride (1, 3)
    assert native_applies(xt, w, b)
    torch.testing.assert_close(affine(xt, w, b), xt @ w + b, atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 5, 16, generator=g)[:, ::2]  # [2, 3, 16], rows strided
    torch.testing.assert_close(affine(x3, w, b), x3 @ w + b, atol=1e-5, rtol=1e-5)

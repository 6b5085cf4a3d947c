"""The decode layouts of `gpt2fn.kernels`: every packed product (the native kernel's panels, and the split views
it falls back to) equals `x @ W + b` up to float rounding, and the policy falls back to the plain matrix wherever
no layout applies."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2fn import native
from gpt2fn.kernels import (
    IN_SPLIT_MAX_ROWS,
    SPLIT_MAX_ROWS,
    layout_kind,
    native_applies,
    pack,
    packed_affine,
    panel_width,
    split_applies,
    unpack,
)
from gpt2fn.layers import linear

needs_native = pytest.mark.skipif(not native.available(), reason=f"the native kernel is {native.status()}")


def _plain(x, w, b):
    return x @ w if b is None else x @ w + b


@given(rows=st.integers(1, 64), d_in=st.integers(1, 81), d_out=st.integers(1, 81), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2,)]), seed=st.integers(0, 2**31 - 1))
def test_every_split_view_equals_the_plain_product(threads, rows, d_in, d_out, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(*lead, rows, d_in, generator=g)
    layout = pack(w, rows=rows, threads=2, use_native=False)  # laid out for two threads, run with `threads`
    kind = layout_kind(w, rows=rows, threads=2, use_native=False)
    assert kind == ("in" if rows <= IN_SPLIT_MAX_ROWS and d_in % 2 == 0 else "out" if d_out >= 2 else None)
    assert layout.ndim == (2 if kind is None else 3)
    assert layout.data_ptr() == w.data_ptr() and torch.equal(unpack(layout), w)  # a view, never a copy
    assert pack(layout, rows=rows, threads=2, use_native=False) is layout  # packing a layout changes nothing
    torch.testing.assert_close(linear(x, layout, b), _plain(x, w, b), atol=1e-5, rtol=1e-5)
    if layout.ndim == 3:  # other row counts than the layout was made for, a prefill among them
        for n in (1, rows + 1, SPLIT_MAX_ROWS + 1):
            more = torch.randn(n, d_in, generator=g)
            torch.testing.assert_close(packed_affine(more, layout, b), _plain(more, w, b), atol=1e-5, rtol=1e-5)


@needs_native
@given(rows=st.integers(1, 80), d_in=st.integers(1, 81), d_out=st.integers(1, 200), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2,)]), pad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_every_panel_layout_equals_the_plain_product(threads, rows, d_in, d_out, bias, lead, pad, seed):
    """Panels, through the native kernel and through torch's batched product over the same panels: rows 1..80
    (register blocks of 8 and their remainders, K in chunks past 8 rows), any widths, padded or not."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g)
    x = torch.randn(*lead, rows, d_in, generator=g)
    kind = layout_kind(w, rows=rows, threads=2, pad=pad)
    width = panel_width(d_out, pad=pad)
    assert (kind == "panels") is (width is not None) and (pad or width is None or d_out % width == 0)
    if kind != "panels":  # no width divides `out` and padding is not allowed: the split views serve it
        assert layout_kind(w, rows=rows, threads=2, use_native=False) == layout_kind(w, rows=rows, threads=2,
                                                                                        pad=pad)
        return
    layout = pack(w, rows=rows, threads=2, pad=pad)
    assert layout.is_contiguous() and layout.shape[1:] == (d_in, width) and layout.data_ptr() != w.data_ptr()
    assert pack(layout, rows=rows, threads=2, pad=pad) is layout
    full = layout.shape[0] * width
    assert full >= d_out and (full == d_out or pad)
    flat = unpack(layout, d_in)
    assert torch.equal(flat[:, :d_out], w) and not flat[:, d_out:].any()  # padding columns are zero
    b = torch.randn(full, generator=g) if bias else None
    want = _plain(x, flat, b)
    assert native_applies(x, layout, b)
    torch.testing.assert_close(linear(x, layout, b), want, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # a weight that asks for gradients takes torch's product over the panels
        wg = layout.clone().requires_grad_(True)
        assert not native_applies(x, wg, b)
        torch.testing.assert_close(linear(x, wg, b).detach(), want, atol=1e-5, rtol=1e-5)


def test_the_policy_per_rows_range():
    w = torch.randn(768, 50257)  # GPT-2's head: an odd out axis, split on out with one shared column
    views = dict(use_native=False)
    assert layout_kind(w, rows=1, threads=2, **views) == "in"
    assert pack(w, rows=1, threads=2, **views).shape == (2, 384, 50257)
    for rows in (2, 8, 32, SPLIT_MAX_ROWS):
        assert layout_kind(w, rows=rows, threads=2, **views) == "out"
        assert pack(w, rows=rows, threads=2, **views).shape == (2, 768, 25129)
    assert layout_kind(w, rows=SPLIT_MAX_ROWS + 1, threads=2, **views) is None
    assert layout_kind(w, rows=8, threads=1, **views) is None


@needs_native
def test_the_panel_policy_serves_every_row_count_and_thread_count():
    head, qkv = torch.randn(768, 50257), torch.randn(768, 2304)
    width = native.panel_widths()[0]
    for rows in (1, 8, 32, SPLIT_MAX_ROWS + 1, 4096):
        for threads in (1, 2):
            assert layout_kind(qkv, rows=rows, threads=threads) == "panels"
            assert layout_kind(head, rows=rows, threads=threads, pad=True) == "panels"
    assert pack(qkv, rows=8, threads=2).shape == (2304 // panel_width(2304), 768, panel_width(2304))
    assert pack(head, rows=8, threads=2, pad=True).shape == (-(-50257 // width), 768, width)
    assert layout_kind(head, rows=8, threads=2) != "panels"  # 50257 is divided by no width: padding is asked for


@pytest.mark.parametrize(("case", "w", "rows", "threads"), [
    ("bf16", torch.randn(8, 4, dtype=torch.bfloat16), 1, 2),
    ("bf16 batch", torch.randn(8, 4, dtype=torch.bfloat16), 8, 2),
    ("one thread", torch.randn(8, 4), 1, 1),
    ("one thread batch", torch.randn(8, 4), 8, 1),
    ("many rows", torch.randn(8, 4), SPLIT_MAX_ROWS + 1, 2),
    ("strided", torch.randn(4, 8).T, 1, 2),
    ("strided batch", torch.randn(4, 8).T, 8, 2),
    ("odd in, one column", torch.randn(7, 1), 1, 2),
    ("one column batch", torch.randn(8, 1), 8, 2),
    ("meta device", torch.empty(8, 4, device="meta"), 1, 2),
    ("meta device batch", torch.empty(8, 4, device="meta"), 8, 2),
])
def test_the_split_policy_falls_back_to_the_plain_matrix(case, w, rows, threads):
    assert not split_applies(w, rows=rows, threads=threads, use_native=False)
    assert pack(w, rows=rows, threads=threads, use_native=False) is w
    if w.dtype != torch.float32 or w.device.type != "cpu":  # panels are for fp32 CPU matrices only
        assert not split_applies(w, rows=rows, threads=threads, use_native=True)
        assert pack(w, rows=rows, threads=threads, use_native=True) is w


def test_a_layout_for_another_width_or_a_copy_is_refused():
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="does not match an input of width 4"):
        packed_affine(torch.randn(2, 4), pack(w, rows=2, threads=2, use_native=False), None)
    copy = pack(w, rows=2, threads=2, use_native=False).contiguous()  # [2, 6, 3]: read as panels of width 3
    torch.testing.assert_close(packed_affine(torch.randn(2, 6), copy, None).shape, torch.Size([2, 6]))
    with pytest.raises(ValueError, match="split on in.*width 4"):
        packed_affine(torch.randn(2, 4), copy, None)
    with pytest.raises(ValueError, match="bias of 5 entries for a panel layout of 6 columns"):
        packed_affine(torch.randn(2, 6), copy, torch.randn(5))
    skewed = torch.randn(48).as_strided((2, 6, 3), (3, 7, 1))  # rows 7 apart: no `out` of two bands of 3
    with pytest.raises(ValueError, match="must be the view made by gpt2fn.kernels.pack"):
        packed_affine(torch.randn(2, 6), skewed, None)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("d_out", [5, 6])
@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["panels", "views"])
def test_packed_products_compose_with_grad_vmap_and_compile(rows, d_out, use_native):
    g = torch.Generator().manual_seed(0)
    d_out = d_out * 16 if use_native else d_out  # a width the panels divide
    w, b, x = torch.randn(12, d_out, generator=g), torch.randn(d_out, generator=g), torch.randn(rows, 12, generator=g)
    layout = pack(w, rows=rows, threads=2, use_native=use_native)
    assert layout.ndim == 3 and (layout.data_ptr() != w.data_ptr()) is use_native
    gx = torch.func.grad(lambda x: linear(x, layout, b).square().sum())(x)
    torch.testing.assert_close(gx, torch.func.grad(lambda x: (x @ w + b).square().sum())(x), atol=1e-5, rtol=1e-5)
    gb = torch.func.grad(lambda b: linear(x, layout, b).square().sum())(b)
    torch.testing.assert_close(gb, torch.func.grad(lambda b: (x @ w + b).square().sum())(b), atol=1e-5, rtol=1e-5)
    per_row = torch.func.vmap(lambda r: linear(r[None], layout, b)[0])(x)
    torch.testing.assert_close(per_row, x @ w + b, atol=1e-5, rtol=1e-5)
    torch.compiler.reset()  # eight parametrized cases each trace `linear` afresh (dynamo's recompile limit is 8)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, layout, b), x @ w + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(x, layout, None), x @ w, atol=1e-5, rtol=1e-5)



@pytest.fixture(scope="module")
def sharp_rows():
    """A tiny model with its token embedding scaled up (greedy choices far above rounding), 32 prompts, and the
    greedy ids each gets alone (one row: split on `in`), with two threads."""
    from gpt2fn import generate_tokens, init_params, preset

    params = init_params(preset("tiny").replace(emb_dim=48), seed=0)  # widths the panels divide (48, 144, 192)
    params = params.replace(tok_emb=params.tok_emb * 30)
    ids = torch.randint(0, 97, (32, 4), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = torch.cat([generate_tokens(params, ids[i:i + 1], max_new_tokens=5) for i in range(32)])
    finally:
        torch.set_num_threads(before)
    return params, ids, alone


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=needs_native), False], ids=["panels", "views"])
@pytest.mark.parametrize("batch", [2, 3, 8, 17, 32])
def test_greedy_batches_decode_each_row_as_gpt2fn_alone(sharp_rows, batch, use_native):
    """Every layout serves decoding: a batch of rows (panels, or split views on `out` from 2 rows) gives each row
    the ids it gets alone."""
    from gpt2fn import decode_params, generate_tokens

    params, ids, alone = sharp_rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layout = decode_params(params, batch=batch, native=use_native)
        assert (layout.blocks[0].attn.w_qkv.data_ptr() != params.blocks[0].attn.w_qkv.data_ptr()) is use_native
        assert torch.equal(generate_tokens(layout, ids[:batch], max_new_tokens=5), alone[:batch])
    finally:
        torch.set_num_threads(before)


_PROBE = """
import torch, gpt2fn
from gpt2fn import native
params = gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)
layout = gpt2fn.decode_params(params, batch=4, threads=2)
ids = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(0))
out = gpt2fn.generate_tokens(layout, ids, max_new_tokens=4)
print(native.status())
print(layout.blocks[0].attn.w_qkv.data_ptr() == params.blocks[0].attn.w_qkv.data_ptr(), out.shape[1])
"""


@pytest.mark.parametrize(("env", "says"), [
    ({"GPT2FN_NATIVE": "0"}, "off: GPT2FN_NATIVE=0"),
    ({"CXX": "false"}, "off: the build failed"),
    ({"CXX": "/nonexistent/c++"}, "off: no C++ compiler found"),
], ids=["switched off", "build fails", "no compiler"])
def test_without_the_native_kernel_decoding_takes_the_split_views(tmp_path, env, says):
    """The kernel is never required: switched off, failing to build, or with no compiler, `status` says why and
    decoding runs on the no-copy split views."""
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})
    assert run.returncode == 0, run.stderr
    status, views = run.stdout.strip().splitlines()[-2:]
    assert status.startswith(says) and views == "True 7"


@needs_native
def test_the_native_build_is_cached_per_machine_and_loaded_once():
    path = native.status().removeprefix("on: ").split(" (")[0]
    assert os.path.exists(path) and os.path.dirname(path).startswith(os.path.dirname(os.path.dirname(path)))
    assert native.library() is native.library() and native.vector_width() in (4, 8, 16)
    assert all(w % native.vector_width() == 0 for w in native.panel_widths())


@needs_native
@pytest.mark.parametrize("rows", [9, 17, 40])
def test_panels_with_more_rows_than_a_register_block_and_a_long_reduction(threads, rows):
    """Past 8 rows the kernel reduces `in` in chunks that stay in L2 (e.g. 682 rows of a 48-wide panel), every
    register block accumulating into the output between chunks: GPT-2's `w_proj` (in 3072) at batch 16 or 32."""
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(1500, 96, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 1500, generator=g)
    layout = pack(w, rows=rows, threads=2)
    assert layout.shape[1] == 1500 and layout.shape[0] * layout.shape[2] == 96 and native_applies(x, layout, b)
    torch.testing.assert_close(linear(x, layout, b), x @ w + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear(x, layout, None), x @ w, atol=1e-4, rtol=1e-4)

"""The decode layouts of `gpt2fn.kernels`: every packed product equals `x @ W + b` up to float rounding, and the
packing policy falls back to the plain matrix wherever no split applies."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2fn.kernels import IN_SPLIT_MAX_ROWS, SPLIT_MAX_ROWS, layout_kind, pack, packed_affine, split_applies, unpack
from gpt2fn.layers import linear


def _plain(x, w, b):
    return x @ w if b is None else x @ w + b


@given(rows=st.integers(1, 64), d_in=st.integers(1, 81), d_out=st.integers(1, 81), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2,)]), seed=st.integers(0, 2**31 - 1))
def test_every_layout_equals_the_plain_product(threads, rows, d_in, d_out, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(*lead, rows, d_in, generator=g)
    layout = pack(w, rows=rows, threads=2)  # laid out for two threads, run with `threads`
    kind = layout_kind(w, rows=rows, threads=2)
    assert kind == ("in" if rows <= IN_SPLIT_MAX_ROWS and d_in % 2 == 0 else "out" if d_out >= 2 else None)
    assert layout.ndim == (2 if kind is None else 3)
    assert layout.data_ptr() == w.data_ptr() and torch.equal(unpack(layout), w)  # a view, never a copy
    assert pack(layout, rows=rows, threads=2) is layout  # packing a layout changes nothing
    torch.testing.assert_close(linear(x, layout, b), _plain(x, w, b), atol=1e-5, rtol=1e-5)
    if layout.ndim == 3:  # other row counts than the layout was made for, a prefill among them
        for n in (1, rows + 1, SPLIT_MAX_ROWS + 1):
            more = torch.randn(n, d_in, generator=g)
            torch.testing.assert_close(packed_affine(more, layout, b), _plain(more, w, b), atol=1e-5, rtol=1e-5)


def test_the_policy_per_rows_range():
    w = torch.randn(768, 50257)  # GPT-2's head: an odd out axis, split on out with one shared column
    assert layout_kind(w, rows=1, threads=2) == "in" and pack(w, rows=1, threads=2).shape == (2, 384, 50257)
    for rows in (2, 8, 32, SPLIT_MAX_ROWS):
        assert layout_kind(w, rows=rows, threads=2) == "out"
        assert pack(w, rows=rows, threads=2).shape == (2, 768, 25129)
    assert layout_kind(w, rows=SPLIT_MAX_ROWS + 1, threads=2) is None


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
    assert not split_applies(w, rows=rows, threads=threads)
    assert pack(w, rows=rows, threads=threads) is w


def test_a_layout_for_another_width_or_a_copy_is_refused():
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="does not match an input of width 4"):
        packed_affine(torch.randn(2, 4), pack(w, rows=2, threads=2), None)
    copy = pack(w, rows=2, threads=2).contiguous()  # [2, 6, 3] contiguous: read as a split on in, of width 12
    with pytest.raises(ValueError, match="split on in.*width 6"):
        packed_affine(torch.randn(2, 6), copy, None)
    skewed = torch.randn(48).as_strided((2, 6, 3), (3, 7, 1))  # rows 7 apart: no `out` of two bands of 3
    with pytest.raises(ValueError, match="must be the view made by gpt2fn.kernels.pack"):
        packed_affine(torch.randn(2, 6), skewed, None)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("d_out", [5, 6])
def test_packed_products_compose_with_grad_vmap_and_compile(rows, d_out):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(12, d_out, generator=g), torch.randn(d_out, generator=g), torch.randn(rows, 12, generator=g)
    layout = pack(w, rows=rows, threads=2)
    assert layout.ndim == 3
    gx = torch.func.grad(lambda x: linear(x, layout, b).square().sum())(x)
    torch.testing.assert_close(gx, torch.func.grad(lambda x: (x @ w + b).square().sum())(x), atol=1e-5, rtol=1e-5)
    gb = torch.func.grad(lambda b: linear(x, layout, b).square().sum())(b)
    torch.testing.assert_close(gb, torch.func.grad(lambda b: (x @ w + b).square().sum())(b), atol=1e-5, rtol=1e-5)
    per_row = torch.func.vmap(lambda r: linear(r[None], layout, b)[0])(x)
    torch.testing.assert_close(per_row, x @ w + b, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, layout, b), x @ w + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(x, layout, None), x @ w, atol=1e-5, rtol=1e-5)



@pytest.fixture(scope="module")
def sharp_rows():
    """A tiny model with its token embedding scaled up (greedy choices far above rounding), 32 prompts, and the
    greedy ids each gets alone (one row: split on `in`), with two threads."""
    from gpt2fn import generate_tokens, init_params, preset

    params = init_params(preset("tiny"), seed=0)
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
    """Every layout serves decoding: a batch of rows (split on `out` from 2 rows) gives each row the ids it gets
    alone."""
    from gpt2fn import generate_tokens

    params, ids, alone = sharp_rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(generate_tokens(params, ids[:batch], max_new_tokens=5), alone[:batch])
    finally:
        torch.set_num_threads(before)

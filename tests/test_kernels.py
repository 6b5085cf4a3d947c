"""The decode layouts of `gpt2fn.kernels`: every packed product equals `x @ W + b` up to float rounding, and the
packing policy falls back to the plain matrix wherever the split does not apply."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2fn.kernels import SPLIT_MAX_ROWS, pack, packed_affine, split_applies, unpack
from gpt2fn.layers import linear


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@given(rows=st.integers(1, 64), half_in=st.integers(1, 40), d_out=st.integers(1, 41), bias=st.booleans(),
       lead=st.sampled_from([(), (1,), (2,)]), seed=st.integers(0, 2**31 - 1))
def test_a_packed_product_equals_the_plain_one(threads, rows, half_in, d_out, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2 * half_in, d_out, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    x = torch.randn(*lead, rows, 2 * half_in, generator=g)
    layout = pack(w, rows=rows, threads=2)
    assert layout.ndim == (3 if rows <= SPLIT_MAX_ROWS else 2)
    assert layout.data_ptr() == w.data_ptr() and torch.equal(unpack(layout), w)  # a view, never a copy
    expected = x @ w if b is None else x @ w + b
    torch.testing.assert_close(linear(x, layout, b), expected, atol=1e-5, rtol=1e-5)
    if layout.ndim == 3:  # more rows than the layout was made for: the plain product over the same storage
        more = torch.randn(SPLIT_MAX_ROWS + 1, 2 * half_in, generator=g)
        torch.testing.assert_close(packed_affine(more, layout, b), more @ w + (0 if b is None else b),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "w", "rows", "threads"), [
    ("odd in axis", torch.randn(7, 4), 1, 2),
    ("bf16", torch.randn(8, 4, dtype=torch.bfloat16), 1, 2),
    ("one thread", torch.randn(8, 4), 1, 1),
    ("many rows", torch.randn(8, 4), SPLIT_MAX_ROWS + 1, 2),
    ("strided", torch.randn(4, 8).T, 1, 2),
    ("meta device", torch.empty(8, 4, device="meta"), 1, 2),
])
def test_the_split_policy_falls_back_to_the_plain_matrix(case, w, rows, threads):
    assert not split_applies(w, rows=rows, threads=threads)
    assert pack(w, rows=rows, threads=threads) is w


def test_packed_products_compose_with_grad_vmap_and_compile():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(12, 5, generator=g), torch.randn(5, generator=g), torch.randn(3, 12, generator=g)
    layout = pack(w, rows=3, threads=2)
    gx = torch.func.grad(lambda x: linear(x, layout, b).square().sum())(x)
    torch.testing.assert_close(gx, torch.func.grad(lambda x: (x @ w + b).square().sum())(x), atol=1e-5, rtol=1e-5)
    per_row = torch.func.vmap(lambda r: linear(r[None], layout, b)[0])(x)
    torch.testing.assert_close(per_row, x @ w + b, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, layout, b), x @ w + b, atol=1e-5, rtol=1e-5)

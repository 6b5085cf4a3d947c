"""`FactoredMatrix`: a low-rank matrix `A @ B` kept as its two factors (as in TransformerLens).

    M = FactoredMatrix(A, B)      # A [*batch, m, r], B [*batch, r, n]: the [*batch, m, n] product, never formed
    M.AB, M.BA                    # the product [.., m, n]; the small product [.., r, r] (m == n)
    M @ W, W @ M, M @ N, M.T      # stay factored, through the narrower inner width
    U, S, Vh = M.svd()            # U @ diag(S) @ Vh == M.AB, from QR of the factors and an SVD of a small core
    M.norm(), M.eigenvalues, M.rank()
    M[layer, head], M.rows(ids), M.cols(ids)

Axes: `batch` leading axes (e.g. `layer heads`, broadcast between A and B), `m` rows (`ldim`), `r` the inner width
(`mdim`, an upper bound on the rank), `n` columns (`rdim`). A `FactoredMatrix` is a value: no method changes it, and
it is a registered pytree with children `(A, B)`, so `torch.utils._pytree.tree_map` (`.to(device)`, casts) and
`torch.func` transforms take it. Its products stay factored: `W_E @ OV @ W_U` of GPT-2 is `[vocab, vocab]` by shape
but holds `[vocab, head_dim]` and `[head_dim, vocab]`.

Decompositions (`svd`, `norm`, `eigenvalues`, `rank`, `collapse_l/r`) run in at least fp32 (torch's linear algebra
has no 16-bit kernels) and return that dtype. Unlike TransformerLens, `svd` returns `Vh` as `torch.linalg.svd` does
(TransformerLens's `svd` returns `V`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from jaxtyping import Complex, Float, Int
from torch import Tensor

from .. import html

__all__ = ["FactoredMatrix"]

Index = int | slice | Sequence[int] | Tensor


def _work(t: Tensor) -> Tensor:
    """`t` in at least fp32, for torch.linalg."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FactoredMatrix:
    """The matrix `A @ B` `[*batch, m, n]` held as `A` `[*batch, m, r]` and `B` `[*batch, r, n]`.

    Leading axes of A and B broadcast against each other (as views: nothing is copied). Raises ValueError when a
    factor has fewer than two axes, the inner widths differ, or the leading axes do not broadcast.
    """

    A: Float[Tensor, "*batch m r"]
    B: Float[Tensor, "*batch r n"]

    def __post_init__(self) -> None:
        A, B = self.A, self.B
        if not isinstance(A, Tensor) or not isinstance(B, Tensor):
            raise TypeError(f"FactoredMatrix factors must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix factors need at least two axes [..., m, r] and [..., r, n]; got A "
                             f"{list(A.shape)}, B {list(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix factors must share the inner width: A {list(A.shape)} has "
                             f"{A.shape[-1]} columns, B {list(B.shape)} has {B.shape[-2]} rows")
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(f"the leading axes of A {list(A.shape)} and B {list(B.shape)} do not broadcast") from None
        object.__setattr__(self, "A", A.broadcast_to(*batch, *A.shape[-2:]))
        object.__setattr__(self, "B", B.broadcast_to(*batch, *B.shape[-2:]))

    # -- shape ---------------------------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """`[*batch, m, n]`: the shape of the product."""
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def batch_shape(self) -> torch.Size:
        return self.A.shape[:-2]

    @property
    def ndim(self) -> int:
        return self.A.ndim

    @property
    def ldim(self) -> int:
        """Rows of the product, `m`."""
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        """The inner width `r`: an upper bound on the rank (the rank itself is :meth:`rank`)."""
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        """Columns of the product, `n`."""
        return self.B.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.A.dtype, self.B.dtype)

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return (f"FactoredMatrix({list(self.shape)}, mdim={self.mdim}, "
                f"{str(self.dtype).removeprefix('torch.')}, {self.device})")

    def view(self) -> html.View:
        """A picture: the singular values as bars (one matrix), or the Frobenius norm of each matrix as a heat map
        (one or two leading axes, e.g. `layer x head`), then the two factors with their statistics. Computed from
        the factors (never the product); a notebook shows this for a `FactoredMatrix`."""
        head = (f"FactoredMatrix {list(self.shape)}, inner width {self.mdim}, "
                f"{str(self.dtype).removeprefix('torch.')}, {self.device}")
        parts = []
        batch = self.batch_shape
        if self.device.type != "meta":
            if len(batch) == 0:
                s = self.S[:64]
                parts.append(html.bars([f"σ{i}" for i in range(len(s))], s, title="singular values",
                                       note=f"{head}; the largest {len(s)} of {min(self.ldim, self.mdim, self.rdim)}"))
            elif len(batch) <= 2 and batch.numel() <= 4096:
                norms = self.norm().reshape(batch[0], -1)
                axes = ("layer", "head") if len(batch) == 2 else ("matrix", "")
                parts.append(html.heatmap(norms, rows=[f"{axes[0]} {i}" for i in range(norms.shape[0])],
                                          title="Frobenius norm of each matrix", row_axis=axes[0], col_axis=axes[1],
                                          signed=False, note=head))
        parts.append(html.tree_view({"A": self.A, "B": self.B}, name="factors"))
        return html.concat(parts, title=head)

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    # -- products ------------------------------------------------------------------------------------------------

    @property
    def AB(self) -> Float[Tensor, "*batch m n"]:
        """The product itself, `[*batch, m, n]` (for GPT-2's full circuits: vocab x vocab per head)."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "*batch r r"]:
        """The reverse product `B @ A` `[*batch, r, r]`, defined when the matrix is square (m == n)."""
        self._square("BA")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose `[*batch, n, m]`: `B^T @ A^T`."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    def __matmul__(self, other: "Tensor | FactoredMatrix") -> "Tensor | FactoredMatrix":
        """`self @ other`: a FactoredMatrix for a matrix or FactoredMatrix `other` (through the narrowest inner
        width), a tensor `[*batch, m]` for a vector `other` `[n]`."""
        if isinstance(other, FactoredMatrix):
            self._inner("@", self.rdim, other.ldim, other.shape)
            A, B, C, D = self.A, self.B, other.A, other.B
            inner = min(self.mdim, other.mdim, self.rdim)
            if inner == self.mdim:
                return FactoredMatrix(A, (B @ C) @ D)
            if inner == other.mdim:
                return FactoredMatrix(A @ (B @ C), D)
            return FactoredMatrix(A @ B, C @ D)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 1:
            self._inner("@", self.rdim, other.shape[0], other.shape)
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        self._inner("@", self.rdim, other.shape[-2], other.shape)
        if self.mdim <= self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> "Tensor | FactoredMatrix":
        """`other @ self`: a FactoredMatrix for a matrix `other` `[..., k, m]`, a tensor `[*batch, n]` for a
        vector `other` `[m]`."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 1:
            self._inner("@ (left)", other.shape[0], self.ldim, other.shape)
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        self._inner("@ (left)", other.shape[-1], self.ldim, other.shape)
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> "FactoredMatrix":
        """Scale by a number or a 0-d tensor (applied to `A`)."""
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"FactoredMatrix * x needs a scalar x, got a tensor of shape {list(scalar.shape)}; "
                             "use @ for a matrix product")
        if not isinstance(scalar, (int, float, Tensor)):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # -- decompositions ------------------------------------------------------------------------------------------

    def _core(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(Qa, C, Qb)` with `A @ B == Qa @ C @ Qb^T`: Qa, Qb orthonormal columns, C `[.., min(m,r), min(n,r)]`."""
        qa, ra = torch.linalg.qr(_work(self.A))        # A = Qa Ra
        qb, rb = torch.linalg.qr(_work(self.B).mT)     # B^T = Qb Rb, so B = Rb^T Qb^T
        return qa, ra @ rb.mT, qb

    def svd(self) -> tuple[Float[Tensor, "*batch m k"], Float[Tensor, "*batch k"], Float[Tensor, "*batch k n"]]:
        """The thin SVD `(U, S, Vh)` with `U @ diag(S) @ Vh == AB`, `k = min(m, r, n)`, S descending.

        Never forms the product: `A = Qa Ra` and `B^T = Qb Rb` (QR), then the SVD of the small core `Ra Rb^T`."""
        qa, core, qb = self._core()
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return qa @ u, s, vh @ qb.mT

    @property
    def S(self) -> Float[Tensor, "*batch k"]:
        """The singular values, descending."""
        return torch.linalg.svdvals(self._core()[1])

    def norm(self) -> Float[Tensor, "*batch"]:
        """The Frobenius norm of the product: that of the core `Ra Rb^T` (the orthonormal factors keep it)."""
        return torch.linalg.matrix_norm(self._core()[1])

    def rank(self, rtol: float | None = None) -> Int[Tensor, "*batch"]:
        """The numerical rank: singular values above `rtol * S.max()`. By default, above `max(m, r, n) * eps *
        |A|_2 |B|_2` instead: what the factors themselves carry as rounding (a factor that is itself a rounded
        product of lower rank, such as `W_Q @ W_K.T` built in floats, puts noise of that size into every direction
        of `AB`; measured up to a quarter of it). `torch.linalg.matrix_rank`'s `max(m, n) * eps * S.max()` counted
        that noise as a direction (a rank-1 A of 4 x 6 times a 6 x 2 B in float64: a second singular value of
        2.1e-16 against a threshold of 1.7e-16)."""
        s = self.S
        if rtol is not None:
            top = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
            return (s > rtol * top).sum(-1)
        eps = torch.finfo(s.dtype).eps * max(self.ldim, self.mdim, self.rdim)
        norms = torch.linalg.matrix_norm(_work(self.A), 2) * torch.linalg.matrix_norm(_work(self.B), 2)
        return (s > (eps * norms.to(s.dtype))[..., None]).sum(-1)

    @property
    def eigenvalues(self) -> Complex[Tensor, "*batch r"]:
        """The eigenvalues of `BA` `[*batch, r]` (complex): the nonzero eigenvalues of `AB` (when r < m, `AB` has
        m - r more zeros; when r > m, this has r - m more). Square matrices only."""
        self._square("eigenvalues")
        return torch.linalg.eigvals(_work(self.B) @ _work(self.A))

    def collapse_l(self) -> Float[Tensor, "*batch k n"]:
        """`diag(S) @ Vh` `[*batch, k, n]`: the matrix with its left orthonormal factor `U` dropped (as
        TransformerLens): `U @ collapse_l() == AB`, and `||collapse_l() @ X|| == ||AB @ X||` for any X."""
        _, s, vh = self.svd()
        return s[..., :, None] * vh

    def collapse_r(self) -> Float[Tensor, "*batch m k"]:
        """`U @ diag(S)` `[*batch, m, k]`: the matrix with its right orthonormal factor `Vh` dropped:
        `collapse_r() @ Vh == AB`, and `||X @ collapse_r()|| == ||X @ AB||`."""
        u, s, _ = self.svd()
        return u * s[..., None, :]

    # -- selection -----------------------------------------------------------------------------------------------

    def __getitem__(self, idx: Any) -> "FactoredMatrix":
        """Select along the leading (batch) axes only: `M[layer, head]`, `M[:, 2]`, `M[..., 0]` (`...` stands for
        batch axes). Rows and columns of the product: :meth:`rows`, :meth:`cols`."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = (*idx, slice(None), slice(None))  # the two matrix axes stay whole
        try:
            return FactoredMatrix(self.A[full], self.B[full])
        except IndexError as e:
            raise IndexError(f"FactoredMatrix[{idx}] indexes more than its {len(self.batch_shape)} leading axes "
                             f"{list(self.batch_shape)} (shape {list(self.shape)}); select rows and columns of the "
                             f"product with .rows(...) / .cols(...)") from e

    def rows(self, idx: Index) -> "FactoredMatrix":
        """The product's rows `idx` (rows of A), `[*batch, len(idx), n]`; an int keeps its axis (one row)."""
        return FactoredMatrix(self.A[..., self._sel(idx, self.ldim, "row"), :], self.B)

    def cols(self, idx: Index) -> "FactoredMatrix":
        """The product's columns `idx` (columns of B), `[*batch, m, len(idx)]`; an int keeps its axis."""
        return FactoredMatrix(self.A, self.B[..., :, self._sel(idx, self.rdim, "column")])

    def unsqueeze(self, dim: int) -> "FactoredMatrix":
        """A new leading axis of size 1 at `dim` (0 <= dim <= number of leading axes)."""
        if not 0 <= dim <= len(self.batch_shape):
            raise ValueError(f"unsqueeze dim must be in 0..{len(self.batch_shape)} (a leading axis), got {dim}")
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    # -- checks --------------------------------------------------------------------------------------------------

    def _square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise ValueError(f"FactoredMatrix.{what} needs a square matrix (m == n); this one is {list(self.shape)}")

    def _inner(self, op: str, left: int, right: int, other_shape: Sequence[int]) -> None:
        if left != right:
            raise ValueError(f"FactoredMatrix {op}: inner widths differ ({left} vs {right}) between "
                             f"{list(self.shape)} and {list(other_shape)}")

    @staticmethod
    def _sel(idx: Index, size: int, what: str) -> Index:
        if isinstance(idx, int):
            if not -size <= idx < size:
                raise IndexError(f"{what} {idx} is out of range for {size} {what}s")
            return slice(idx, idx + 1 if idx != -1 else None)
        return idx


def _flatten(m: FactoredMatrix) -> tuple[list[Tensor], None]:
    return [m.A, m.B], None


def _flatten_with_keys(m: FactoredMatrix) -> tuple[list[tuple[Any, Tensor]], None]:
    return [(pytree.GetAttrKey("A"), m.A), (pytree.GetAttrKey("B"), m.B)], None


def _unflatten(children: Any, context: None) -> FactoredMatrix:
    # No validation: a transform may carry other leaves (batched tensors, shapes) through the same structure.
    out = object.__new__(FactoredMatrix)
    object.__setattr__(out, "A", children[0])
    object.__setattr__(out, "B", children[1])
    return out


pytree.register_pytree_node(FactoredMatrix, _flatten, _unflatten, serialized_type_name="gpt2fn.FactoredMatrix",
                            flatten_with_keys_fn=_flatten_with_keys)

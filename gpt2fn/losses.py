"""The language-model loss at the unembedding: `mean_i -log softmax(x_i @ W^T)[target_i]`, fused and chunked.

Glossary: `rows` = batch x seq positions flattened, `d_model`, `vocab`. References: the fused linear
cross-entropy of Liger-Kernel (Hsu et al. 2024) and "Cut your losses in large-vocabulary language models"
(Wijmans et al. 2024).

Why: with GPT-2's 50,257-word vocabulary the head's `[rows, vocab]` logits dwarf every other activation
(batch 8 x ctx 256: 411 MB in fp32), and the plain `F.cross_entropy(x @ W^T)` makes four tensors of that
size per step (logits, log-probabilities, the zero-filled gradient of the pick, the gradient of the logits).
`head_cross_entropy` walks the rows in chunks and forms the gradient of each chunk in the same pass as its loss
(`softmax - onehot`, a few rows at a time), so no `[rows, vocab]` tensor exists: it is faster on CPU (less
memory traffic, no page faults for fresh buffers) and uses far less memory for long contexts.

It is a `torch.autograd.Function`, so `torch.func.grad`, `grad_and_value`, `vjp`, `jacrev`, `vmap` of those
(one fused pass per example) and `torch.autograd` see an ordinary differentiable function. Because the gradient
is formed in the forward pass it is differentiable once: second derivatives (`hessian`, grad of grad) raise
instead of returning wrong values -- use `F.cross_entropy` on `gpt2fn.forward`'s logits there, as `gpt2fn.loss`
does by default. When nothing asks for a reverse-mode gradient (evaluation under `no_grad`, forward mode) only
the loss is computed, chunk by chunk, with plain differentiable ops.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["head_cross_entropy", "CHUNK_ROWS"]

CHUNK_ROWS = 512
"""Rows per chunk: large enough for efficient products, small enough that a chunk's logits stay modest
(512 x 50,257 fp32 = 103 MB, one buffer reused by every chunk)."""


def _chunk_loss_(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Turn fp32 `logits [rows, vocab]` in place into `exp(logits - max)`; returns the summed loss of the valid
    rows and the per-row normaliser `sum exp` (so that `logits / norm` is the softmax)."""
    picked = logits.gather(1, targets[:, None])
    top = logits.amax(1, keepdim=True)
    logits.sub_(top).exp_()
    norm = logits.sum(1, keepdim=True)
    nll = norm.log() + top - picked
    return (nll[:, 0] * valid).sum(), norm


class _HeadCrossEntropy(torch.autograd.Function):
    """loss = mean over valid rows of `logsumexp(x W^T) - (x W^T)[target]`; the forward pass also returns the
    gradients for a unit upstream gradient, which backward scales."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, targets: Tensor, valid: Tensor, chunk: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        rows, vocab = x.shape[0], w.shape[0]
        count = valid.sum()
        weight = valid.float() / count  # d loss / d nll_row
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x)
        acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        buf = torch.empty(min(chunk, rows), vocab, dtype=torch.float32, device=x.device)
        fp32 = x.dtype == torch.float32
        wx = w if w.dtype == x.dtype else w.to(x.dtype)  # 16-bit weights under fp32 activations (CPU): widened once
        for s in range(0, rows, chunk):
            xc = x[s:s + chunk]
            logits = buf[:xc.shape[0]]
            if fp32:
                torch.mm(xc, wx.T, out=logits)
            else:
                logits.copy_(xc @ wx.T)
            part, norm = _chunk_loss_(logits, targets[s:s + chunk], valid[s:s + chunk])
            total += part
            # softmax - onehot, weighted: the gradient of this chunk's share of the mean loss w.r.t. its logits
            logits.mul_(weight[s:s + chunk, None] / norm)
            logits.scatter_add_(1, targets[s:s + chunk, None], -weight[s:s + chunk, None])
            grad = logits if fp32 else logits.to(x.dtype)
            torch.mm(grad, wx, out=dx[s:s + chunk])
            if fp32:
                acc.addmm_(grad.T, xc)
            else:
                acc.add_((grad.T @ xc).float())
        dw = acc if w.dtype == torch.float32 else acc.to(w.dtype)
        return total / count, dx, dw

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        _, dx, dw = output
        ctx.mark_non_differentiable(dx, dw)
        ctx.save_for_backward(dx, dw)

    @staticmethod
    @once_differentiable  # the saved gradients are constants: a second derivative through them must fail loudly
    def backward(ctx, g: Tensor, _gdx: Tensor, _gdw: Tensor):  # noqa: ANN001, ANN205
        dx, dw = ctx.saved_tensors
        return dx * g.to(dx.dtype), dw * g.to(dw.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, w, targets, valid, chunk):  # noqa: ANN001, ANN205
        """Under `torch.func.vmap` (e.g. per-example gradients): one fused pass per example, stacked."""
        def pick(t: Tensor, dim: int | None, i: int) -> Tensor:
            return t if dim is None else t.select(dim, i)

        inputs, dims = (x, w, targets, valid), in_dims[:4]
        outs = [_HeadCrossEntropy.forward(*(pick(t, d, i) for t, d in zip(inputs, dims, strict=True)), chunk)
                for i in range(info.batch_size)]
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True)), (0, 0, 0)


def _loss_only(x: Tensor, w: Tensor, targets: Tensor, valid: Tensor, chunk: int) -> Tensor:
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        logits = (x[s:s + chunk] @ w.T).float()
        total = total + _chunk_loss_(logits, targets[s:s + chunk], valid[s:s + chunk])[0]
    return total / valid.sum()


def head_cross_entropy(x: Float[Tensor, "rows d_model"], w: Float[Tensor, "vocab d_model"],
                       targets: Int[Tensor, " rows"], *, ignore_index: int = -100,
                       chunk_rows: int = CHUNK_ROWS) -> Float[Tensor, ""]:
    """Mean cross-entropy of `targets` under the logits `x @ w.T` (fp32 softmax), without materialising them.

    Equals `F.cross_entropy((x @ w.T).float(), targets, ignore_index=ignore_index)` up to float rounding, and
    so do its gradients w.r.t. `x` and `w` (tests/test_losses.py). `w` is the unembedding as stored by the tied
    token embedding, `[vocab, d_model]`. Rows whose target is `ignore_index` count for nothing; if every row is
    ignored the mean is nan, as with `F.cross_entropy`."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"head_cross_entropy: need x [rows, d_model], w [vocab, d_model] and targets [rows]; got "
                         f"x {list(x.shape)}, w {list(w.shape)}, targets {list(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _HeadCrossEntropy.apply(x, w, safe, valid, chunk_rows)[0]
    return _loss_only(x, w, safe, valid, chunk_rows)

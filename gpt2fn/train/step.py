"""The train step: gradients by `torch.func.grad_and_value` of the pure loss, then clip and AdamW.

    params, opt_state, metrics = train_step(params, opt_state, ids, targets, lr=1e-3)

Everything the step reads is an argument and everything it changes is returned: the parameter and optimizer trees
come back new, and dropout draws from the explicit `generator` (None: no dropout), which is the one object the
step advances. `grad_reduce` is where data parallel plugs in (see `gpt2fn.train.distributed`): it receives
`(grads, loss)` and returns them averaged over the processes.

Gradient accumulation (`micro_batches=K`) splits the batch into K equal micro-batches run one after another and
averages their gradients (each micro-batch's mean loss divided by K, as nanoGPT does), so a step over a batch of
B*K windows equals one without accumulation up to float rounding while holding only B windows' activations.
Mixed precision (`dtype=torch.bfloat16 / float16`) differentiates the loss of the params cast to that dtype with
respect to the fp32 master params; for fp16, `loss_scale` multiplies the loss and an overflowing step is skipped
(see `gpt2fn.train.precision`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..model import loss as lm_loss
from ..params import GPTParams
from .optim import AdamWHParams, AdamWState, adamw_update, clip_by_global_norm
from .precision import cast_tree, unscale

__all__ = ["StepMetrics", "loss_and_grads", "accumulated_grads", "train_step"]

DEFAULT_HPARAMS = AdamWHParams()
GradReduce = Callable[[Any, Tensor], tuple[Any, Tensor]]


class StepMetrics(NamedTuple):
    """What a step reports: the mean loss of its batch (0-d tensor), the gradient norm before clipping, and
    whether the gradients were finite (False: an fp16 overflow, the update was skipped)."""

    loss: Tensor
    grad_norm: Tensor
    finite: Tensor | bool = True


def loss_and_grads(params: GPTParams, ids: Tensor, targets: Tensor, *,
                   generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                   scale: float = 1.0) -> tuple[GPTParams, Tensor]:
    """`(d loss / d params, loss)`: the gradient tree has the structure of `params`; a tied head's gradient
    accumulates in its one `tok_emb` leaf. The head and the cross-entropy run fused and chunked
    (`gpt2fn.loss(..., fused_head=True)`): no `[batch x seq, vocab]` logits are held.

    `dtype`: compute in that dtype (the params cast inside the differentiated function, so the gradients come
    back in the params' own dtype). `scale`: the gradients are of `scale * loss` (the returned loss is not)."""
    if dtype is None and scale == 1.0:
        return torch.func.grad_and_value(lm_loss)(params, ids, targets, generator=generator, fused_head=True)

    def scaled(p: GPTParams) -> tuple[Tensor, Tensor]:
        value = lm_loss(cast_tree(p, dtype), ids, targets, generator=generator, fused_head=True).float()
        return value * scale, value

    grads, value = torch.func.grad(scaled, has_aux=True)(params)
    return grads, value


def accumulated_grads(params: GPTParams, ids: Tensor, targets: Tensor, *, micro_batches: int = 1,
                      generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                      scale: float = 1.0) -> tuple[GPTParams, Tensor]:
    """`loss_and_grads` of the batch split into `micro_batches` equal parts in order: the mean of their
    gradients and of their losses (nanoGPT's `loss / gradient_accumulation_steps`). Only one micro-batch's
    activations are alive at a time; the gradient sum lives in the first micro-batch's gradient buffers.
    Dropout draws from `generator` micro-batch after micro-batch, so with dropout on the masks differ from those
    of one batch of the whole size (the expected gradient does not)."""
    if micro_batches < 1 or ids.shape[0] % micro_batches:
        raise ValueError(f"micro_batches must be >= 1 and divide the batch of {ids.shape[0]}, got {micro_batches}")
    if micro_batches == 1:
        return loss_and_grads(params, ids, targets, generator=generator, dtype=dtype, scale=scale)
    total, losses = None, []
    for i, j in zip(ids.chunk(micro_batches), targets.chunk(micro_batches), strict=True):
        grads, value = loss_and_grads(params, i, j, generator=generator, dtype=dtype, scale=scale / micro_batches)
        losses.append(value.detach())
        if total is None:
            total = grads
        else:
            torch._foreach_add_(_unique(total), _unique(grads))
    return total, torch.stack(losses).mean()


def _unique(tree: Any) -> list[Tensor]:
    return list({id(t): t for t in torch.utils._pytree.tree_leaves(tree)}.values())


def train_step(params: GPTParams, opt_state: AdamWState, ids: Tensor, targets: Tensor, *, lr: float,
               hp: AdamWHParams = DEFAULT_HPARAMS, clip_norm: float | None = 1.0,
               generator: torch.Generator | None = None, grad_reduce: GradReduce | None = None,
               donate: bool = False, fused: bool | None = None, micro_batches: int = 1,
               dtype: torch.dtype | None = None, loss_scale: float | None = None
               ) -> tuple[GPTParams, AdamWState, StepMetrics]:
    """One optimisation step on the batch `(ids, targets)`; returns `(params, opt_state, metrics)`.

    `micro_batches=K`: accumulate K equal micro-batches (see `accumulated_grads`). `dtype`: the compute dtype
    (params stay as given, fp32 master weights). `loss_scale`: fp16 loss scaling; gradients are unscaled before
    clipping, and if any is not finite the params and optimizer state come back unchanged with
    `metrics.finite` False (the caller updates its `LossScale` with `loss_scale_update`).

    `donate=True`: the new params and state reuse the buffers of the old ones (see `adamw_update`); the loop
    uses it, since it never reads a step's inputs again. The results are the same values either way.
    `fused`: AdamW as one fused kernel (`adamw_update(fused=True)`, = `torch.optim.AdamW(fused=True)`); None
    (see `adamw_update`) picks it on CPU and CUDA whenever params and moments share one dtype (fp32 training),
    else the multi-tensor path."""
    grads, loss = accumulated_grads(params, ids, targets, micro_batches=micro_batches, generator=generator,
                                    dtype=dtype, scale=1.0 if loss_scale is None else loss_scale)
    if grad_reduce is not None:
        grads, loss = grad_reduce(grads, loss)
    finite: Tensor | bool = True
    if loss_scale is not None:
        grads, finite = unscale(grads, loss_scale)
        if not bool(finite):  # GradScaler's skipped step: nothing changes but the scale (the caller's)
            return params, opt_state, StepMetrics(loss.detach(), torch.tensor(float("inf")), finite)
    grads, norm = clip_by_global_norm(grads, clip_norm, donate=True)  # the fresh gradients are ours to reuse
    params, opt_state = adamw_update(grads, opt_state, params, lr=lr, hp=hp, donate=donate, fused=fused)
    return params, opt_state, StepMetrics(loss.detach(), norm.detach(), finite)

"""The train step: gradients by `torch.func.grad_and_value` of the pure loss, then clip and AdamW.

    params, opt_state, metrics = train_step(params, opt_state, ids, targets, lr=1e-3)

Everything the step reads is an argument and everything it changes is returned: the parameter and optimizer trees
come back new, and dropout draws from the explicit `generator` (None: no dropout), which is the one object the
step advances. `grad_reduce` is where data parallel plugs in (see `gpt2fn.train.distributed`): it receives
`(grads, loss)` and returns them averaged over the processes.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..model import loss as lm_loss
from ..params import GPTParams
from .optim import AdamWHParams, AdamWState, adamw_update, clip_by_global_norm

__all__ = ["StepMetrics", "loss_and_grads", "train_step"]

DEFAULT_HPARAMS = AdamWHParams()
GradReduce = Callable[[Any, Tensor], tuple[Any, Tensor]]


class StepMetrics(NamedTuple):
    """What a step reports: the mean loss of its batch (0-d tensor) and the gradient norm before clipping."""

    loss: Tensor
    grad_norm: Tensor


def loss_and_grads(params: GPTParams, ids: Tensor, targets: Tensor, *,
                   generator: torch.Generator | None = None) -> tuple[GPTParams, Tensor]:
    """`(d loss / d params, loss)`: the gradient tree has the structure of `params`; a tied head's gradient
    accumulates in its one `tok_emb` leaf. The head and the cross-entropy run fused and chunked
    (`gpt2fn.loss(..., fused_head=True)`): no `[batch x seq, vocab]` logits are held."""
    return torch.func.grad_and_value(lm_loss)(params, ids, targets, generator=generator, fused_head=True)


def train_step(params: GPTParams, opt_state: AdamWState, ids: Tensor, targets: Tensor, *, lr: float,
               hp: AdamWHParams = DEFAULT_HPARAMS, clip_norm: float | None = 1.0,
               generator: torch.Generator | None = None, grad_reduce: GradReduce | None = None,
               donate: bool = False, fused: bool | None = None) -> tuple[GPTParams, AdamWState, StepMetrics]:
    """One optimisation step on the batch `(ids, targets)`; returns `(params, opt_state, metrics)`.

    `donate=True`: the new params and state reuse the buffers of the old ones (see `adamw_update`); the loop
    uses it, since it never reads a step's inputs again. The results are the same values either way.
    `fused`: AdamW as one fused kernel (`adamw_update(fused=True)`, = `torch.optim.AdamW(fused=True)`); None
    (see `adamw_update`) picks it on CPU and CUDA whenever params and moments share one dtype (fp32 training),
    else the multi-tensor path."""
    grads, loss = loss_and_grads(params, ids, targets, generator=generator)
    if grad_reduce is not None:
        grads, loss = grad_reduce(grads, loss)
    grads, norm = clip_by_global_norm(grads, clip_norm, donate=True)  # the fresh gradients are ours to reuse
    params, opt_state = adamw_update(grads, opt_state, params, lr=lr, hp=hp, donate=donate, fused=fused)
    return params, opt_state, StepMetrics(loss.detach(), norm.detach())

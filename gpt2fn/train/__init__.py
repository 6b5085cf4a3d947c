"""Training under torch.func: a functional AdamW over the params pytree, token data, the train step, the loop
with checkpoints that lose nothing, and data parallel with torchrun. See `gpt2fn train --help`.

    from gpt2fn import train as T
    state          = T.adamw_init(params)
    params, state, metrics = T.train_step(params, state, ids, targets, lr=1e-3)
    result         = T.train(params, T.TrainConfig(data="corpus.txt", out="runs/a", steps=500))
"""

from ..losses import perplexity
from .data import (
    corpus_files,
    eval_starts,
    load_tokens,
    pydoc_prose,
    sample_batch,
    sample_starts,
    split_tokens,
    windows,
)
from .distributed import DistInfo, all_reduce_mean
from .loop import TrainConfig, TrainResult, describe_schedule, evaluate, train
from .optim import (
    AdamWHParams,
    AdamWState,
    adamw_init,
    adamw_update,
    clip_by_global_norm,
    decay_mask,
    global_norm,
    warmup_cosine,
)
from .precision import LossScale, cast_tree, compute_dtype, loss_scale_init, loss_scale_update, unscale
from .state import TrainState, load_state, save_state
from .step import StepMetrics, accumulated_grads, loss_and_grads, train_step

__all__ = [
    "AdamWHParams", "AdamWState", "adamw_init", "adamw_update", "clip_by_global_norm", "decay_mask", "global_norm",
    "warmup_cosine",
    "corpus_files", "load_tokens", "split_tokens", "sample_batch", "sample_starts", "windows", "eval_starts",
    "pydoc_prose",
    "StepMetrics", "loss_and_grads", "accumulated_grads", "train_step",
    "TrainConfig", "TrainResult", "train", "evaluate", "perplexity", "describe_schedule",
    "LossScale", "loss_scale_init", "loss_scale_update", "unscale", "cast_tree", "compute_dtype",
    "TrainState", "save_state", "load_state",
    "DistInfo", "all_reduce_mean",
]

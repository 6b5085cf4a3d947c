"""gpt2fn: GPT-2 as a functional, shape-checked program over PyTorch primitives.

    params = gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)
    logits = gpt2fn.forward(params, ids)                    # [batch, seq] -> [batch, seq, vocab]
    grads  = torch.func.grad(gpt2fn.loss)(params, ids, targets)
"""

# namespaces: gpt2fn.processors (generation rules: bad_words, sequence_bias, top_k, ...) and gpt2fn.train
from . import processors, train
from .beam import beam_search
from .cache import DonatedCacheError, KVCache, grow, init_cache, rollback, select_rows
from .checkpoints import Checkpoint, CheckpointError, load, load_checkpoint, save, save_hf
from .config import PRESETS, GPTConfig, preset
from .details import Generation
from .devices import default_device
from .generate import generate, generate_tokens, stream
from .layers import attention, attention_pattern, block, gelu, layer_norm, mlp
from .model import forward, loss, positions_from_mask
from .params import (
    AttentionParams,
    BlockParams,
    GPTParams,
    Int8Matrix,
    LayerNormParams,
    MLPParams,
    count_params,
    init_params,
    named_leaves,
    params_from_dict,
    params_to_dict,
    tree_map,
    tree_to,
    validate,
)
from .quantize import QuantizedWeightsError, dequantize, quantize
from .scoring import Score, score
from .shapes import ShapeError, checks_enabled, shape_checks
from .speculative import PromptLookup
from .step import compiled_decode_step, decode_step
from .study import (
    Activations,
    RowEdit,
    ablate_head,
    attention_patterns,
    batched_runs,
    direct_logit_attribution,
    forward_with,
    logit_diff,
    logit_lens,
    patch,
    patching_sweep,
    per_example_grad_norms,
    per_example_grads,
    run_with_capture,
    site_grads,
    site_names,
    steer,
)
from .tokenizer import decode, encode
from .transforms import center_unembed, center_writing_weights, fold_layer_norm, fold_value_biases

__version__ = "0.1.0"

# The public API, one line per room of the package (tests/test_structure.py checks it names every binding above).
__all__ = [
    "GPTConfig", "PRESETS", "preset",                                                     # config
    "GPTParams", "BlockParams", "AttentionParams", "MLPParams", "LayerNormParams",        # params: the pytree
    "init_params", "count_params", "tree_to", "tree_map", "named_leaves", "params_to_dict", "params_from_dict",
    "validate", "quantize", "dequantize", "Int8Matrix", "QuantizedWeightsError",         # quantize: int8 weights
    "load", "save", "load_checkpoint", "save_hf", "Checkpoint", "CheckpointError",        # checkpoints
    "encode", "decode",                                                                   # tokenizer: text <-> ids
    "layer_norm", "gelu", "attention", "attention_pattern", "mlp", "block",               # layers
    "forward", "loss", "positions_from_mask",                                             # model
    "KVCache", "init_cache", "rollback", "select_rows", "grow", "DonatedCacheError",      # cache
    "decode_step", "compiled_decode_step",                                                # step
    "generate", "generate_tokens", "stream", "beam_search",                               # generate, beam
    "processors", "Generation",                                                           # processors, details
    "PromptLookup",                                                                       # speculative
    "default_device",                                                                     # devices
    "score", "Score",                                                                     # scoring
    "shape_checks", "checks_enabled", "ShapeError",                                       # shapes
    "train",                                                                              # train (a namespace)
    "forward_with", "run_with_capture", "Activations", "site_names", "patch", "ablate_head", "steer",  # study
    "patching_sweep", "batched_runs", "RowEdit",
    "site_grads", "per_example_grads", "per_example_grad_norms", "logit_diff",
    "logit_lens", "direct_logit_attribution", "attention_patterns",
    "fold_layer_norm", "center_unembed", "center_writing_weights", "fold_value_biases",   # transforms
]

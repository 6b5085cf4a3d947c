"""Study tools: capture and edit activations as function arguments, and the views built on them.

Everything here is a pure function of its arguments. Nothing is registered on the model, patched or left behind:
`forward_with(params, ids, capture=..., edit=...)` builds a `tap` for that one call (see `gpt2fn.layers`) and
returns what it captured.

    logits, acts = run_with_capture(params, ids, ["blocks.3.attn.pattern", "blocks.*.resid_post"])
    logits, _ = forward_with(params, ids, edit={"blocks.3.attn.z": ablate_head(7)})          # zero-ablate 3.7
    logits, _ = forward_with(params, corrupt, edit={"blocks.5.resid_pre": patch(clean_acts["blocks.5.resid_pre"],
                                                                                 positions=[4])})
    grads = site_grads(params, ids, "blocks.*.resid_mid", lambda lg: logit_diff(lg, good, bad).sum())

Sites (`{i}` is the layer, 0-based; axis names from `gpt2fn.shapes`; a request may be a glob pattern):

| site                      | axes                          | what                                                 |
|---------------------------|-------------------------------|------------------------------------------------------|
| `embed.tok`               | batch seq d_model             | token embeddings `tok_emb[ids]`                      |
| `embed.pos`               | (batch) seq d_model           | position embeddings (no batch axis by default)       |
| `embed`                   | batch seq d_model             | their sum: the residual stream entering block 0      |
| `blocks.{i}.resid_pre`    | batch seq d_model             | residual stream entering block i                     |
| `blocks.{i}.attn.q_input` | batch heads seq d_model       | resid_pre as each head's q reads it (`k/v_input`)    |
| `blocks.{i}.ln1.scale`    | batch seq 1                   | sqrt(var + eps) of ln1's input (also `ln2.scale`)   |
| `blocks.{i}.ln1.normalized` | batch seq d_model           | (x - mean) / scale, before the affine (also `ln2`)   |
| `blocks.{i}.ln1`          | batch seq d_model             | first layer norm's output (attention input)          |
| `blocks.{i}.attn.q/k/v`   | batch heads seq head_dim      | queries, keys, values (k/v: this call's positions)   |
| `blocks.{i}.attn.scores`  | batch heads seq kv_seq        | q k^T / sqrt(head_dim), -inf where masked            |
| `blocks.{i}.attn.pattern` | batch heads seq kv_seq        | softmax of the scores: rows sum to 1 over the past   |
| `blocks.{i}.attn.z`       | batch heads seq head_dim      | per-head outputs (pattern @ v), before `w_out`       |
| `blocks.{i}.attn.result`  | batch seq heads d_model       | each head's output after `w_out`; + `b_out` sums to out |
| `blocks.{i}.attn.out`     | batch seq d_model             | attention output after `w_out`, `b_out`              |
| `blocks.{i}.resid_mid`    | batch seq d_model             | residual stream after the attention branch           |
| `blocks.{i}.ln2`          | batch seq d_model             | second layer norm's output (MLP input)               |
| `blocks.{i}.mlp.pre`      | batch seq d_mlp               | MLP hidden pre-activation `x w_fc + b_fc`            |
| `blocks.{i}.mlp.post`     | batch seq d_mlp               | after GELU                                           |
| `blocks.{i}.mlp.out`      | batch seq d_model             | MLP output after `w_proj`, `b_proj`                  |
| `blocks.{i}.resid_post`   | batch seq d_model             | residual stream leaving block i                      |
| `final_norm.scale`        | batch seq 1                   | sqrt(var + eps) of the last block's residual         |
| `final_norm.normalized`   | batch seq d_model             | (x - mean) / scale, before the affine                |
| `final_norm`              | batch seq d_model             | final layer norm's output                            |
| `logits`                  | batch seq vocab               | the model's output                                   |

Attention `scores`/`pattern` are computed only when captured or edited (the explicit attention path); any other
capture keeps fused SDPA, so capturing changes no logits. Likewise `attn.q_input/k_input/v_input`
(TransformerLens's `hook_q_input` with split qkv input, with heads on axis 1 like `attn.q` so that `patch(...,
heads=h)` applies): a broadcast view of `resid_pre` when only read; an edited head's input goes through ln1 on its
own and through that head's columns of `w_qkv`, so only that head's queries (keys, values) change -- path patching
into one head. An edit is `fn(value) -> value` of the same shape; a captured site holds the value after its edit.
The positions (query) axis of every site is the second to last, except `attn.result` (axis 1).

Views: `logit_lens`, `direct_logit_attribution`, `attention_patterns`, `save_attention_map` (PNG); as HTML
(`gpt2fn.html`, drawn from the data): `view_attention`, `view_logit_lens`, `view_logprobs`, `view_score`,
`view_dla`, `view_sweep`, `view_report`, written with `save_html(view, path)`. Results show themselves in a notebook
(`_repr_html_`): `Activations`, `FactoredMatrix`, `HeadScores`, `LogitAttribution`, `Components`.
Decomposition (`gpt2fn.study.decompose`, over `(params, acts)`; `run_for_decompose` captures what it reads):
`accumulated_resid`, `decompose_resid` (embeddings, attention/MLP outputs, or heads/neurons; sums to the stream),
`stack_head_results`, `stack_neuron_results`, `apply_ln_to_stack` (frozen-scale norm), `logit_attribution`,
`decompose_logit` (direct logit attribution at any point and granularity, neurons chunked) -> `Components`.
Part of a run: `forward_with(params, resid, start_at_layer=L, stop_at_layer=M, ...)` (see `gpt2fn.forward`).
While generating: `gpt2fn.generate_tokens(..., capture=sites, edit=...)` returns `(ids, acts)`, every position
stacked along the sequence axis, equal to `forward_with` on the final ids (`generation_tap` records the steps).
Compiled: `torch.compile(forward_with, fullgraph=True)` with steer/patch/ablate edits is one graph (an edit reads
its positions and heads once, when made); `generate(..., compile=True, edit=)` one graph for every step.
Transforms: `patching_sweep` (layers x positions as one batch on fused attention; its engine `batched_runs`),
`head_patching_sweep` (layer x head [x position] at `attn.z/q/k/v/pattern/scores/result`), `path_patching_sweep` /
`path_patch` (sender head or MLP -> `Receiver`s through the residual stream only, Wang et al. 2022),
`site_grads` (`grad`/`jacrev` w.r.t. sites), `per_example_grads` / `per_example_grad_norms` (`vmap(grad)`).
Attribution (`gpt2fn.study.attribution`): `attribution_patching` (AtP, any sites, `attribution_dims`),
`edge_attribution_patching` (EAP and, with `steps=`, EAP-IG) -> `EdgeScores`: two forwards and one backward.
SAEs (`gpt2fn.study.sae`): `load_sae`/`save_sae` in SAE-Lens's format, `sae_encode`/`sae_decode`, `run_with_saes`
/ `splice_sae` (error term kept), `ablate_features`, `steer_features`, `clamp_features`, `prepare_for_sae`.
Interventions as one `vmap` call (`gpt2fn.study.interventions`): `vmap_edits`, `steering_sweep`, `ablation_sweep`.
Circuits: `ov_circuit`, `qk_circuit`, `full_ov_circuit`, `full_qk_circuit` as `FactoredMatrix` values,
`composition_scores(params, "q" | "k" | "v")` `[layer, heads, layer, heads]`, `composition_score` (one pair).
Head detectors: `head_detector_scores` (previous-token, duplicate-token, induction `[layer, head]` on
`repeated_tokens`), and per pattern `previous_token_score`, `duplicate_token_score`, `induction_score`.
Weight transforms: `gpt2fn.transforms`.
"""

from .attribution import EdgeScores, attribution_dims, attribution_patching, edge_attribution_patching
from .circuits import (
    composition_score,
    composition_scores,
    full_ov_circuit,
    full_qk_circuit,
    ov_circuit,
    qk_circuit,
)
from .decompose import (
    DECOMPOSE_SITES,
    Components,
    accumulated_resid,
    apply_ln_to_stack,
    decompose_logit,
    decompose_resid,
    logit_attribution,
    run_for_decompose,
    stack_head_results,
    stack_neuron_results,
)
from .detectors import (
    HeadScores,
    duplicate_token_score,
    head_detector_scores,
    induction_score,
    offset_attention,
    previous_token_score,
    repeated_tokens,
)
from .factored import FactoredMatrix
from .interventions import ablation_sweep, steering_sweep, vmap_edits
from .paths import RECEIVER_SITES, Receiver, Sender, path_patch, path_patching_sweep
from .run import Edit, ablate_head, forward_with, patch, run_with_capture, steer
from .sae import (
    SAEConfig,
    SAEError,
    SAEParams,
    ablate_features,
    clamp_features,
    hook_to_site,
    load_sae,
    prepare_for_sae,
    run_with_saes,
    sae_decode,
    sae_encode,
    sae_forward,
    sae_from_dict,
    sae_site_value,
    save_sae,
    splice_sae,
    steer_features,
)
from .sites import LAYER_SITES, SITE_DIMS, Activations, resolve_sites, site_dims, site_names
from .sweeps import (
    HEAD_SITES,
    RowEdit,
    batched_runs,
    head_patching_sweep,
    logit_diff,
    patching_sweep,
    per_example_grad_norms,
    per_example_grads,
    site_grads,
)
from .views import (
    LogitAttribution,
    attention_patterns,
    direct_logit_attribution,
    lens_labels,
    logit_lens,
    save_attention_map,
    save_html,
    token_labels,
    token_strings,
    view_attention,
    view_dla,
    view_logit_lens,
    view_logprobs,
    view_report,
    view_score,
    view_sweep,
)
from .weights import W_E, W_U, HeadWeights, W_pos, attn_weights

__all__ = [
    "forward_with", "run_with_capture", "Edit", "patch", "ablate_head", "steer",
    "Activations", "SITE_DIMS", "LAYER_SITES", "site_names", "site_dims", "resolve_sites",
    "logit_diff", "patching_sweep", "RowEdit", "batched_runs", "HEAD_SITES", "head_patching_sweep",
    "Sender", "Receiver", "RECEIVER_SITES", "path_patch", "path_patching_sweep",
    "HeadScores", "head_detector_scores", "repeated_tokens", "offset_attention", "previous_token_score",
    "duplicate_token_score", "induction_score",
    "site_grads", "per_example_grads", "per_example_grad_norms",
    "attribution_patching", "attribution_dims", "edge_attribution_patching", "EdgeScores",
    "SAEConfig", "SAEParams", "SAEError", "load_sae", "save_sae", "sae_encode", "sae_decode", "sae_forward",
    "sae_from_dict", "hook_to_site", "sae_site_value", "splice_sae", "run_with_saes", "ablate_features",
    "steer_features", "clamp_features", "prepare_for_sae",
    "vmap_edits", "steering_sweep", "ablation_sweep",
    "logit_lens", "lens_labels", "LogitAttribution", "direct_logit_attribution", "attention_patterns",
    "token_labels", "save_attention_map", "token_strings", "save_html", "view_attention", "view_logit_lens",
    "view_logprobs", "view_score", "view_dla", "view_sweep", "view_report",
    "HeadWeights", "attn_weights", "W_E", "W_pos", "W_U",
    "FactoredMatrix", "ov_circuit", "qk_circuit", "full_ov_circuit", "full_qk_circuit",
    "composition_scores", "composition_score",
    "Components", "DECOMPOSE_SITES", "run_for_decompose", "accumulated_resid", "decompose_resid",
    "stack_head_results", "stack_neuron_results", "apply_ln_to_stack", "logit_attribution", "decompose_logit",
]

"""HTML views that a person can explore, from pure data, with no network at view time.

One file or one notebook cell each, CSS and JS inline, no CDN and no build step. Every token string and label is
escaped (`escape`), and data handed to scripts is embedded with `script_json` (`<`, `>`, `&`, U+2028, U+2029 as
`\\uXXXX`), so a prompt such as `<script>alert(1)</script>` is shown as text and runs nothing.

    tokens_view(tokens, values)             tokens coloured by a per-token value (log-probs, a neuron, DLA, ...)
    attention_view(tokens, patterns)        per layer and head; hover a token to see where it attends
    heatmap(grid, rows=, cols=)             sweeps (layer x position, layer x head), attribution, detector scores
    lens_table(top_tokens, top_probs, ...)  the logit lens: top tokens per layer and position
    bars(labels, values)                    direct logit attribution
    tree_view(obj)                          a GPTParams / Activations pytree: shapes, dtypes, statistics

Each returns a `View` (`_repr_html_()` for notebooks, `page()` for a file); `concat` or `+` puts several on one
page. The model-aware builders (from params and ids) are in `gpt2fn.study.views`, with `save_html(view, path)`.
This package imports nothing else of gpt2fn, so any module may use it.
"""

from .core import CSP, View, colour, concat, display_token, escape, fmt, script_json, text_colour
from .tree import STATS_LIMIT, tensor_summary, tree_view
from .widgets import (
    ATTENTION_BUDGET,
    MAX_CELLS,
    attention_topk,
    attention_view,
    bars,
    choose_k,
    heatmap,
    lens_table,
    tokens_view,
)

__all__ = [
    "View", "concat", "escape", "script_json", "display_token", "colour", "text_colour", "fmt", "CSP",
    "tokens_view", "attention_view", "attention_topk", "choose_k", "heatmap", "lens_table", "bars", "tree_view",
    "tensor_summary", "ATTENTION_BUDGET", "MAX_CELLS", "STATS_LIMIT",
]

"""Regenerate docs/views/*.png: one screenshot per HTML view, taken by headless Chromium from the saved file.

    .venv/bin/python scripts/view_screenshots.py [--out docs/views] [--keep-html]

Random `mini` weights (seed 0), so the pictures show the views, not a finding. Needs chromium (see
gpt2fn.html.browser); without it the script says so and exits 1.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import gpt2fn
from gpt2fn import study
from gpt2fn.html.browser import Browser, BrowserUnavailable
from gpt2fn.study import views
from gpt2fn.tokenizer import encode

TEXT = "When Mary and John went to the store, John gave a drink to Mary. <script>alert(1)</script>"


def build() -> dict[str, gpt2fn.html.View]:
    params = gpt2fn.init_params(gpt2fn.preset("mini"), seed=0)
    ids = torch.tensor([encode(TEXT)])
    labels = views.token_strings(ids[0])
    corrupt = ids.clone()
    corrupt[0, 3] = encode(" Alice")[0]
    good, bad = encode(" Mary")[0], encode(" John")[0]
    with torch.no_grad():
        sweep = study.patching_sweep(params, ids, corrupt, lambda lg: study.logit_diff(lg, good, bad).mean(),
                                     positions=range(8))
        heads = study.head_patching_sweep(params, ids, corrupt, lambda lg: study.logit_diff(lg, good, bad).mean())
        _, acts = study.forward_with(params, ids, capture=["embed", "blocks.0.attn.pattern", "blocks.*.resid_post"])
        dla = study.direct_logit_attribution(params, ids, good, bad)
    return {
        "attention": views.view_attention(params, ids),
        "logprobs": gpt2fn.score(params, ids[0]).view(),
        "sweep_layer_position": views.view_sweep(sweep, cols=labels[:8], title="resid_pre patching: logit diff"),
        "sweep_layer_head": views.view_sweep(heads, col_axis="head", cols=[f"h{h}" for h in range(heads.shape[1])],
                                             title="attn.z patching per head: logit diff"),
        "logit_lens": views.view_logit_lens(params, ids),
        "dla": views.view_dla(dla, top=20),
        "params_tree": gpt2fn.html.tree_view(params, name="params"),
        "activations_tree": gpt2fn.html.tree_view(acts, name="acts"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "views")
    ap.add_argument("--keep-html", action="store_true", help="also write the HTML files next to the PNGs")
    args = ap.parse_args(argv)
    try:
        browser = Browser()
    except BrowserUnavailable as exc:
        print(f"view_screenshots: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with browser, tempfile.TemporaryDirectory() as tmp:
        for name, view in build().items():
            path = views.save_html(view, (args.out if args.keep_html else Path(tmp)) / f"{name}.html")
            page = browser.open(path, width=1100, height=700)
            if page.evaluate("!!document.querySelector('.g2f-attn')"):
                page.wait_for("document.querySelector('.g2f-attn').dataset.ready")
                page.hover(".g2f-attn-toks .g2f-tok[data-i='14']")
            if name.endswith("_tree"):  # open the first block or site to show the leaves
                page.evaluate("document.querySelectorAll('details').forEach((d, i) => { if (i < 4) d.open = true; })")
            problems = page.console() + page.dialogs() + page.blocked()
            if problems:
                print(f"{name}: {problems}", file=sys.stderr)
                return 1
            png = page.screenshot()
            gpt2fn.files.atomic_write_bytes(args.out / f"{name}.png", png)
            print(f"{args.out / f'{name}.png'}: {len(png) / 1e3:.0f} kB, page {path.stat().st_size / 1e3:.0f} kB")
            page.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

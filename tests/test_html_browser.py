"""The HTML views in a real browser: headless Chromium (gpt2fn.html.browser) loads each view from a file with the
network blocked. One browser for the module. Skipped, with the reason, where no Chromium can start."""

import io
import json

import numpy as np
import pytest
import torch

import gpt2fn
from gpt2fn import html, study
from gpt2fn.html.browser import Browser, BrowserUnavailable
from gpt2fn.study import views

HOSTILE = ["<script>window.__pwned = 1; alert(1)</script>", '"><img src=x onerror="window.__pwned = 2; alert(2)">',
           "</script><script>window.__pwned = 3</script>", "' onmouseover='window.__pwned = 4'", "plain"]


@pytest.fixture(scope="module")
def browser():
    try:
        b = Browser()
    except BrowserUnavailable as exc:
        pytest.skip(f"no headless Chromium: {exc}")
    with b:
        yield b


@pytest.fixture(scope="module")
def params():
    return gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)


def _open(browser, tmp_path, view_or_text, name="v.html"):
    path = tmp_path / name
    if isinstance(view_or_text, html.View):
        views.save_html(view_or_text, path)
    else:
        path.write_text(view_or_text, encoding="utf-8")
    return browser.open(path, width=1000, height=700)


def _not_blank(png: bytes) -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    small = img.resize((100, max(1, img.height * 100 // img.width)))
    pixels = np.asarray(small).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    coloured = int((pixels != 255).any(axis=1).sum())
    assert colours > 8 and coloured > 0.02 * len(pixels), (colours, coloured)


def _clean(page) -> None:
    assert page.console() == [] and page.dialogs() == [] and page.blocked() == []


def test_attention_view_renders_and_hover_changes_it(browser, params, tmp_path):
    ids = torch.randint(0, params.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    tokens = [f"w{i}" for i in range(11)]
    page = _open(browser, tmp_path, views.view_attention(params, ids, tokens=tokens))
    page.wait_for("document.querySelector('.g2f-attn').dataset.ready")
    assert page.evaluate("document.querySelectorAll('.g2f-attn-toks .g2f-tok').length") == 11
    assert page.evaluate("document.querySelectorAll('.g2f-head canvas').length") == params.config.n_heads
    _not_blank(page.screenshot())

    def state():
        return page.evaluate("JSON.stringify([document.querySelector('.g2f-info').textContent, "
                             "Array.from(document.querySelectorAll('.g2f-attn-toks .g2f-tok'))"
                             ".map(e => e.style.background), document.querySelector('.g2f-canvas').toDataURL()])")

    before = state()
    page.hover(".g2f-attn-toks .g2f-tok[data-i='7']")
    after7 = state()
    assert after7 != before and page.evaluate("document.querySelector('.g2f-attn').dataset.focus") == "7"
    assert "token 7" in page.evaluate("document.querySelector('.g2f-info').textContent")
    # token 7 attends to at most 8 keys (itself and the past), all listed with their weights
    assert 1 <= page.evaluate("document.querySelectorAll('.g2f-list li').length") <= 8
    page.hover(".g2f-attn-toks .g2f-tok[data-i='2']")
    assert state() != after7
    page.hover(".g2f-head:nth-child(2)")  # hovering a head thumbnail previews that head
    assert page.evaluate("document.querySelector('.g2f-attn').dataset.head") == "1"
    _clean(page)
    page.close()


def test_hostile_token_strings_show_as_text_and_run_nothing(browser, tmp_path):
    n = len(HOSTILE)
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0))
    pat = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)
    view = html.concat([
        html.attention_view(HOSTILE, pat),
        html.tokens_view(HOSTILE, list(range(n))),
        html.heatmap(torch.randn(1, n), rows=HOSTILE[:1], cols=HOSTILE),
        html.lens_table([[[t] for t in HOSTILE]], torch.rand(1, n, 1), layers=["embed"], tokens=HOSTILE),
        html.bars(HOSTILE, list(range(n))),
        html.tree_view({t: torch.ones(2) for t in HOSTILE}),
    ], title=HOSTILE[0])
    # the full page (with its CSP) and a bare notebook fragment (no CSP: only the escaping protects it)
    for name, text in (("page.html", view.page()), ("cell.html", f"<!DOCTYPE html><html><body>{view._repr_html_()}"
                                                                 "</body></html>")):
        page = _open(browser, tmp_path, text, name)
        page.wait_for("document.querySelector('.g2f-attn').dataset.ready")
        page.hover(".g2f-attn-toks .g2f-tok[data-i='1']")
        page.hover(".g2f-tok[data-i='3']")
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        shown = page.evaluate("Array.from(document.querySelectorAll('.g2f-attn-toks .g2f-tok')).map(e => "
                              "e.textContent)")
        assert shown == HOSTILE
        body = page.evaluate("document.body.innerText")
        assert all(t in body for t in HOSTILE)
        info = page.evaluate("document.querySelector('.g2f-info').textContent + '|' + "
                             "document.querySelector('.g2f-list').textContent")
        assert json.dumps(HOSTILE[1]) in info, info  # token 3 attends to token 1, listed as a JSON string
        _clean(page)
        page.close()


@pytest.mark.parametrize("which", ["tokens", "sweep", "lens", "dla", "tree"])
def test_static_views_render(browser, params, tmp_path, which):
    ids = torch.randint(0, params.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    tokens = list("abcdef")
    if which == "tokens":
        view, selector, count = gpt2fn.score(params, ids[0]).view(tokens=tokens), ".g2f-tok", 6
    elif which == "sweep":
        grid = study.patching_sweep(params, ids, ids.flip(1), lambda lg: lg[:, -1, 0].mean())
        view, selector, count = views.view_sweep(grid, cols=tokens), "td", params.config.n_layers * 6
    elif which == "lens":
        view, selector = views.view_logit_lens(params, ids, tokens=tokens), "td"
        count = (params.config.n_layers + 1) * 6
    elif which == "dla":
        view = views.view_dla(study.direct_logit_attribution(params, ids, 1, 2), top=None)
        count = len(study.direct_logit_attribution(params, ids, 1, 2).named())
        selector = ".g2f-bar"
    else:
        view, selector, count = params._repr_html_(), "details", 1 + 1 + 2 * 5 + 1 + 1
    if isinstance(view, str):  # a notebook cell's HTML
        view = f"<!DOCTYPE html><html><body>{view}</body></html>"
    page = _open(browser, tmp_path, view)
    assert page.evaluate(f"document.querySelectorAll({selector!r}).length") == count
    _not_blank(page.screenshot())
    _clean(page)
    page.close()


def test_the_browser_blocks_and_reports_network_requests(browser, tmp_path):
    page = _open(browser, tmp_path, '<html><body><img src="http://example.invalid/x.png"><p>x</p></body></html>')
    page.browser.pump(0.3)
    assert any("example.invalid" in u for u in page.blocked())
    page.close()

"""HTML views without a browser: escaping, bounded size, the data each view carries, `_repr_html_`, save_html and
`gpt2fn view`. The browser checks are tests/test_html_browser.py."""

import base64
import json
import re
import zlib
from html.parser import HTMLParser

import pytest
import torch

import gpt2fn
from gpt2fn import html, study
from gpt2fn.cli import main
from gpt2fn.study import views

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</script><script>alert(3)</script>",
           "a\u2028b\u2029c", "&amp; <!-- -->", "' onmouseover='alert(4)"]


@pytest.fixture(scope="module")
def params():
    return gpt2fn.init_params(gpt2fn.preset("tiny"), seed=0)


def _data(view: html.View) -> dict:
    m = re.search(r'<script type="application/json" class="g2f-data">(.*?)</script>', view.body, flags=re.S)
    return json.loads(m.group(1))


def _raw(view: html.View) -> bytes:
    return zlib.decompress(base64.b64decode(_data(view)["bin"]))


_TAGS = {"html", "head", "meta", "title", "style", "body", "div", "h3", "h4", "span", "p", "section", "table",
         "thead", "tbody", "tr", "th", "td", "details", "summary", "label", "select", "option", "canvas", "ol", "i",
         "script"}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)
            self._in_script = False


def _no_markup_from(text: str) -> None:
    """Only gpt2fn's own elements, no event-handler attribute, and no script that is not gpt2fn's (its code or
    its JSON data): a hostile string survived as text only."""
    parser = _Tags()
    parser.feed(text)
    assert {t for t, _ in parser.tags} <= _TAGS, {t for t, _ in parser.tags} - _TAGS
    assert not [a for _, attrs in parser.tags for a, _ in attrs if a.startswith("on")]
    assert all(s.startswith(("// gpt2fn views", "{")) for s in parser.scripts), parser.scripts
    assert all(dict(attrs).get("src") is None for _, attrs in parser.tags)


def test_script_json_round_trips_and_cannot_end_the_script_element():
    obj = {"tokens": HOSTILE, "x": [1.5, float("nan"), float("inf")], "k": "\u2028"}
    text = html.script_json(obj)
    assert not set("<>&\u2028\u2029") & set(text)
    back = json.loads(text)
    assert back["tokens"] == HOSTILE and back["x"] == [1.5, None, None] and back["k"] == "\u2028"


def test_escape_turns_markup_into_entities():
    assert html.escape('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"


def test_every_view_escapes_hostile_token_strings(params):
    n = len(HOSTILE)
    pat = torch.softmax(torch.randn(2, 3, n, n), -1)
    pages = [
        html.tokens_view(HOSTILE, list(range(n))),
        html.attention_view(HOSTILE, pat, layer_labels=HOSTILE[:2], head_labels=HOSTILE[:3]),
        html.heatmap(torch.randn(2, n), rows=HOSTILE[:2], cols=HOSTILE, row_axis=HOSTILE[0]),
        html.lens_table([[[t, t] for t in HOSTILE]], torch.rand(1, n, 2), layers=[HOSTILE[1]], tokens=HOSTILE),
        html.bars(HOSTILE, list(range(n)), title=HOSTILE[0]),
        html.tree_view({t: torch.ones(2) for t in HOSTILE}, name=HOSTILE[1]),
    ]
    for v in pages:
        for text in (v.page(), v._repr_html_()):
            _no_markup_from(text)
    assert _data(pages[1])["tokens"] == HOSTILE  # the script's data holds the exact strings


def test_tokens_view_has_one_element_per_token_and_checks_lengths():
    v = html.tokens_view(["a", " b", "\n"], {"x": [1.0, None, -2.0], "y": torch.tensor([0.0, 1.0, 2.0])})
    assert v.body.count('class="g2f-tok"') == 6  # two rows of three
    assert "↵" in v.body
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        html.tokens_view(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(TypeError, match="not one string"):
        html.tokens_view("abc", [1.0, 2.0, 3.0])


def test_heatmap_refuses_grids_it_cannot_draw():
    with pytest.raises(ValueError, match="2-D"):
        html.heatmap(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="too large"):
        html.heatmap(torch.zeros(1000, 1000))
    with pytest.raises(ValueError, match="row labels"):
        html.heatmap(torch.zeros(2, 2), rows=["a"])
    v = html.heatmap(torch.tensor([[0.5, -1.0], [2.0, 0.0]]), rows=["r0", "r1"], cols=["c0", "c1"])
    assert v.body.count("<td") == 4 and "r1 · col c0: 2" in v.body


def test_attention_topk_keeps_the_largest_weights_quantised():
    pat = torch.softmax(torch.randn(2, 5, 5), -1)
    idx, w, mass = html.attention_topk(pat, 5)
    dense = torch.zeros_like(pat).scatter_(-1, idx.long(), w.float() / 255)
    assert torch.allclose(dense, pat, atol=0.5 / 255 + 1e-6)
    idx2, w2, mass2 = html.attention_topk(pat, 2)
    assert torch.equal(idx2.long(), pat.topk(2, -1).indices.masked_fill(w2 == 0, 0))
    assert torch.allclose(mass2.float() / 255, pat.topk(2, -1).values.sum(-1), atol=0.5 / 255 + 1e-6)


def test_a_1024_token_12x12_head_attention_view_stays_under_4_mb():
    n, heads = 1024, 12
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(heads, n, n, generator=g) * 3
    pattern = torch.softmax(scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), -1)
    del scores
    tokens = [f"t{i}<" for i in range(n)]
    v = html.attention_view(tokens, [pattern] * 12)  # random patterns: the least compressible case
    page = v.page()
    assert len(page.encode()) < 4_000_000
    data = _data(v)
    assert data["k"] == 6 == html.choose_k(12, heads, n, n, html.ATTENTION_BUDGET)
    assert len(_raw(v)) == 12 * heads * n * (3 * 6 + 1)
    assert "top 6 keys" in v.body


def test_attention_view_checks_shapes():
    with pytest.raises(ValueError, match="expected \\[heads=2, queries=3, keys=3\\]"):
        html.attention_view(["a", "b", "c"], [torch.rand(2, 3, 3), torch.rand(2, 3, 4)])
    with pytest.raises(ValueError, match="at least one layer"):
        html.attention_view(["a"], [])


def test_view_attention_reduces_while_walking_to_the_same_data_as_the_patterns(params):
    ids = torch.randint(0, params.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    streamed = views.view_attention(params, ids, example=1, top_k=4, tokens=list("abcdefghi"))
    pats = study.attention_patterns(params, ids)[:, 1]
    direct = html.attention_view(list("abcdefghi"), pats, top_k=4)
    assert _raw(streamed) == _raw(direct)
    with pytest.raises(ValueError, match="layers"):
        views.view_attention(params, ids, layers=[5])


def test_view_logit_lens_shows_the_lens_top_tokens(params):
    ids = torch.randint(0, params.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    v = views.view_logit_lens(params, ids, k=3, chunk=3, tokens=list("abcdefg"))
    lens = study.logit_lens(params, ids)[:, 0].softmax(-1)
    top = lens.topk(3, -1)
    words = views.token_strings(top.indices[..., 0].flatten())
    cells = re.findall(r'<td title="[^"]*" style="[^"]*">([^<]*)</td>', v.body)
    assert len(cells) == (params.config.n_layers + 1) * 7
    assert cells == [html.escape(html.display_token(w)) for w in words]


def test_save_html_writes_the_page_atomically(tmp_path):
    v = html.bars(["a", "b"], [1.0, -1.0])
    path = views.save_html(v, tmp_path / "sub" / "v.html")
    assert path.read_text(encoding="utf-8") == v.page()
    assert [p.name for p in path.parent.iterdir()] == ["v.html"]  # no temporary file left
    with pytest.raises(TypeError, match="View"):
        views.save_html("<p>hi</p>", tmp_path / "x.html")


def test_result_objects_show_themselves_in_notebooks(params):
    ids = torch.randint(0, params.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    _, acts = study.forward_with(params, ids, capture=["embed", "blocks.0.attn.pattern"])
    shown = {
        "params": params._repr_html_(),
        "block": params.blocks[0]._repr_html_(),
        "acts": acts._repr_html_(),
        "score": gpt2fn.score(params, ids[0])._repr_html_(),
        "factored": study.FactoredMatrix(torch.randn(2, 3, 6, 2), torch.randn(2, 3, 2, 5))._repr_html_(),
        "factored1": study.FactoredMatrix(torch.randn(6, 2), torch.randn(2, 5))._repr_html_(),
        "heads": study.head_detector_scores(params, seq_len=5, batch=2)._repr_html_(),
        "dla": study.direct_logit_attribution(params, ids, 3, 4)._repr_html_(),
        "components": study.decompose_logit(params, study.run_for_decompose(params, ids)[1], 3, 4)._repr_html_(),
    }
    for name, text in shown.items():
        assert text.startswith("<style>") and 'class="g2f"' in text, name
    assert "tok_emb" in shown["params"] and "[97, 24]" in shown["params"]
    assert "blocks.0.attn.pattern" in shown["acts"] and "batch heads seq kv_seq" in shown["acts"]
    assert shown["score"].count('class="g2f-tok"') == 8 and "perplexity" in shown["score"]
    assert "Frobenius norm" in shown["factored"] and "singular values" in shown["factored1"]
    assert shown["heads"].count("<table") == 3
    assert "blocks.1.attn.head2" in shown["dla"] and "blocks.0.mlp.out" in shown["components"]


def test_tensor_summary_matches_torch():
    t = torch.tensor([[0.0, 1.0, float("nan")], [3.0, float("inf"), -2.0]])
    s = html.tensor_summary(t)
    v = torch.tensor([0.0, 1.0, 3.0, -2.0])
    assert (s["nan"], s["inf"], s["zeros"]) == (1, 1, 1)
    assert s["mean"] == pytest.approx(float(v.mean())) and s["std"] == pytest.approx(float(v.std()))
    assert (s["min"], s["max"]) == (-2.0, 3.0) and sum(s["hist"]) == 4
    assert html.tensor_summary(torch.empty(3, device="meta")) == {"numel": 3}


def test_gpt2fn_view_writes_one_html_file(tmp_path, capsys):
    out = tmp_path / "v.html"
    text = '<script>alert(1)</script> "><img src=x onerror=alert(2)> hello'
    assert main(["view", text, "--preset", "mini", "--out", str(out), "--top-k", "4"]) == 0
    page = out.read_text(encoding="utf-8")
    _no_markup_from(page)
    assert "attention patterns" in page and "log-probabilities" in page and "logit lens" in page
    assert "&lt;" in page and "alert" in page
    assert main(["view", "", "--preset", "mini", "--out", str(out)]) == 1
    assert "TEXT is empty" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ['<div><img src=x onerror="alert(1)"></div>', "<p><script>alert(1)</script></p>",
                                 '<span title="x" onmouseover="alert(1)">t</span>'])
def test_the_markup_check_catches_an_unescaped_string(bad):
    with pytest.raises(AssertionError):
        _no_markup_from(bad)

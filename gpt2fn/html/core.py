"""The page helper every view is built on: escaping, safe data embedding, colours, and the `View` value.

A `View` is an HTML fragment whose every untrusted string (token texts, labels, site names) went through
:func:`escape` and whose data for scripts went through :func:`script_json`. `view._repr_html_()` is the fragment
with its CSS and JS inline (a notebook cell shows it; nothing is fetched); `view.page()` is a whole document with a
Content-Security-Policy that forbids every network load (defence in depth: escaping is what keeps text text).
"""

import html
import json
import math
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["View", "escape", "script_json", "display_token", "concat", "colour", "text_colour", "fmt"]

_ASSETS = Path(__file__).resolve().parent

# Every network load is refused by the page itself: no default source, inline styles and scripts only, images
# only from data: URLs. A token that escaped its escaping still could not fetch anything.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; "
       "connect-src 'none'; form-action 'none'; base-uri 'none'")


def escape(text: Any) -> str:
    """`text` as HTML text or attribute value: `& < > " '` become entities (`html.escape(quote=True)`)."""
    return html.escape(str(text), quote=True)


_SCRIPT_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                                "\u2029": "\\u2029"})


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def script_json(obj: Any) -> str:
    """`obj` as JSON that is safe inside `<script type="application/json">`: `<`, `>`, `&`, U+2028 and U+2029 are
    written as `\\uXXXX` escapes (so no `</script>` or `<!--` can end or change the element), non-finite floats
    become `null` (JSON has no NaN). `JSON.parse(el.textContent)` gives `obj` back."""
    return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":")).translate(
        _SCRIPT_UNSAFE)


def display_token(token: str) -> str:
    """A token's text made visible (not escaped): newline as `↵`, tab as `→`, carriage return as `⏎`, other
    control characters as `\\xNN`, the empty string as `∅`. Spaces stay spaces (views render with
    `white-space: pre`)."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ch == "\r":
            out.append("⏎")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out) or "∅"


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a label: `digits` significant digits, `nan`/`inf` spelled out, None as `–`."""
    if x is None:
        return "–"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


# Colour scales: white to blue for magnitudes (attention, probabilities), red-white-blue for signed values
# (blue positive, as circuitsvis). Colours are computed here, so static views need no script.
_BLUE = (37, 99, 235)
_RED = (220, 38, 38)


def colour(value: float | None, vmin: float, vmax: float, *, signed: bool = False) -> str:
    """The CSS colour of `value` on a scale: `signed` maps `[-m, m]` (m = max(|vmin|, |vmax|)) to red-white-blue,
    otherwise `[vmin, vmax]` to white-blue. None or NaN is light grey."""
    if value is None or not math.isfinite(value):
        return "#e5e7eb" if value is None or math.isnan(value) else ("#1e3a8a" if value > 0 else "#7f1d1d")
    if signed:
        m = max(abs(vmin), abs(vmax)) or 1.0
        t, rgb = min(abs(value) / m, 1.0), (_BLUE if value >= 0 else _RED)
    else:
        span = vmax - vmin
        t, rgb = (min(max((value - vmin) / span, 0.0), 1.0) if span > 0 else 0.0), _BLUE
    r, g, b = (round(255 + (c - 255) * t) for c in rgb)
    return f"rgb({r},{g},{b})"


def text_colour(value: float | None, vmin: float, vmax: float, *, signed: bool = False) -> str:
    """Black or white, whichever reads on :func:`colour`'s background."""
    if value is None or not math.isfinite(value):
        return "#111" if value is None or math.isnan(value) else "#fff"
    if signed:
        m = max(abs(vmin), abs(vmax)) or 1.0
        t = abs(value) / m
    else:
        span = vmax - vmin
        t = (value - vmin) / span if span > 0 else 0.0
    return "#fff" if t > 0.6 else "#111"


@cache
def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def css() -> str:
    """The one stylesheet of every view (scoped under `.g2f`)."""
    return _asset("view.css")


def js() -> str:
    """The one script of every view: defines `window.G2F` once and boots the interactive parts."""
    return _asset("view.js")


class View:
    """A view: a title and an HTML fragment, built only from escaped strings and :func:`script_json` data.

    - `_repr_html_()`: what a notebook shows, the fragment with the CSS and script inline (self-contained).
    - `page()`: a whole HTML document (UTF-8, a CSP that blocks every network load) for files and browsers.
    - `view_a + view_b` (or :func:`concat`): several views on one page.

    Write one with `gpt2fn.study.views.save_html(view, path)` (atomic).
    """

    __slots__ = ("title", "body")

    def __init__(self, title: str, body: str) -> None:
        object.__setattr__(self, "title", str(title))
        object.__setattr__(self, "body", str(body))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a View is a value; build a new one")

    def __repr__(self) -> str:
        return f"View({self.title!r}, {len(self.body):,} characters of HTML)"

    def __add__(self, other: "View") -> "View":
        if not isinstance(other, View):
            return NotImplemented
        return concat([self, other])

    def fragment(self) -> str:
        """The view's own HTML: a `div.g2f` holding a heading and the body (no CSS or script)."""
        return (f'<div class="g2f">'
                f'<h3 class="g2f-title">{escape(self.title)}</h3>{self.body}</div>')

    def _repr_html_(self) -> str:
        return f"<style>{css()}</style>{self.fragment()}<script>{js()}</script>"

    def page(self) -> str:
        """A whole, self-contained HTML document of this view."""
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{escape(self.title)}</title><style>{css()}</style></head>"
                f'<body class="g2f-page">{self.fragment()}<script>{js()}</script></body></html>\n')


def concat(views: Iterable[View], *, title: str | None = None) -> View:
    """Several views as one (one page, one heading each)."""
    views = list(views)
    if not views or not all(isinstance(v, View) for v in views):
        raise TypeError("concat takes a non-empty sequence of View values")
    parts = [f'<section class="g2f-part"><h4>{escape(v.title)}</h4>{v.body}</section>' for v in views]
    return View(title or " + ".join(v.title for v in views), "".join(parts))

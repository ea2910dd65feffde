"""The model card (a version's README.md) as HTML: rendered by markdown-it-py with raw HTML off, then
sanitised by nh3 (ammonia), so a hostile card renders as inert text and stays bounded in size and depth."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

MAX_CARD_BYTES = 256 * 1024
MAX_NESTING = 20
MAX_TABLE_CELLS = 2000
TAGS = {
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p",
    "pre", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
}
ATTRIBUTES = {"a": {"href", "title"}, "td": {"align"}, "th": {"align"}, "ol": {"start"}}


def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "maxNesting": MAX_NESTING})
    md.enable("table").enable("strikethrough")
    # images would load from anywhere (the CSP refuses them): shown as their text instead
    md.disable("image")
    return md


def render(text: str) -> Markup:
    """Sanitised HTML of ``text``: no script, handler, style, frame or image; links http(s)/mailto only."""
    md = _parser()
    tokens = md.parse(text[:MAX_CARD_BYTES])
    kept, cells, skipping = [], 0, False
    for tok in tokens:
        if tok.type in ("td_open", "th_open"):
            cells += 1
            # past the bound the rest of a table is left out (the sanitiser closes the open row), not rendered
            skipping = skipping or cells > MAX_TABLE_CELLS
        if skipping and tok.type not in ("tbody_close", "table_close"):
            continue
        if skipping and tok.type == "table_close":
            skipping = False
        kept.append(tok)
    tokens = kept
    html = md.renderer.render(tokens, md.options, {})
    clean = nh3.clean(
        html,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
    return Markup(clean)

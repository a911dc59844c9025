"""Does a markdown output stay inside its region? Pure.

An output is written between our markers, but markdown does not know about markers: an
unclosed fence or HTML block in an output would run on into the user's own text below it
(DESIGN.md, addition 9). So markdown is shown as markdown only when it parses closed on
its own; anything else is shown as text, in a fence long enough to hold it.
"""

from __future__ import annotations

from html.parser import HTMLParser

from markdown_it import MarkdownIt

__all__ = ("markdown_is_closed",)

_SENTINEL = "vault-runner-end-of-output-7f3a9c"
_markdown = MarkdownIt("commonmark").disable(["inline", "text_join"])
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def markdown_is_closed(text: str) -> bool:
    """True when nothing the markdown opens (fence, HTML block, list, quote) reaches past its end."""
    tokens = _markdown.parse(text.rstrip("\n") + "\n\n" + _SENTINEL + "\n")
    if len(tokens) < 3:
        return False
    opening, inline, closing = tokens[-3:]
    if not (
        opening.type == "paragraph_open"
        and opening.level == 0
        and inline.content == _SENTINEL
        and closing.type == "paragraph_close"
    ):
        return False
    return all(_html_balanced(token.content) for token in tokens if token.type == "html_block")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.broken = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.broken = True
        else:
            self.open.pop()


def _html_balanced(html: str) -> bool:
    if "<!--" in html and "-->" not in html.split("<!--", 1)[1]:
        return False  # an unclosed comment would hide everything after it
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return not parser.broken and not parser.open

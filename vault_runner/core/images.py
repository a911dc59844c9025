"""Image outputs are checked before they become files in the vault. Pure.

A note's code chooses the bytes and the MIME type of what it displays, so an "image/png"
may hold a shell script. Raster images must start with their format's signature; SVG is
text that Obsidian renders, so it is parsed and stripped of everything that is not a
drawing (scripts, foreign objects, event handlers, links out).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

__all__ = ("checked_image",)

_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}
_SVG = "http://www.w3.org/2000/svg"
_XLINK = "http://www.w3.org/1999/xlink"
_DROPPED = {"script", "foreignObject", "iframe", "object", "embed", "handler", "listener"}
_SAFE_LINK = re.compile(r"^(#|data:image/(png|jpeg|gif);base64,)", re.IGNORECASE)


def checked_image(mime: str, payload: bytes) -> tuple[bytes | None, str | None]:
    """The bytes to write for an image output, or None and why it is not written."""
    if mime in _SIGNATURES:
        if payload.startswith(_SIGNATURES[mime]):
            return payload, None
        return None, f"an output said it was {mime}, but its bytes are not that kind of image, so it was not written"
    if mime == "image/svg+xml":
        cleaned = _clean_svg(payload)
        if cleaned is None:
            return None, "an output said it was an SVG image, but it is not one, so it was not written"
        return cleaned, None
    return None, f"{mime} images are not written"


def _clean_svg(payload: bytes) -> bytes | None:
    if b"<!DOCTYPE" in payload or b"<!ENTITY" in payload:
        return None  # entities are how XML bombs and file reads start; drawings need none
    try:
        root = ET.fromstring(payload)
    except ET.ParseError:
        return None
    if root.tag not in (f"{{{_SVG}}}svg", "svg"):
        return None
    _strip(root)
    ET.register_namespace("", _SVG)
    ET.register_namespace("xlink", _XLINK)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _strip(element: ET.Element) -> None:
    for child in list(element):
        namespace, _, local = child.tag.rpartition("}")
        if local in _DROPPED or (namespace and namespace.lstrip("{") not in (_SVG,)):
            element.remove(child)
            continue
        _strip(child)
    for name in list(element.attrib):
        local = name.rpartition("}")[2]
        value = element.attrib[name].strip()
        if local.lower().startswith("on"):
            del element.attrib[name]
        elif local in ("href", "src") and not _SAFE_LINK.match(value):
            del element.attrib[name]
        elif "javascript:" in value.lower() or "url(http" in value.lower().replace(" ", ""):
            del element.attrib[name]

"""How `test --compare` compares stored outputs with fresh ones. Pure.

Both sides are sanitized (built-in rules for addresses, timings and temp paths, then the
vault's `[[sanitize]]` entries) and compared as the parts a reader sees.
"""

from __future__ import annotations

import difflib
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vault_runner.core.render import ATTACHMENT_LINK_RE
from vault_runner.errors import SanitizerError

__all__ = ("BUILTIN_SANITIZERS", "Comparable", "comparable", "compare_bodies", "compile_sanitizers", "sanitize")

# -- output comparison (test --compare) -----------------------------------------------------

_TEMP_DIRS = sorted({tempfile.gettempdir(), "/tmp", "/var/tmp", "/var/folders", "/private/var/folders"}, key=len)

BUILTIN_SANITIZERS: tuple[tuple[str, str], ...] = (
    # Object reprs carry memory addresses (`<object at 0x7f3a...>`); short hex like 0xff is data.
    (r"\b0x[0-9a-fA-F]{6,}\b", "0xADDRESS"),
    # IPython's %%time / %time report lines.
    (r"(?m)^CPU times: .*$", "CPU times: TIME"),
    (r"(?m)^Wall time: .*$", "Wall time: TIME"),
    # %timeit's summary line.
    (
        r"(?m)^[\d.]+ \S*s ± [\d.]+ \S*s per loop \(mean ± std\. dev\. of .*\)$",
        "TIMEIT",
    ),
    # Temporary paths differ on every run and on every machine.
    (
        r"(?<![\w.~-])(?:" + "|".join(re.escape(d.rstrip("/")) for d in reversed(_TEMP_DIRS)) + r")/[^\s'\"<>)\]]*",
        "TEMPPATH",
    ),
    (r"[A-Za-z]:\\Users\\[^\\]+\\AppData\\Local\\Temp\\[^\s'\"<>)\]]*", "TEMPPATH"),
)


def compile_sanitizers(extra: Iterable[tuple[str, str]] = ()) -> list[tuple[re.Pattern[str], str]]:
    """Built-in sanitizers, then the vault's `[[sanitize]]` entries, in file order."""
    compiled = [(re.compile(p), r) for p, r in BUILTIN_SANITIZERS]
    for pattern, replace in extra:
        try:
            compiled.append((re.compile(pattern, re.MULTILINE), replace))
        except re.error as exc:
            raise SanitizerError(
                f"[[sanitize]] pattern {pattern!r} is not a valid regular expression ({exc})"
            ) from None
    return compiled


def sanitize(text: str, sanitizers: Sequence[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replace in sanitizers:
        text = pattern.sub(replace, text)
    return text


@dataclass(frozen=True)
class Comparable:
    """The parts of a region that `--compare` looks at."""

    texts: tuple[str, ...]  # stdout, stderr and text/plain outputs, in order
    images: int  # only counted: image bytes vary with library versions and fonts


_FENCE_OPEN_RE = re.compile(r"^(`{3,}|~{3,})(.*)$")


def comparable(body: str) -> Comparable:
    """Extract the text outputs and the image count from a region body made by render.py.

    Text outputs are the fenced blocks at the top level of the body, or inside the folding
    `> [!abstract]-` callout that long output gets; fences inside an error callout (the
    traceback) and markdown outputs are not text outputs.
    """
    texts: list[str] = []
    images = 0
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        quoted = False
        if line.startswith("> [!abstract]-"):
            # Long text output folded in a callout: the fence follows, quoted.
            i += 1
            if i >= len(lines):
                break
            line, quoted = _unquote(lines[i]), True
        elif line.startswith("> [!failure]"):
            i += 1
            while i < len(lines) and lines[i].startswith(">"):
                i += 1
            continue
        opening = _FENCE_OPEN_RE.match(line)
        if opening and opening.group(2).strip() in {"", "html"}:
            fence = opening.group(1)
            content: list[str] = []
            i += 1
            while i < len(lines):
                current = _unquote(lines[i]) if quoted else lines[i]
                if current == fence:
                    break
                content.append(current)
                i += 1
            texts.append("\n".join(content))
            i += 1
            continue
        images += len(ATTACHMENT_LINK_RE.findall(line))
        i += 1
    return Comparable(tuple(texts), images)


def _unquote(line: str) -> str:
    if line.startswith("> "):
        return line[2:]
    return line[1:] if line.startswith(">") else line


def compare_bodies(stored: str, fresh: str, sanitizers: Sequence[tuple[re.Pattern[str], str]]) -> str | None:
    """None when the outputs match after sanitizing; otherwise a short unified diff (stored -> fresh)."""
    old, new = comparable(stored), comparable(fresh)
    old_text = [sanitize(t, sanitizers) for t in old.texts]
    new_text = [sanitize(t, sanitizers) for t in new.texts]
    problems: list[str] = []
    if old_text != new_text:
        diff = difflib.unified_diff(
            "\n\n".join(old_text).split("\n"), "\n\n".join(new_text).split("\n"), "stored", "fresh", lineterm=""
        )
        problems.append("\n".join(diff))
    if old.images != new.images:
        problems.append(f"the stored output has {old.images} image(s), the fresh run made {new.images}")
    return "\n".join(problems) if problems else None

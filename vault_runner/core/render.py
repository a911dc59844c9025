"""Jupyter outputs (MIME bundles) -> the markdown body of an output region. Pure.

What a region shows is DESIGN.md contract 3: text in fences, markdown as markdown,
images as attachment embeds, errors as a failure callout whose traceback points at
note lines, ANSI codes stripped, long output folded and huge output truncated.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vault_runner.core.contained import markdown_is_closed
from vault_runner.core.images import checked_image
from vault_runner.core.note import sanitize_output_line

ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
FOLD_LINES = 40
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}
_CELL_HEADER_RE = re.compile(r"^(\s*)Cell In\s*\[(\d+)\], line (\d+)(.*)$")
_CELL_WARNING_RE = re.compile(r"^(\s*)Cell In\s*\[(\d+)\]:(\d+): ", re.MULTILINE)
_GUTTER_RE = re.compile(r"^(\s*-*>?\s*)(\d+)(\s.*|)$")
ATTACHMENT_LINK_RE = re.compile(r"!\[\[([^\]|#]+)[^\]]*\]\]|!\[[^\]]*\]\(<?([^)>]+?)>?\)")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Attachment:
    name: str
    data: bytes
    mime: str


@dataclass(frozen=True)
class Rendered:
    body: str  # LF-ended lines, no container prefix
    attachments: tuple[Attachment, ...] = field(default=())


@dataclass(frozen=True)
class CellSource:
    """Where an execution count's code sits in the note, for traceback line numbers."""

    note_name: str
    first_code_line: int  # 1-based note line of the cell's line 1
    block_index: int | None = None

    def note_line(self, cell_line: int) -> int:
        """The note line of the cell's 1-based line `cell_line`."""
        return self.first_code_line + cell_line - 1


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def apply_carriage_returns(text: str) -> str:
    """Apply `\\r` the way Jupyter's front ends do: text before a `\\r` on a line is gone."""
    text = re.sub(r"\r+\n", "\n", text)
    return re.sub(r"(?m)^.*\r+", "", text)


def clean_text(text: str) -> str:
    text = apply_carriage_returns(strip_ansi(text))
    return _CONTROL_RE.sub("", text)


def truncate_lines(lines: list[str], limit: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    tail = max(limit // 10, 5)
    head = limit - tail
    hidden = len(lines) - head - tail
    marker = f"[… {hidden:,} lines truncated by vault-runner (option output-lines: {limit}) …]"
    return lines[:head] + [marker] + lines[-tail:]


def _fence_for(lines: Sequence[str]) -> str:
    longest = 2
    for line in lines:
        match = re.match(r"^\s*(`+)", line)
        if match:
            longest = max(longest, len(match.group(1)))
    return "`" * (longest + 1)


def _text_block(text: str, limit: int, language: str = "") -> list[str]:
    lines = clean_text(text).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [sanitize_output_line(line) for line in truncate_lines(lines, limit)]
    fence = _fence_for(lines)
    block = [fence + language, *lines, fence]
    if len(lines) > FOLD_LINES:
        return [f"> [!abstract]- Output ({len(lines):,} lines)"] + [_quote(line) for line in block]
    return block


def _quote(line: str) -> str:
    return "> " + line if line else ">"


def _join(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return str(value)


def attachment_name(note_stem: str, data: bytes, extension: str) -> str:
    slug = re.sub(r"[^\w.-]+", "-", note_stem, flags=re.UNICODE).strip("-.") or "note"
    digest = hashlib.sha256(data).hexdigest()[:12]
    return f"{slug}-vr-{digest}.{extension}"


def map_traceback(lines: list[str], sources: Mapping[int, CellSource]) -> list[str]:
    """Rewrite IPython's `Cell In[N], line L` frames to note lines; drop library frames."""
    out: list[str] = []
    hidden = 0
    in_cell: CellSource | None = None
    for chunk in lines:
        chunk_lines = strip_ansi(chunk).split("\n")
        header = _CELL_HEADER_RE.match(chunk_lines[0]) if chunk_lines else None
        if header:
            in_cell = sources.get(int(header.group(2)))
            if in_cell is None:
                out.extend(chunk_lines)
                continue
            note_line = in_cell.note_line(int(header.group(3)))
            out.append(f'{header.group(1)}File "{in_cell.note_name}", line {note_line}{header.group(4)}')
            offset = in_cell.first_code_line - 1
            for line in chunk_lines[1:]:
                gutter = _GUTTER_RE.match(line)
                if gutter:
                    lead, digits = gutter.group(1), gutter.group(2)
                    number = str(int(digits) + offset)
                    extra = len(number) - len(digits)
                    if extra > 0 and lead.endswith(" " * (extra + 1)):
                        lead = lead[:-extra]  # keep the gutter's width where it has room
                    line = f"{lead}{number}{gutter.group(3)}"
                out.append(line)
        elif chunk_lines and chunk_lines[0].lstrip().startswith("File "):
            hidden += 1
        elif set(chunk_lines[0].strip()) <= {"-"} and len(chunk_lines) == 1:
            continue  # IPython's ------ separator line
        elif "Traceback (most recent call last)" in chunk_lines[0]:
            out.append("Traceback (most recent call last):")
        else:
            out.extend(chunk_lines)
    if hidden:
        out.insert(
            1 if out and out[0].startswith("Traceback") else 0,
            f"  [{hidden} frame{'s' if hidden != 1 else ''} in library code hidden]",
        )
    while out and not out[-1].strip():
        out.pop()
    return out


def map_warnings(text: str, sources: Mapping[int, CellSource]) -> str:
    """Rewrite a warning's `Cell In[N]:L:` (how the kernel's prelude names a cell, kernel/setup.py)
    to `note.md:LINE:`, the note's line, as tracebacks get theirs."""

    def located(match: re.Match[str]) -> str:
        cell = sources.get(int(match.group(2)))
        if cell is None:
            return match.group(0)
        return f"{match.group(1)}{cell.note_name}:{cell.note_line(int(match.group(3)))}: "

    return _CELL_WARNING_RE.sub(located, text)


def names_note_lines(outputs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether these outputs show note lines (a traceback, a warning from a cell), so that
    they are rendered again when the write-back moves the block."""
    for output in outputs:
        if output.get("output_type") == "error":
            return True
        if output.get("output_type") == "stream" and _CELL_WARNING_RE.search(_join(output.get("text", ""))):
            return True
    return False


def _error_block(output: Mapping[str, Any], sources: Mapping[int, CellSource], limit: int) -> list[str]:
    ename = str(output.get("ename", "Error"))
    evalue = clean_text(str(output.get("evalue", ""))).strip()
    title = f"{ename}: {evalue}" if evalue else ename
    title_lines = title.split("\n")
    traceback = output.get("traceback") or []
    body = map_traceback([str(t) for t in traceback], sources) if traceback else []
    body = [sanitize_output_line(line) for line in truncate_lines(body, limit)]
    # An error the block's `raises:` option expects is shown in a neutral callout: it is not a failure.
    kind = "example" if output.get("vault_runner_expected") else "failure"
    result = [f"> [!{kind}] " + sanitize_output_line(title_lines[0])]
    result += [_quote(sanitize_output_line(line)) for line in title_lines[1:]]
    hint = output.get("vault_runner_hint")
    if hint:
        result.append(_quote(str(hint)))
    if body:
        fence = _fence_for(body)
        result += [_quote(fence + "pytb"), *(_quote(line) for line in body), _quote(fence)]
    return result


def render_outputs(
    outputs: Sequence[Mapping[str, Any]],
    *,
    note_stem: str,
    embed: Callable[[str], str],
    sources: Mapping[int, CellSource],
    output_lines: int = 400,
) -> Rendered:
    """Render a block's outputs, in order, into a region body and attachments."""
    parts: list[list[str]] = []
    attachments: list[Attachment] = []
    for output in _merge_streams(outputs):
        kind = output.get("output_type")
        if kind == "stream":
            text = _join(output.get("text", ""))
            if output.get("name") == "stderr":
                text = map_warnings(text, sources)
            parts.append(_text_block(text, output_lines))
        elif kind == "error":
            parts.append(_error_block(output, sources, output_lines))
        elif kind in {"execute_result", "display_data"}:
            part = _mime_block(output.get("data", {}), note_stem, embed, attachments, output_lines)
            if part:
                parts.append(part)
    lines: list[str] = []
    for part in parts:
        if lines:
            lines.append("")
        lines.extend(part)
    return Rendered("".join(line + "\n" for line in lines), tuple(attachments))


def _mime_block(
    data: Mapping[str, Any],
    note_stem: str,
    embed: Callable[[str], str],
    attachments: list[Attachment],
    limit: int,
) -> list[str] | None:
    if "text/markdown" in data:
        markdown = clean_text(_join(data["text/markdown"]))
        if not markdown_is_closed(markdown):
            return _text_block(markdown, limit, "markdown")  # shown as text: it would leak out of the region
        lines = markdown.rstrip("\n").split("\n")
        return [sanitize_output_line(line) for line in truncate_lines(lines, limit)]
    for mime, extension in IMAGE_TYPES.items():
        if mime in data:
            raw = data[mime]
            try:
                claimed = _join(raw).encode("utf-8") if mime == "image/svg+xml" else base64.b64decode(_join(raw))
            except ValueError:
                claimed = b""
            payload, refused = checked_image(mime, claimed)
            if payload is None:
                return _text_block(f"[vault-runner: {refused}]", limit)
            name = attachment_name(note_stem, payload, extension)
            if all(a.name != name for a in attachments):
                attachments.append(Attachment(name, payload, mime))
            return [embed(name)]
    if "text/latex" in data and "text/plain" not in data:
        return ["$$", *clean_text(_join(data["text/latex"])).strip().strip("$").split("\n"), "$$"]
    if "text/plain" in data:
        return _text_block(_join(data["text/plain"]), limit)
    if "text/html" in data:
        return _text_block(_join(data["text/html"]), limit, "html")
    return None


def _merge_streams(outputs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Join consecutive stream outputs, as Jupyter's front ends show them."""
    merged: list[Mapping[str, Any]] = []
    for output in outputs:
        if (
            output.get("output_type") == "stream"
            and merged
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == output.get("name")
        ):
            previous = merged[-1]
            merged[-1] = {**previous, "text": _join(previous.get("text", "")) + _join(output.get("text", ""))}
        else:
            merged.append(output)
    return merged


def output_summary(output: Mapping[str, Any], sources: Mapping[int, CellSource] | None = None) -> dict[str, Any]:
    """The JSON shape of one output (DESIGN.md contract 8); with `sources`, a warning names
    its note line, as in the note."""
    kind = output.get("output_type")
    if kind == "stream":
        text = clean_text(_join(output.get("text", "")))
        if sources and output.get("name") == "stderr":
            text = map_warnings(text, sources)
        return {"type": "stream", "name": output.get("name"), "text": text}
    if kind == "error":
        return {"type": "error", "ename": output.get("ename"), "evalue": clean_text(str(output.get("evalue", "")))}
    data = output.get("data", {})
    summary: dict[str, Any] = {"type": kind, "mime": sorted(data)}
    if "text/plain" in data:
        summary["text"] = clean_text(_join(data["text/plain"]))
    return summary

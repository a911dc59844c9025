"""Parse a note into frontmatter, runnable blocks and output regions; splice regions back.

Pure: text in, values out. Nothing here normalises the note: line endings, a BOM,
trailing spaces and a missing final newline are all kept, because the only bytes we
ever change are those of our own output regions (DESIGN.md, contract 1).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from markdown_it import MarkdownIt

from vault_runner.errors import NoteError

RUNNABLE_LANGUAGES = frozenset({"python", "py", "python3", "ipython", "ipython3"})

OPEN_MARKER = "<!-- vault-runner:output code={code_hash} -->"
END_MARKER = "<!-- vault-runner:end sum={checksum} -->"
_OPEN_RE = re.compile(r"^<!-- vault-runner:output code=([0-9a-f]{1,64})(?: [^>]*)? -->[ \t]*$")
_END_RE = re.compile(r"^<!-- vault-runner:end sum=([0-9a-f]{1,64}) -->[ \t]*$")
_ANY_MARKER_RE = re.compile(r"<!-- vault-runner:(output|end)\b")
_LINE_RE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_OPTION_LINE_RE = re.compile(r"^#\|\s?(.*)$")
_FRONTMATTER_OPEN = "---"
_FRONTMATTER_CLOSE = ("---",)  # Obsidian's reading: only `---` closes the properties
_MARKER_LINE_RE = re.compile(r"^([ \t>]*)<!-- vault-runner:(?:output|end)\b")
_RUNNABLE_FENCE_RE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*\{?\s*(?:python3?|py|ipython3?)\b", re.IGNORECASE)

# Only block structure matters here; inline parsing (emphasis, links) is most of the cost.
_markdown = MarkdownIt("commonmark").disable(["inline", "text_join"])


@dataclass(frozen=True)
class Region:
    """An output region: the marker lines and everything between them."""

    start: int  # 0-based index of the opening marker line
    stop: int  # 0-based index one past the end marker line
    code_hash: str
    recorded_sum: str
    body: str  # the lines between the markers, prefix removed, LF endings

    @property
    def hand_edited(self) -> bool:
        return region_checksum(self.body) != self.recorded_sum

    @property
    def first_line(self) -> int:
        return self.start + 1


@dataclass(frozen=True)
class Block:
    """A runnable fenced python block."""

    index: int  # 0-based among runnable blocks
    fence_line: int  # 1-based line of the opening fence
    close_line: int  # 1-based line of the closing fence
    info: str
    code: str  # fence content, container prefix removed, LF endings
    prefix: str  # container prefix (blockquote markers, list indent) for region lines
    eol: str
    options: Mapping[str, Any]
    option_error: str | None
    region: Region | None

    @property
    def code_line(self) -> int:
        """1-based note line of the first line of code."""
        return self.fence_line + 1

    def option_line(self, name: str) -> int:
        """The note line of the block's `#| name:` option (its warnings and value errors name
        it), else the opening fence's."""
        for offset, line in enumerate(self.code.split("\n")):
            match = _OPTION_LINE_RE.match(line)
            if not match:
                break
            if re.match(rf"{re.escape(name)}\s*:", match.group(1).lstrip()):
                return self.code_line + offset
        return self.fence_line


@dataclass(frozen=True)
class Note:
    text: str  # the whole decoded note, BOM included
    lines: tuple[str, ...]  # lines of the text after the BOM, endings kept
    bom: str
    frontmatter: Mapping[str, Any]
    frontmatter_error: NoteError | None
    blocks: tuple[Block, ...]
    problems: tuple[NoteError, ...] = field(default=())
    # Regions of ours that follow no python block (the block was deleted, changed language,
    # or a typed line now separates them): inert text, never parsed for code.
    orphans: tuple[Region, ...] = field(default=())
    # 0-based lines of markers that pair with nothing we wrote: user text, reported, kept.
    stray_markers: tuple[int, ...] = field(default=())

    @property
    def eol(self) -> str:
        for line in self.lines:
            ending = _line_ending(line)
            if ending:
                return ending
        return "\n"


def split_lines(text: str) -> list[str]:
    """Split like markdown-it does (\\r\\n, \\r or \\n), keeping each line's ending."""
    return _LINE_RE.findall(text)


def _line_ending(line: str) -> str:
    if line.endswith("\r\n"):
        return "\r\n"
    if line.endswith(("\n", "\r")):
        return line[-1]
    return ""


def _strip_ending(line: str) -> str:
    return line[: len(line) - len(_line_ending(line))]


def region_checksum(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def code_hash(previous: str, code: str, options: Mapping[str, Any]) -> str:
    """Hash of a block's code, its effective options and every block that ran before it.

    Chained, because in notebook semantics a block's output depends on the code above it.
    """
    payload = json.dumps([previous, code, dict(sorted(options.items()))], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def decode_note(data: bytes) -> str:
    """Decode note bytes as UTF-8, or raise NoteError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise NoteError(
            f"is not valid UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8 in your editor and try again",
            line,
        ) from None


def _frontmatter_span(lines: list[str]) -> int:
    """Number of lines the frontmatter occupies (0 when there is none)."""
    if not lines or _strip_ending(lines[0]).rstrip() != _FRONTMATTER_OPEN:
        return 0
    for i in range(1, len(lines)):
        if _strip_ending(lines[i]).rstrip() in _FRONTMATTER_CLOSE:
            return i + 1
        if _MARKER_LINE_RE.match(lines[i]):
            return 0  # a `---` rule opens the note: a line of one of our regions never closes it
    return 0


def _load_frontmatter(lines: list[str], span: int) -> tuple[dict[str, Any], NoteError | None]:
    if span == 0:
        return {}, None
    import frontmatter  # python-frontmatter: reads metadata, never writes it back

    source = "".join(_strip_ending(line) + "\n" for line in lines[1 : span - 1])
    try:
        loaded = frontmatter.YAMLHandler().load(source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 2 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return {}, NoteError(f"has broken YAML frontmatter ({problem}); fix the properties and try again", line)
    except Exception as exc:  # pyyaml raises a few non-YAMLError types on odd input
        return {}, NoteError(f"has unreadable frontmatter ({exc}); fix it and try again", 1)
    if loaded is None:
        return {}, None
    if not isinstance(loaded, dict):
        return {}, NoteError("has frontmatter that is not a list of properties", 2)
    return loaded, None


def parse_block_options(code: str) -> tuple[dict[str, Any], str | None]:
    """Read Quarto-style `#| key: value` lines at the top of a block."""
    option_lines = []
    for line in code.split("\n"):
        match = _OPTION_LINE_RE.match(line)
        if not match:
            break
        option_lines.append(match.group(1))
    if not option_lines:
        return {}, None
    try:
        loaded = yaml.safe_load("\n".join(option_lines))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        return {}, f"cannot read the `#|` options: {problem}"
    if loaded is None:
        return {}, None
    if not isinstance(loaded, dict):
        return {}, "`#|` option lines must look like `#| key: value`"
    return {str(k): v for k, v in loaded.items()}, None


def is_runnable(info: str) -> bool:
    words = info.strip().split()
    if not words:
        return False
    language = words[0].strip("{}").split(",")[0].lower()
    return language in RUNNABLE_LANGUAGES


def _fence_prefix(line: str, fence_char: str) -> str:
    body = _strip_ending(line)
    position = body.find(fence_char * 3)
    return body[:position] if position >= 0 else ""


def _strip_prefix(line: str, prefix: str) -> str:
    body = _strip_ending(line)
    if body.startswith(prefix):
        return body[len(prefix) :]
    if body.startswith(prefix.rstrip()):
        return body[len(prefix.rstrip()) :]
    return body.lstrip(" >\t")


def _scan_regions(lines: list[str], start: int) -> tuple[list[Region], list[int]]:
    """Every region of ours in the note, found by its markers alone, and the stray markers.

    A region is ours when an opening marker pairs with the next end marker (with no other
    opening marker between) under the same prefix. One whose checksum no longer matches is
    still ours (hand-edited, reported) unless it now holds a python fence: then the user
    typed code between markers that paired by accident, and the markers are only text.
    """
    regions: list[Region] = []
    strays: list[int] = []
    i = start
    while i < len(lines):
        marker = _MARKER_LINE_RE.match(lines[i])
        if not marker:
            i += 1
            continue
        prefix = marker.group(1)
        opening = _OPEN_RE.match(_strip_prefix(lines[i], prefix).strip())
        if not opening:
            strays.append(i)
            i += 1
            continue
        body: list[str] = []
        end_index = None
        end = None
        for j in range(i + 1, len(lines)):
            content = _strip_prefix(lines[j], prefix)
            end = _END_RE.match(content.strip())
            if end:
                end_index = j
                break
            if _OPEN_RE.match(content.strip()):
                break
            body.append(content)
        if end_index is None or end is None:
            strays.append(i)
            i += 1
            continue
        region = Region(i, end_index + 1, opening.group(1), end.group(1), "".join(line + "\n" for line in body))
        if region.hand_edited and any(_RUNNABLE_FENCE_RE.match(line) for line in body):
            strays.append(i)
            i += 1
            continue
        regions.append(region)
        i = end_index + 1
    return regions, strays


def _region_after(lines: list[str], close_index: int, prefix: str, starts: Mapping[int, Region]) -> int:
    """The line after a closing fence where its region would start (blank lines may sit between)."""
    i = close_index + 1
    while i < len(lines) and i not in starts and not _strip_prefix(lines[i], prefix).strip():
        i += 1
    return i


def parse_note(text: str) -> Note:
    """Parse decoded note text. Never raises: problems are recorded on the Note."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    lines = split_lines(text[len(bom) :])
    span = _frontmatter_span(lines)
    metadata, frontmatter_error = _load_frontmatter(lines, span)
    regions, strays = _scan_regions(lines, span)
    inert = {line for region in regions for line in range(region.start, region.stop)}
    # Blank the frontmatter and our regions rather than cut them, so markdown-it's line maps
    # stay note lines and nothing an output holds (an unclosed fence, an HTML block) can
    # change how the user's own text parses.
    source = "".join(
        "\n" if index < span or index in inert else _strip_ending(line) + "\n" for index, line in enumerate(lines)
    )
    try:
        tokens = _markdown.parse(source)
    except Exception as exc:  # markdown-it should not raise; a parser bug must not lose a note
        return Note(
            text,
            tuple(lines),
            bom,
            metadata,
            frontmatter_error,
            (),
            (NoteError(f"could not be parsed as markdown ({exc})", 1),),
        )

    starts = {region.start: region for region in regions}
    stray_opens = {i for i in strays if _OPEN_RE.match(_strip_prefix(lines[i], "").lstrip(" >\t").strip())}
    blocks: list[Block] = []
    problems: list[NoteError] = []
    attached: set[int] = set()
    for token in tokens:
        if token.type != "fence" or token.map is None or not is_runnable(token.info):
            continue
        open_index, stop_index = token.map
        close_index = stop_index - 1
        # markdown-it records no "closed" flag; a closed fence has one line fewer of content
        # than its line map spans (the closing line is in the map, not in the content).
        closed = token.content.count("\n") == stop_index - open_index - 2
        if not closed:
            problems.append(
                NoteError(
                    f"has a ```{token.info.strip()} block that is never closed; "
                    f"add a closing {token.markup} line after its code",
                    open_index + 1,
                )
            )
            continue
        close_prefix = _fence_prefix(lines[close_index], token.markup[0])
        where = _region_after(lines, close_index, close_prefix, starts)
        region = starts.get(where)
        if region is not None:
            attached.add(region.start)
        elif where in stray_opens:
            problems.append(
                NoteError(
                    "has an output region with no end marker; delete its `<!-- vault-runner:output` "
                    "line (or restore the end marker) and run again",
                    where + 1,
                )
            )
        options, option_error = parse_block_options(token.content)
        blocks.append(
            Block(
                index=len(blocks),
                fence_line=open_index + 1,
                close_line=close_index + 1,
                info=token.info.strip(),
                code=token.content,
                prefix=close_prefix,
                eol=_line_ending(lines[close_index]) or _first_ending(lines),
                options=options,
                option_error=option_error,
                region=region,
            )
        )
    orphans = tuple(region for region in regions if region.start not in attached)
    return Note(
        text, tuple(lines), bom, metadata, frontmatter_error, tuple(blocks), tuple(problems), orphans, tuple(strays)
    )


def _first_ending(lines: list[str]) -> str:
    for line in lines:
        ending = _line_ending(line)
        if ending:
            return ending
    return "\n"


def region_lines(block: Block, code_hash_value: str, body: str) -> list[str]:
    """The lines of a region for `block`, prefixed and ended like the block's own lines.

    `body` uses LF endings; the returned lines carry the block's line ending.
    """
    eol = block.eol
    prefix = block.prefix
    blank_prefix = prefix.rstrip()
    inner = body.split("\n")
    if inner and inner[-1] == "":
        inner.pop()
    out = [prefix + OPEN_MARKER.format(code_hash=code_hash_value) + eol]
    for line in inner:
        out.append((prefix + line if line else blank_prefix) + eol)
    checksum = region_checksum("".join(line + "\n" for line in inner))
    out.append(prefix + END_MARKER.format(checksum=checksum) + eol)
    return out


def splice(note: Note, regions: Mapping[int, list[str] | None], orphans: Sequence[Region] = ()) -> str:
    """Return the note text with the regions of the given blocks replaced.

    `regions` maps a block index to its new region lines, or to None to remove its
    region; `orphans` are regions that follow no block, to remove. Blocks not mentioned
    keep what they have. Only region lines change.
    """
    lines = list(note.lines)
    edits: list[tuple[int, int, list[str] | None, Block | None]] = []
    for block in note.blocks:
        if block.index not in regions:
            continue
        new = regions[block.index]
        if block.region is not None:
            edits.append((block.region.start, block.region.stop, new, block))
        elif new is not None:
            edits.append((block.close_line, block.close_line, new, block))  # just after the closing fence
    edits.extend((orphan.start, orphan.stop, None, None) for orphan in orphans)
    # Work bottom-up so earlier indices stay valid.
    for start, stop, new, block in sorted(edits, key=lambda edit: edit[0], reverse=True):
        if new is None:
            at_end = stop == len(lines) and not _line_ending(lines[stop - 1])
            del lines[start:stop]
            if at_end and start > 0:
                lines[start - 1] = _strip_ending(lines[start - 1])
            continue
        assert block is not None
        new = list(new)
        if stop == len(lines):
            if block.region is None:
                # The closing fence is the last line: give it an ending, and keep the
                # note's missing final newline by leaving it off our last line instead.
                if not _line_ending(lines[start - 1]):
                    lines[start - 1] = lines[start - 1] + block.eol
                    new[-1] = _strip_ending(new[-1])
            elif not _line_ending(lines[stop - 1]):
                new[-1] = _strip_ending(new[-1])
        lines[start:stop] = new
    return note.bom + "".join(lines)


def removable_orphans(note: Note) -> tuple[Region, ...]:
    """Orphaned regions that are exactly what we wrote: removing them loses nothing typed."""
    return tuple(orphan for orphan in note.orphans if not orphan.hand_edited)


def cleaned(note: Note, *, force: bool = False) -> str:
    """The note text without our regions: what `clean` writes. A region edited by hand stays
    unless `force`; an orphaned one stays once edited (it may hold the user's text)."""
    remove = {b.index: None for b in note.blocks if b.region is not None and (force or not b.region.hand_edited)}
    return splice(note, remove, removable_orphans(note))


def strip_regions(note: Note) -> str:
    """The note text with every output region removed (hand-edited orphans are kept)."""
    return splice(note, {block.index: None for block in note.blocks}, removable_orphans(note))


def sanitize_output_line(line: str) -> str:
    """Defuse text that would look like one of our markers inside a region."""
    return _ANY_MARKER_RE.sub(lambda m: "<!\u200b-- vault-runner:" + m.group(1), line)

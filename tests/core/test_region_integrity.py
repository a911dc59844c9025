"""Regions are self-contained and inert, whatever an output holds (issue 10, items 1-3). Pure.

Property tests of the parse -> render -> splice core with outputs chosen to break out of a
region (fences of any length, HTML, `---`, fake markers) and user edits between runs.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vault_runner.core import note as notes
from vault_runner.core.plan import plan_blocks
from vault_runner.core.render import render_outputs

FRAGMENTS = [
    "```",
    "````",
    "~~~",
    "```python\nprint('from an output')",
    "```python\nprint('from an output')\n```",
    "<div>",
    "</div>",
    "<!--",
    "<script>",
    "---",
    "...",
    "----",
    "<!-- vault-runner:output code=abcdef123456 -->",
    "<!-- vault-runner:end sum=abcdef123456 -->",
    "> [!note]",
    "- item",
    "    indented",
    "| a | b |",
    "plain words",
    "",
]

markdown_outputs = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map("\n".join)
codes = st.sampled_from(["print(1)", "x = 2\nx", "import math", "y = [1, 2]"])
prose = st.sampled_from(["Texto.", "# Título", "---", "- lista", "> cita", "Más texto con `código`."])


@st.composite
def notes_with_blocks(draw: st.DrawFn) -> str:
    parts = []
    if draw(st.booleans()):
        parts.append("---\nvault-runner: true\n---")
    elif draw(st.booleans()):
        parts.append("---")  # a rule, not frontmatter
    for _ in range(draw(st.integers(1, 4))):
        parts.append(draw(prose))
        parts.append(f"```python\n{draw(codes)}\n```")
    parts.append(draw(prose))
    return "\n\n".join(parts) + draw(st.sampled_from(["\n", "", "\n\n"]))


def render(text: str, outputs: list[str]) -> str:
    """One render as the engine does it: a region under every block from its outputs; a region
    edited by hand is left as it is (no --force)."""
    note = notes.parse_note(text)
    plan = plan_blocks(note, {})
    regions = {}
    for planned, markdown in zip(plan, outputs * len(plan), strict=False):
        if planned.block.region is not None and planned.block.region.hand_edited:
            continue
        body = render_outputs(
            [{"output_type": "display_data", "data": {"text/markdown": markdown}}],
            note_stem="n",
            embed=lambda name: f"![[{name}]]",
            sources={},
        ).body
        assert planned.code_hash is not None
        regions[planned.block.index] = notes.region_lines(planned.block, planned.code_hash, body)
    return notes.splice(note, regions, notes.removable_orphans(note))


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=notes_with_blocks(), outputs=st.lists(markdown_outputs, min_size=1, max_size=3))
def test_a_rendered_note_parses_to_the_same_blocks_and_cleans_back_to_its_bytes(text: str, outputs: list[str]) -> None:
    before = notes.parse_note(text)
    rendered = render(text, outputs)
    after = notes.parse_note(rendered)
    assert [b.code for b in after.blocks] == [b.code for b in before.blocks]
    assert all(b.region is not None and not b.region.hand_edited for b in after.blocks)
    assert after.frontmatter == before.frontmatter and not after.problems
    assert after.orphans == () and after.stray_markers == ()
    assert notes.strip_regions(after) == text


@SETTINGS
@given(text=notes_with_blocks(), outputs=st.lists(markdown_outputs, min_size=1, max_size=3))
def test_render_of_a_rendered_note_changes_nothing(text: str, outputs: list[str]) -> None:
    once = render(text, outputs)
    assert render(once, outputs) == once


@SETTINGS
@given(
    text=notes_with_blocks(),
    outputs=st.lists(markdown_outputs, min_size=1, max_size=3),
    typed=st.sampled_from(["Mi nota nueva.", "```python\nprint('mío')\n```", "# Otra sección"]),
    data=st.data(),
)
def test_user_edits_between_runs_always_survive_render_and_clean(
    text: str, outputs: list[str], typed: str, data: st.DataObject
) -> None:
    rendered = render(text, outputs)
    lines = rendered.splitlines(keepends=True)
    edit = data.draw(st.sampled_from(["insert", "delete-block", "delete-across"]))
    note = notes.parse_note(rendered)
    if edit == "insert":
        at = data.draw(st.integers(0, len(lines)))
        lines.insert(at, typed + "\n")
    elif edit == "delete-block":
        if not note.blocks:
            return
        block = note.blocks[data.draw(st.integers(0, len(note.blocks) - 1))]
        del lines[block.fence_line - 1 : block.close_line]
    else:
        # Delete from inside one region to the start of the next, and type there.
        with_region = [b for b in note.blocks if b.region is not None]
        if len(with_region) < 2:
            return
        first, second = with_region[0], with_region[1]
        assert first.region is not None and second.region is not None
        lines[first.region.start + 1 : second.region.start] = [typed + "\n"]
    edited = "".join(lines)
    for result in (render(edited, outputs), notes.cleaned(notes.parse_note(edited))):
        assert typed in result or edit == "delete-block"
        # Every line the user has outside our regions is still there, in order.
        mine = [line for line in _user_lines(edited)]
        kept = _user_lines(result)
        assert _is_subsequence(mine, kept), (mine, kept)


def _user_lines(text: str) -> list[str]:
    note = notes.parse_note(text)
    ours = {i for b in note.blocks if b.region for i in range(b.region.start, b.region.stop)}
    ours |= {i for o in notes.removable_orphans(note) for i in range(o.start, o.stop)}
    return [line.rstrip("\r\n") for i, line in enumerate(note.lines) if i not in ours]


def _is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(line == other for other in it) for line in needle)


def test_an_orphaned_region_holding_a_python_fence_is_never_a_block() -> None:
    region_body = "```python\nopen('pwned', 'w')\n```\n"
    region = (
        "<!-- vault-runner:output code=abcdef123456 -->\n"
        f"{region_body}"
        f"<!-- vault-runner:end sum={notes.region_checksum(region_body)} -->\n"
    )
    note = notes.parse_note("Texto.\n\n" + region + "\nMás.\n")
    assert note.blocks == () and len(note.orphans) == 1 and not note.orphans[0].hand_edited
    assert notes.strip_regions(note) == "Texto.\n\n\nMás.\n"


def test_an_unpaired_start_marker_never_swallows_typed_code() -> None:
    body = "out\n"
    text = (
        "```python\nprint(1)\n```\n"
        f"<!-- vault-runner:output code=abcdef123456 -->\nMi texto.\n\n```python\nprint('mío')\n```\n"
        f"<!-- vault-runner:end sum={notes.region_checksum(body)} -->\n"
    )
    note = notes.parse_note(text)
    assert [b.code for b in note.blocks] == ["print(1)\n", "print('mío')\n"]
    assert note.blocks[0].region is None and note.stray_markers
    assert notes.strip_regions(note) == text

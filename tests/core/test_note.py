"""Parser and splice: pure, no kernel. Property tests carry most of the weight."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vault_runner.core import note as notes

# -- generators ---------------------------------------------------------------------------

EOLS = st.sampled_from(["\n", "\r\n", "\r"])
PREFIXES = st.sampled_from(["", "> ", ">", "   ", "> > ", "    ", "1. ", "- "])
FENCES = st.sampled_from(["```", "~~~", "````", "`````"])
INFOS = st.sampled_from(["python", "py", "{python}", "python title=x", "Python", "js", "", "pycon", "ipython3"])
CODE_LINES = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=30),
        st.sampled_from(
            [
                "#| eval: false",
                "#| output: false",
                "#| label: x",
                "print(1)",
                "```",
                "~~~",
                "x = '''",
                "<!-- vault-runner:output code=abc -->",
                "<!-- vault-runner:end sum=abc -->",
            ]
        ),
    ),
    max_size=5,
)
PROSE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40),
    st.sampled_from(
        [
            "# Título 🤖",
            "> [!tip] Truco",
            ">[!warning]",
            "- item",
            "1. paso",
            "",
            "   ",
            "\t",
            "---",
            "<iframe src='x'></iframe>",
            "![[img.png]]",
            "<!-- nota -->",
            "n√∫meros",
            "<!-- vault-runner:output code=0a -->",
            "<!-- vault-runner:end sum=1b -->",
        ]
    ),
)


@st.composite
def fenced_block(draw) -> list[str]:
    prefix = draw(PREFIXES)
    fence = draw(FENCES)
    info = draw(INFOS)
    code = draw(CODE_LINES)
    closing = draw(st.sampled_from([fence, fence, fence + "`", "", fence[0] * 3]))
    lines = [prefix + fence + info] + [prefix + line for line in code]
    if closing:
        lines.append(prefix + closing)
    return lines


@st.composite
def markdown_notes(draw) -> str:
    eol = draw(EOLS)
    lines: list[str] = []
    if draw(st.booleans()):
        lines += ["---", draw(st.sampled_from(["title: x", "tags: [a, b]", "a: {", "vault-runner: true", ""])), "---"]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines += draw(fenced_block())
        else:
            lines.append(draw(PROSE))
    text = eol.join(lines)
    if draw(st.booleans()):
        text += eol
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


BODIES = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=20),
    max_size=4,
).map(lambda lines: "".join(notes.sanitize_output_line(line) + "\n" for line in lines))

relaxed = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


# -- properties -----------------------------------------------------------------------------


@relaxed
@given(st.text())
def test_parse_never_raises_on_any_text(text: str) -> None:
    parsed = notes.parse_note(text)
    assert parsed.bom + "".join(parsed.lines) == text


@relaxed
@given(markdown_notes())
def test_parse_never_raises_on_markdown_like_text(text: str) -> None:
    parsed = notes.parse_note(text)
    assert parsed.bom + "".join(parsed.lines) == text
    for block in parsed.blocks:
        assert 1 <= block.fence_line < block.close_line <= len(parsed.lines)


@relaxed
@given(markdown_notes(), st.data())
def test_removing_regions_gives_back_the_original_bytes(text: str, data: st.DataObject) -> None:
    original = notes.parse_note(text)
    if original.problems or any(b.region for b in original.blocks):
        return  # a note that already has (broken) regions is refused or handled by other tests
    bodies = {b.index: data.draw(BODIES) for b in original.blocks}
    rendered_text = notes.splice(
        original, {i: notes.region_lines(original.blocks[i], "ab12", body) for i, body in bodies.items()}
    )
    rendered = notes.parse_note(rendered_text)
    # The same blocks, with the same code, each now owning the region we gave it.
    assert [b.code for b in rendered.blocks] == [b.code for b in original.blocks]
    for block in rendered.blocks:
        assert block.region is not None
        assert block.region.body == bodies[block.index]
        assert not block.region.hand_edited
    assert notes.strip_regions(rendered).encode("utf-8", "surrogatepass") == text.encode("utf-8", "surrogatepass")
    # Replacing the regions with the same content changes nothing (idempotence).
    again = notes.splice(rendered, {b.index: notes.region_lines(b, "ab12", bodies[b.index]) for b in rendered.blocks})
    assert again == rendered_text


@relaxed
@given(markdown_notes(), st.data())
def test_replacing_a_region_touches_only_region_lines(text: str, data: st.DataObject) -> None:
    original = notes.parse_note(text)
    if original.problems or not original.blocks or any(b.region for b in original.blocks):
        return
    first = notes.parse_note(
        notes.splice(original, {b.index: notes.region_lines(b, "aa", "one\n") for b in original.blocks})
    )
    index = data.draw(st.sampled_from([b.index for b in first.blocks]))
    body = data.draw(BODIES)
    second_text = notes.splice(first, {index: notes.region_lines(first.blocks[index], "bb", body)})
    second = notes.parse_note(second_text)
    assert notes.strip_regions(second) == text
    assert second.blocks[index].region.body == body
    assert all(b.region.body == "one\n" for b in second.blocks if b.index != index)


# -- examples -------------------------------------------------------------------------------


def test_crlf_bom_and_missing_final_newline_are_kept() -> None:
    text = "\ufeff---\r\ntitle: x\r\n---\r\n# T\r\n```python\r\nprint(1)\r\n```"
    parsed = notes.parse_note(text)
    assert parsed.frontmatter == {"title": "x"}
    [block] = parsed.blocks
    assert block.code == "print(1)\n" and block.eol == "\r\n" and block.fence_line == 5
    rendered = notes.splice(parsed, {0: notes.region_lines(block, "abc", "1\n")})
    assert rendered.startswith("\ufeff---\r\n")
    assert "\n" not in rendered.replace("\r\n", "")
    assert not rendered.endswith("\n")
    assert notes.strip_regions(notes.parse_note(rendered)) == text


def test_blocks_in_callouts_and_lists_keep_their_prefix() -> None:
    text = ">[!tip] Truco\n> ```python\n> x = 1\n> ```\n\n1. paso\n   ```py\n   y = 2\n   ```\n"
    parsed = notes.parse_note(text)
    assert [b.prefix for b in parsed.blocks] == ["> ", "   "]
    rendered = notes.splice(parsed, {b.index: notes.region_lines(b, "h", "out\n\nmore\n") for b in parsed.blocks})
    assert "> <!-- vault-runner:output code=h -->\n> ```\n" not in rendered  # body is verbatim, not re-fenced
    assert "> <!-- vault-runner:output code=h -->\n> out\n>\n> more\n> <!-- vault-runner:end" in rendered
    assert "   <!-- vault-runner:output code=h -->\n   out\n\n   more\n   <!-- vault-runner:end" in rendered


@pytest.mark.parametrize(
    "info,runnable",
    [
        ("python", True),
        ("py", True),
        ("{python}", True),
        ("python title='a b'", True),
        ("PYTHON", True),
        ("pycon", False),
        ("javascript", False),
        ("", False),
        ("python3", True),
    ],
)
def test_which_fences_are_runnable(info: str, runnable: bool) -> None:
    assert bool(notes.parse_note(f"```{info}\nx\n```\n").blocks) is runnable


def test_tilde_and_long_fences() -> None:
    text = "~~~python\na = '```'\n~~~\n````py\n```\nb\n````\n"
    parsed = notes.parse_note(text)
    assert [b.code for b in parsed.blocks] == ["a = '```'\n", "```\nb\n"]


def test_block_options() -> None:
    parsed = notes.parse_note("```python\n#| eval: false\n#| label: carga\nx\n```\n")
    assert parsed.blocks[0].options == {"eval": False, "label": "carga"}
    broken = notes.parse_note("```python\n#| eval: [\nx\n```\n")
    assert broken.blocks[0].option_error and "options" in broken.blocks[0].option_error


def test_unclosed_fence_is_a_problem_with_its_line() -> None:
    parsed = notes.parse_note("# T\n\n```python\nprint(1)\n")
    assert parsed.problems and parsed.problems[0].line == 3
    assert "never closed" in parsed.problems[0].message


def test_broken_yaml_names_the_line() -> None:
    parsed = notes.parse_note("---\ntitle: ok\ntags: [a, b\n---\n```python\nx\n```\n")
    assert parsed.frontmatter_error is not None
    assert parsed.frontmatter_error.line in (3, 4)


def test_non_utf8_names_the_line() -> None:
    with pytest.raises(notes.NoteError) as info:
        notes.decode_note(b"# ok\nline two\nbad \xff byte\n")
    assert info.value.line == 3


def test_region_without_end_marker_is_a_problem() -> None:
    parsed = notes.parse_note("```python\nx\n```\n<!-- vault-runner:output code=ab -->\n```\n1\n```\n")
    assert parsed.problems and parsed.problems[0].line == 4


def test_hand_edit_is_detected() -> None:
    parsed = notes.parse_note("```python\nx\n```\n")
    rendered = notes.splice(parsed, {0: notes.region_lines(parsed.blocks[0], "ab", "1\n")})
    assert not notes.parse_note(rendered).blocks[0].region.hand_edited
    edited = rendered.replace("\n1\n", "\n2\n")
    assert notes.parse_note(edited).blocks[0].region.hand_edited


def test_python_fences_inside_a_region_are_not_runnable() -> None:
    parsed = notes.parse_note("```python\nx\n```\n")
    body = "Markdown output:\n```python\nnot_code()\n```\n"
    rendered = notes.parse_note(notes.splice(parsed, {0: notes.region_lines(parsed.blocks[0], "ab", body)}))
    assert len(rendered.blocks) == 1 and rendered.blocks[0].region.body == body


def test_blank_lines_between_fence_and_region_keep_the_region_attached() -> None:
    parsed = notes.parse_note("```python\nx\n```\n")
    rendered = notes.splice(parsed, {0: notes.region_lines(parsed.blocks[0], "ab", "1\n")})
    spaced = rendered.replace("```\n<!--", "```\n\n<!--", 1)
    assert notes.parse_note(spaced).blocks[0].region is not None


def test_code_hash_is_chained() -> None:
    first = notes.code_hash("", "a = 1\n", {})
    assert notes.code_hash(first, "print(a)\n", {}) != notes.code_hash(
        notes.code_hash("", "a = 2\n", {}), "print(a)\n", {}
    )
    assert notes.code_hash("", "x\n", {"seed": 1}) != notes.code_hash("", "x\n", {"seed": 2})


def test_sanitize_defuses_markers() -> None:
    line = notes.sanitize_output_line("<!-- vault-runner:end sum=abc -->")
    assert "<!-- vault-runner:end" not in line


def test_only_three_dashes_close_the_frontmatter_so_yaml_never_holds_a_block() -> None:
    """Issue 10.5: `----` closed the frontmatter for opt-in but not for the block parser."""
    text = (
        "---\nvault-runner: true\nx: |\n  ```python\n  print('in yaml')\n  ```\n----\n"
        "Texto.\n\n```python\nprint(1)\n```\n"
    )
    note = notes.parse_note(text)
    assert note.frontmatter == {}  # as Obsidian reads it: no closing `---`, no properties
    closed = notes.parse_note(text.replace("----\n", "---\n"))
    assert closed.frontmatter["vault-runner"] is True
    assert [b.code for b in closed.blocks] == ["print(1)\n"]  # the YAML block scalar is never code


def test_a_list_item_block_with_a_differently_indented_closing_fence_cleans_back() -> None:
    """Issue 10.6: a `10.` item, fence indented 4, closing fence indented 5, then a region."""
    text = "10. Paso:\n\n    ```python\n    print(1)\n     ```\n\nDespués.\n"
    note = notes.parse_note(text)
    (block,) = note.blocks
    lines = notes.region_lines(block, "abcdef123456", "```\n1\n```\n")
    rendered = notes.splice(note, {block.index: lines})
    again = notes.parse_note(rendered)
    assert again.blocks[0].region is not None and not again.blocks[0].region.hand_edited
    assert notes.cleaned(again) == text

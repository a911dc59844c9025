"""Rendering of Jupyter outputs into region markdown: pure, no kernel."""

from __future__ import annotations

import base64

from vault_runner.core import render
from vault_runner.core.render import CellSource

NO_SOURCES: dict[int, CellSource] = {}


def _render(outputs, **kw):
    return render.render_outputs(
        outputs, note_stem="Nota", embed=lambda name: f"![[{name}]]", sources=kw.pop("sources", NO_SOURCES), **kw
    )


def test_stream_text_is_fenced_and_merged_without_ansi() -> None:
    out = _render(
        [
            {"output_type": "stream", "name": "stdout", "text": "\x1b[31mrojo\x1b[0m\n"},
            {"output_type": "stream", "name": "stdout", "text": "10%\r100%\n"},
        ]
    )
    assert out.body == "```\nrojo\n100%\n```\n"


def test_output_with_backtick_fences_gets_a_longer_fence() -> None:
    out = _render([{"output_type": "stream", "name": "stdout", "text": "```python\nx\n```\n"}])
    assert out.body.startswith("````\n```python\n")
    assert out.body.endswith("```\n````\n")


def test_markdown_is_inserted_as_markdown() -> None:
    out = _render([{"output_type": "display_data", "data": {"text/markdown": "**negrita**", "text/plain": "x"}}])
    assert out.body == "**negrita**\n"


def test_images_become_attachments_with_content_names() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    data = {"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"}
    out = _render([{"output_type": "display_data", "data": data}, {"output_type": "display_data", "data": data}])
    assert len(out.attachments) == 1 and out.attachments[0].data == png
    name = out.attachments[0].name
    assert name.startswith("Nota-vr-") and name.endswith(".png")
    assert out.body.count(f"![[{name}]]") == 2


def test_long_output_is_folded_and_huge_output_truncated() -> None:
    text = "".join(f"línea {i}\n" for i in range(1000))
    out = _render([{"output_type": "stream", "name": "stdout", "text": text}], output_lines=100)
    lines = out.body.splitlines()
    assert lines[0].startswith("> [!abstract]- Output")
    assert any("lines truncated by vault-runner" in line for line in lines)
    assert "> línea 0" in lines and "> línea 999" in lines and "> línea 500" not in lines


def test_error_becomes_a_failure_callout_with_note_lines() -> None:
    traceback = [
        "\x1b[0;31m---------------------------------------------------------------------------\x1b[0m",
        "\x1b[0;31mRuntimeError\x1b[0m                              Traceback (most recent call last)",
        "Cell \x1b[0;32mIn[3], line 2\x1b[0m\n\x1b[1;32m      1\x1b[0m a = 1\n\x1b[0;32m----> 2\x1b[0m f(a)\n",
        "File \x1b[0;32m/usr/lib/python3/site-packages/torch/x.py:10\x1b[0m, in \x1b[0;36mf\x1b[0m\n     10 raise\n",
        "\x1b[0;31mRuntimeError\x1b[0m: boom",
    ]
    out = _render(
        [{"output_type": "error", "ename": "RuntimeError", "evalue": "boom", "traceback": traceback}],
        sources={3: CellSource("Nota.md", 40)},
    )
    lines = out.body.splitlines()
    assert lines[0] == "> [!failure] RuntimeError: boom"
    assert '> File "Nota.md", line 41' in lines
    assert ">      40 a = 1" in lines and "> ----> 41 f(a)" in lines
    assert any("1 frame in library code hidden" in line for line in lines)
    assert not any("site-packages" in line for line in lines)
    assert not any("\x1b" in line for line in lines)


def test_marker_lookalikes_in_output_are_defused() -> None:
    out = _render([{"output_type": "stream", "name": "stdout", "text": "<!-- vault-runner:end sum=abc -->\n"}])
    assert "<!-- vault-runner:end" not in out.body


def test_plain_text_result_and_summary() -> None:
    output = {"output_type": "execute_result", "data": {"text/plain": "tensor([1, 2])"}, "execution_count": 1}
    assert _render([output]).body == "```\ntensor([1, 2])\n```\n"
    assert render.output_summary(output) == {"type": "execute_result", "mime": ["text/plain"], "text": "tensor([1, 2])"}

"""Shared by the benchmark scripts: notebooks <-> notes, and nbclient as the reference peer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient


def notebook_to_note(nb: nbformat.NotebookNode) -> str:
    """A note made from a notebook: markdown cells as text, code cells as python fences."""
    parts = ["---\nvault-runner: true\n---\n"]
    for cell in nb.cells:
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if cell.cell_type == "markdown":
            parts.append(source.rstrip("\n") + "\n")
        elif cell.cell_type == "code" and source.strip():
            fence = "````" if "```" in source else "```"
            parts.append(f"{fence}python\n{source.rstrip(chr(10))}\n{fence}\n")
    return "\n".join(parts)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and "".join(c.source).strip()]


def run_nbclient(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    nb = nbformat.from_dict(nb)
    for cell in code_cells(nb):
        cell.outputs = []
    started = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb, time.perf_counter() - started


def text_outputs(outputs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Comparable text of outputs: streams merged by name, text/plain results, errors by name and value."""
    merged: list[tuple[str, str]] = []
    for output in outputs:
        kind = output.get("output_type") or output.get("type")
        if kind == "stream":
            text = output.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            text = text.replace("\r\n", "\n")  # a pty's line endings (`!cmd`); notes store LF
            key = "stream:" + output.get("name", "stdout")
            if merged and merged[-1][0] == key:
                merged[-1] = (key, merged[-1][1] + text)
            else:
                merged.append((key, text))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data")
            text = data.get("text/plain") if data is not None else output.get("text")
            if text is not None:
                merged.append(("result", "".join(text) if isinstance(text, list) else text))
        elif kind == "error":
            merged.append(("error", f"{output.get('ename')}: {output.get('evalue')}"))
    return merged

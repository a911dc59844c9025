"""Turning a kernel's iopub messages into nbformat-style outputs, within the output limits.

Text is cut per line (MAX_LINE_CHARS) and per block (MAX_OUTPUT_BYTES), images per block
(MAX_IMAGES) and per image (MAX_IMAGE_BYTES); what was cut is counted for the notice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vault_runner.kernel.limits import MAX_IMAGE_BYTES, MAX_IMAGES, MAX_LINE_CHARS, MAX_OUTPUT_BYTES

__all__ = ("DROPPED_MIME", "OutputCallback", "OutputCollector", "reply_from_outputs", "to_output")

_LINE_END_RE = re.compile(r"(?<=[\r\n])")
# What the kernel's prelude (setup.py) sends when it closed figures past MAX_IMAGES.
DROPPED_MIME = "application/x-vault-runner-dropped+json"

# Called with each output as it arrives and the execution count of the cell that made it
# (from its execute_input, which the kernel sends before any output; None if none came).
OutputCallback = Callable[[dict[str, Any], int | None], None]


def reply_from_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [o for o in outputs if o.get("output_type") == "error"]
    if errors:
        return {"status": "error", **{k: errors[-1].get(k) for k in ("ename", "evalue", "traceback")}}
    return {"status": "ok"}


class OutputCollector:
    """Turns iopub messages of one execution into nbformat-style outputs."""

    def __init__(self, on_output: OutputCallback | None) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.on_output = on_output
        self.idle = False
        self.execution_count: int | None = None
        self.clear_pending = False
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self.images = 0
        self.dropped_images = 0
        self.line_length: dict[str, int] = {}  # per stream, the length of its unfinished line

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["msg_type"]
        content = message["content"]
        if kind == "status":
            if content.get("execution_state") == "idle":
                self.idle = True
            return
        if kind == "execute_input":
            self.execution_count = content.get("execution_count")
            return
        if kind == "clear_output":
            if content.get("wait"):
                self.clear_pending = True
            else:
                self.outputs.clear()
            return
        self.dropped_bytes += int(content.get("vault_runner_dropped", 0) or 0)
        output = to_output(kind, content)
        if output is None:
            return
        if kind == "stream" and not output["text"]:
            return
        dropped = output.get("data", {}).get(DROPPED_MIME)
        if isinstance(dropped, dict):
            self.dropped_images += int(dropped.get("dropped_images", 0) or 0)
            return
        if self.clear_pending:
            self.outputs.clear()
            self.clear_pending = False
        if not self._within_limits(output):
            return
        self.outputs.append(output)
        if self.on_output is not None:
            self.on_output(output, self.execution_count)

    def _cut_long_lines(self, stream: str | None, text: str) -> str:
        """Cut every line at MAX_LINE_CHARS (a stream's line may span several messages)."""
        if stream is None and len(text) <= MAX_LINE_CHARS:
            return text
        length = self.line_length.get(stream, 0) if stream else 0
        pieces = _LINE_END_RE.split(text)
        if length + len(pieces[0]) <= MAX_LINE_CHARS and max(map(len, pieces)) <= MAX_LINE_CHARS:
            # The common case: no long line. Only remember where the last line stands.
            last = pieces[-1]
            if stream:
                self.line_length[stream] = len(last) + (length if len(pieces) == 1 else 0) if last else 0
            return text
        kept = []
        for piece in pieces:
            if not piece:
                continue
            ended = piece[-1] in "\r\n"
            body = piece[:-1] if ended else piece
            room = max(MAX_LINE_CHARS - length, 0)
            if len(body) > room:
                self.dropped_bytes += len(body) - room
                # The marker is written once per line; length past the limit means "cut".
                body = body[:room] + (" [… line cut by vault-runner …]" if length <= MAX_LINE_CHARS else "")
                length = MAX_LINE_CHARS + 1
            else:
                length += len(body)
            kept.append(body + (piece[-1] if ended else ""))
            if ended:
                length = 0
        if stream:
            self.line_length[stream] = length
        return "".join(kept)

    def _within_limits(self, output: dict[str, Any]) -> bool:
        data = output.get("data", {})
        images = [m for m in data if m.startswith("image/")]
        if images:
            self.images += 1
            if self.images > MAX_IMAGES:
                self.dropped_images += 1
                return False
            size = sum(len(str(data[m])) for m in images)
            if size > MAX_IMAGE_BYTES:
                # Too big to be a plot worth a note: say so instead of writing a huge file.
                output.clear()
                output.update(
                    {
                        "output_type": "stream",
                        "name": "stderr",
                        "text": f"[vault-runner: an image of {size:,} bytes was dropped: the limit is "
                        f"{MAX_IMAGE_BYTES:,} bytes per image]\n",
                    }
                )
                return True
        if output.get("output_type") == "stream":
            text = self._cut_long_lines(str(output.get("name")), str(output.get("text", "")))
            room = max(MAX_OUTPUT_BYTES - self.kept_bytes, 0)
            if len(text) > room:
                # Keep the head of a huge print: it usually says what went wrong.
                self.dropped_bytes += len(text) - room
                if room == 0:
                    return False
                text = text[:room]
            output["text"] = text
            self.kept_bytes += len(text)
            return bool(text)
        if isinstance(data.get("text/plain"), str):
            data["text/plain"] = self._cut_long_lines(None, data["text/plain"])
        size = sum(len(str(v)) for v in data.values())
        if self.kept_bytes + size > MAX_OUTPUT_BYTES:
            self.dropped_bytes += size
            return False
        self.kept_bytes += size
        return True


def to_output(kind: str, content: dict[str, Any]) -> dict[str, Any] | None:
    if kind == "stream":
        return {"output_type": "stream", "name": content.get("name", "stdout"), "text": content.get("text", "")}
    if kind in {"display_data", "update_display_data"}:
        return {"output_type": "display_data", "data": content.get("data", {}), "metadata": content.get("metadata", {})}
    if kind == "execute_result":
        return {
            "output_type": "execute_result",
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
            "execution_count": content.get("execution_count"),
        }
    if kind == "error":
        return {
            "output_type": "error",
            "ename": content.get("ename", "Error"),
            "evalue": content.get("evalue", ""),
            "traceback": content.get("traceback", []),
        }
    return None

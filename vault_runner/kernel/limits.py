"""The limits of one kernel execution: start-up and interrupt timing, what a block may output.

The sandbox's limits (memory, processes, network) are in sandbox/policy.py; these are the
ones the session and its output collector enforce, and `doctor` reports.
"""

from __future__ import annotations

__all__ = (
    "INTERRUPT_GRACE",
    "LOST_REPLY_GRACE",
    "MAX_IMAGES",
    "MAX_IMAGE_BYTES",
    "MAX_LINE_CHARS",
    "MAX_OUTPUT_BYTES",
    "STARTUP_TIMEOUT",
)

STARTUP_TIMEOUT = 60.0
INTERRUPT_GRACE = 5.0
LOST_REPLY_GRACE = 3.0  # seconds to wait for the reply once the kernel went idle for a request
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per block, kept in memory; the rest is counted, not kept
MAX_IMAGES = 50  # per block
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # per image, as sent (base64)
MAX_LINE_CHARS = 10_000  # per line of text output: one 200 MB line must not land in the note

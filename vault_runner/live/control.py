"""One run's control: cut a run at a block, interrupt the running block, track what ran.

The live runner cuts a run when a newer save makes it obsolete (supersede) or a user
cancels it; the kernel a run drives is wrapped so that blocks past the cut never start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vault_runner.engine import Event, EventSink, Kernel
from vault_runner.kernel.session import Execution

__all__ = ("INTERRUPT_AFTER", "INTERRUPT_RETRIES", "Control", "ControlledKernel", "Tracker")


# -- one run's control: cut a run at a block, interrupt the running block -------------------
# A block is interrupted for a newer save only once it has run this long. Interrupts reach a
# sandboxed kernel as a message; one that lands just as a short block ends can hit
# ipykernel while it sends the reply, and the reply is then lost (the run waits for the
# block's timeout). A block that has run a second is very unlikely to end in that instant,
# and a shorter one costs less to let finish.
INTERRUPT_AFTER = 1.0
INTERRUPT_RETRIES = 5


@dataclass
class Control:
    kernel: Kernel
    lock: threading.Lock = field(default_factory=threading.Lock)
    current: int | None = None  # block index of the last block-started event
    running: int | None = None  # block index executing in the kernel right now
    running_since: float = 0.0
    cancel_from: int | None = None  # blocks with an index >= this are not started
    skipped: set[int] = field(default_factory=set)
    interrupted: dict[int, str] = field(default_factory=dict)  # block index -> why
    reasons: set[str] = field(default_factory=set)

    def stop_from(self, index: int, why: str, interrupt: bool, delay: float = INTERRUPT_AFTER) -> bool:
        """Do not start blocks from `index` on; interrupt the running one if it is among them.

        The interrupt waits until the block has run `delay` seconds (see INTERRUPT_AFTER).
        Returns True when the running block is (or will be) interrupted.
        """
        with self.lock:
            if self.cancel_from is None or index < self.cancel_from:
                self.cancel_from = index
            self.reasons.add(why)
            if not interrupt or self.running is None or self.running < index:
                return False
            block, since = self.running, self.running_since
            wait = since + delay - time.monotonic()
            if wait <= 0:
                self._interrupt(block, why)
                return True
        timer = threading.Timer(wait, self._late_interrupt, args=(block, since, why))
        timer.daemon = True
        timer.start()
        return True

    def _late_interrupt(self, block: int, since: float, why: str, tries: int = 0) -> None:
        with self.lock:
            if self.running == block and self.running_since == since:
                self._interrupt(block, why, tries)

    def _interrupt(self, block: int, why: str, tries: int = 0) -> None:
        # Called with the lock held, so the kernel cannot move on to another block meanwhile.
        self.interrupted.setdefault(block, why)
        interrupter: Callable[[], None] | None = getattr(self.kernel, "interrupt", None)
        if interrupter is not None:
            try:
                interrupter()
            except Exception:
                pass
        # An interrupt that reaches the kernel before it has begun the block is ignored
        # (ipykernel ignores SIGINT between requests): if the block still runs, send another.
        if tries < INTERRUPT_RETRIES:
            timer = threading.Timer(1.0, self._late_interrupt, args=(block, self.running_since, why, tries + 1))
            timer.daemon = True
            timer.start()

    def why(self, index: int) -> str:
        if index in self.interrupted:
            return self.interrupted[index]
        if "superseded" in self.reasons:
            return "superseded"
        return next(iter(sorted(self.reasons)), "cancelled")


class ControlledKernel:
    """The note's kernel as the engine sees it during one run: blocks past the cut are not sent."""

    def __init__(self, kernel: Kernel, control: Control) -> None:
        self.kernel = kernel
        self.control = control

    def start(self) -> None:  # the session owns the kernel; the engine never starts it
        pass

    @property
    def origin(self) -> str | None:
        """How the kernel was made ("forked" or "started"), for the report."""
        return getattr(self.kernel, "origin", None)

    def take_notices(self) -> list[str]:
        """The kernel's notices (e.g. "no sandbox") for the report of its first run."""
        take = getattr(self.kernel, "take_notices", None)
        return list(take()) if take is not None else []

    def shutdown(self) -> None:
        pass

    def execute(
        self,
        code: str,
        timeout: float,
        on_output: Any = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution:
        control = self.control
        if not silent:
            with control.lock:
                index = control.current
                if control.cancel_from is not None and index is not None and index >= control.cancel_from:
                    control.skipped.add(index)
                    return Execution(status="ok", outputs=[], execution_count=None, duration=0.0)
                control.running = index
                control.running_since = time.monotonic()
        try:
            return self.kernel.execute(
                code, timeout, on_output=on_output, silent=silent, user_expressions=user_expressions
            )
        finally:
            if not silent:
                with control.lock:
                    control.running = None


@dataclass
class Tracker:
    """Forwards a run's engine events, and tells the run's control which block is next."""

    def __init__(self, sink: EventSink, control: Control) -> None:
        self.sink = sink
        self.control = control
        self.announced: set[int] = set()

    def __call__(self, event: Event) -> None:
        control = self.control
        if event.kind == "block-started" and event.index is not None:
            with control.lock:
                control.current = event.index
                cut = control.cancel_from is not None and event.index >= control.cancel_from
            if cut:
                return
            self.announced.add(event.index)
        elif event.kind == "block-finished" and event.index is not None:
            with control.lock:
                skipped = event.index in control.skipped
            if skipped:
                if event.index not in self.announced:
                    return
                event = replace(event, data={**event.data, "status": "skipped"})
        self.sink(event)

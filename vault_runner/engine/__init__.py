"""The engine: load a note, run it in a fresh kernel, write its outputs back, clean it.

load.py decides whether and how a note runs; run.py executes it; writeback.py is the one
place a byte of a note changes on the engine's behalf; clean.py removes regions.
"""

from vault_runner.core.plan import PlannedBlock
from vault_runner.engine.clean import clean_note
from vault_runner.engine.kernels import (
    Kernel,
    KernelFactory,
    default_kernel_factory,
    kernel_env,
    needs_torch,
    setup_code,
)
from vault_runner.engine.load import Loaded, Selection, block_report, could_have_blocks, load, may_be_opted_in, select
from vault_runner.engine.run import BlockResult, Engine, Run
from vault_runner.model import BlockReport, Event, EventSink, NoteReport

__all__ = (
    "BlockReport",
    "BlockResult",
    "Engine",
    "Event",
    "EventSink",
    "Kernel",
    "KernelFactory",
    "Loaded",
    "NoteReport",
    "PlannedBlock",
    "Run",
    "Selection",
    "block_report",
    "clean_note",
    "could_have_blocks",
    "default_kernel_factory",
    "kernel_env",
    "load",
    "may_be_opted_in",
    "needs_torch",
    "select",
    "setup_code",
)

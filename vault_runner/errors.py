"""Every error vault_runner raises, under one base that carries where and a stable code.

Callers branch on `code` (the API maps it to an HTTP status in one table), never on the
message text, which is written for a note-taker and may be reworded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = (
    "ApiError",
    "BlockFailed",
    "ForkError",
    "ForkUnavailable",
    "KernelDied",
    "KernelSetupError",
    "KernelStartError",
    "NoteError",
    "OptionError",
    "PathRefused",
    "SandboxError",
    "SanitizerError",
    "UntrustedVault",
    "VaultCollectError",
    "VaultError",
    "VaultRunnerError",
    "WriteConflict",
    "shown_path",
)


def shown_path(path: Path | str) -> str:
    """A path as every message prints it, so the user can paste it into a shell or an editor:
    relative to the current folder when it lies under it, else absolute (README, "Command line").
    JSON reports and the API name notes vault-relative instead."""
    try:
        absolute = os.path.abspath(path)
        relative = os.path.relpath(absolute)
    except (OSError, ValueError):  # the current folder was deleted; another drive (Windows)
        return str(path)
    return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative


class VaultRunnerError(Exception):
    """Base of our errors: `message` for a note-taker, `path` and 1-based `line` (or None), `code`."""

    code: str = "error"

    def __init__(
        self, message: str = "", *, path: Path | str | None = None, line: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        if code is not None:
            self.code = code

    def one_line(self) -> str:
        """`path:line: message`, the form editors and CI log parsers jump to."""
        if self.path is None:
            return self.message
        shown = shown_path(self.path)
        where = f"{shown}:{self.line}" if self.line else shown
        return f"{where}: {self.message}"


# -- the core: notes and options ------------------------------------------------------------
class NoteError(VaultRunnerError):
    """A note that cannot be processed safely. `line` is 1-based, or None."""

    code = "bad_note"

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message, line=line)


class OptionError(VaultRunnerError, ValueError):
    """An option value that is not allowed: `option` names it, `origin` its layer (vault config,
    frontmatter, block) once known, so the note's line can be found."""

    code = "bad_option"

    def __init__(self, message: str, *, option: str | None = None, origin: str | None = None) -> None:
        super().__init__(message)
        self.option = option
        self.origin = origin


class SanitizerError(VaultRunnerError, ValueError):
    """A `[[sanitize]]` entry of the vault config that does not compile."""

    code = "bad_sanitizer"


# -- the disk --------------------------------------------------------------------------------
class VaultError(VaultRunnerError):
    """Bad input about a file: `path` and 1-based `line` (or None) name where."""

    code = "bad_file"

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        super().__init__(message, path=path, line=line)
        self.path: Path = Path(path)
        self.args = (self.one_line(),)

    def __str__(self) -> str:
        return self.one_line()


class WriteConflict(VaultRunnerError):
    """The note changed on disk between our read and our rename."""

    code = "write_conflict"


# -- kernels and the sandbox -----------------------------------------------------------------
class KernelDied(VaultRunnerError):
    """The kernel died or could not be started."""

    code = "kernel_died"


class KernelSetupError(VaultRunnerError):
    """vault_runner's own setup code failed in a fresh kernel."""

    code = "kernel_setup"


class KernelStartError(VaultRunnerError):
    """No kernel could be had for a note; the message is one line for the note-taker."""

    code = "kernel_start"


class ForkUnavailable(VaultRunnerError):
    """A kernel cannot be forked from a template here; start one the normal way. str() says why."""

    code = "fork_unavailable"


class ForkError(VaultRunnerError):
    """The template died, a fork failed, or the forked child could not set up."""

    code = "fork_failed"


class SandboxError(VaultRunnerError):
    """The sandbox asked for cannot be set up; the message says what to do."""

    code = "sandbox"


# -- trust, the API, the pytest plugin -------------------------------------------------------
class UntrustedVault(VaultRunnerError):
    """The vault is not trusted: the watcher and the API execute nothing in it."""

    code = "untrusted"


class PathRefused(VaultRunnerError):
    """A note path from a request that must not be used. `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class ApiError(VaultRunnerError):
    """An API request that fails with the documented `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class VaultCollectError(VaultRunnerError):
    """A note the pytest plugin cannot collect."""

    code = "collect"


class BlockFailed(VaultRunnerError):
    """A block that did not run as expected; the message is what pytest shows."""

    code = "block_failed"

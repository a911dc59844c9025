"""The vault entries no kernel may write or create: what runs outside the sandbox reads them.

``.git`` (at any depth: git on the host reads ``sub/.git/config`` when the user runs it in
``sub/``, and ``core.fsmonitor`` there is a command), ``.obsidian`` (at any depth: any folder
can be opened as a vault, and its plugins are code) and ``vault-runner.toml`` at the root
(it opts notes in).

How each tier keeps them, whether or not they exist yet:

- those that exist when a kernel starts are read-only for it: bubblewrap binds them read-only,
  Landlock grants write only around them (or, with its own mounts, binds them read-only);
- one that does not exist yet cannot be created in the Landlock tier without mounts where its
  parent is not granted (the vault root, a folder holding a protected entry); everywhere else
  no mount or Landlock rule can refuse a *name* in a folder the kernel may write, so the
  `ProtectedGuard` watches the vault while the kernel lives: a protected name that appears
  stops the kernel at once (it cannot make it again), is moved out of the vault into
  vault-runner's quarantine folder (nothing is deleted), and the note says so.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = (
    "PROTECTED_ANYWHERE",
    "PROTECTED_AT_ROOT",
    "ProtectedGuard",
    "ROOT_REFUSED",
    "existing_protected",
    "is_protected",
    "quarantine_dir",
    "write_grants",
    "write_root_hint",
)

PROTECTED_ANYWHERE = (".git", ".obsidian")
PROTECTED_AT_ROOT = ("vault-runner.toml",)
GUARD_INTERVAL = 0.2  # seconds between two looks at the vault's folders (longer in huge vaults)


def is_protected(relative: Path) -> bool:
    """Whether a vault-relative path is, or lies inside, a protected entry."""
    parts = relative.parts
    if parts and parts[0] in PROTECTED_AT_ROOT:
        return True
    return any(part in PROTECTED_ANYWHERE for part in parts)


def _protected_name(name: str, at_root: bool) -> bool:
    return name in PROTECTED_ANYWHERE or (at_root and name in PROTECTED_AT_ROOT)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def existing_protected(vault: Path) -> list[Path]:
    """Every protected entry in the vault now (symlinks included: their names count), found
    without following a symlink or descending into a protected folder."""
    found: list[Path] = []
    stack = [vault]
    while stack:
        folder = stack.pop()
        for entry in _entries(folder):
            path = Path(entry.path)
            if _protected_name(entry.name, folder == vault):
                found.append(path)
            elif _is_folder(entry):
                stack.append(path)
    return sorted(found)


def write_grants(vault: Path, protected: Iterable[Path]) -> list[Path]:
    """Landlock write grants for the whole vault but the protected entries: a folder holding
    one is not granted itself (a grant covers everything below it); its other entries are."""
    protected = list(protected)
    holders = {p for path in protected for p in path.parents if p == vault or vault in p.parents}

    def grants(folder: Path) -> list[Path]:
        out: list[Path] = []
        for entry in sorted(_entries(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if path in protected or entry.is_symlink():
                continue  # a symlink would grant its target, maybe outside the vault
            out.extend(grants(path) if path in holders else [path])
        return out

    return grants(vault) if vault in holders else [vault]


class ProtectedGuard:
    """Watches a vault for protected names a kernel makes (see the module docstring).

    `stop_kernel` is called first, then the entry is moved to `quarantine`; `tripped` holds
    the note's message until read. Looks only at folders whose mtime changed since last time,
    so a look costs one stat per folder of the vault.
    """

    def __init__(self, vault: Path, stop_kernel: Callable[[], None], quarantine: Path) -> None:
        self.vault = vault
        self.stop_kernel = stop_kernel
        self.quarantine = quarantine
        self.tripped: str | None = None
        # folder -> the mtime it had when last listed; strings, not Paths: a look at a vault
        # of thousands of folders must stay cheap.
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        found: list[Path] = []
        self._look(str(vault), found)
        self.allowed = frozenset(found)  # there before the kernel: the user's own

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vault-runner-protected-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, after a last look (the kernel is gone: nothing can appear later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.check()

    def _run(self) -> None:
        pause = GUARD_INTERVAL
        while not self._stop.wait(pause):
            started = time.monotonic()
            self.check()
            # A vault of many thousand folders: at most a tenth of a core, a longer pause.
            pause = max(GUARD_INTERVAL, 9 * (time.monotonic() - started))

    def check(self) -> list[Path]:
        """One look; returns the protected entries it found made (and moved out)."""
        with self._lock:
            made: list[Path] = []
            for folder, stamp in list(self._seen.items()):
                if folder in self._seen and self._mtime(folder) != stamp:
                    self._look(folder, made)
            made = [p for p in dict.fromkeys(made) if p not in self.allowed]
            if made:
                self.stop_kernel()
                moved = [self._move_out(path) for path in made]
                names = ", ".join(f"`{p.relative_to(self.vault).as_posix()}`" for p in made)
                self.tripped = (
                    f"[vault-runner: this note made {names} in the vault, which no note may create or change: "
                    "git and Obsidian run what they find there outside the sandbox. The kernel was stopped and "
                    f"{'it was' if len(made) == 1 else 'they were'} moved out of the vault to "
                    f"{', '.join(str(m) for m in moved)}; write such files outside the vault (e.g. in /tmp)]"
                )
            return made

    def _mtime(self, folder: str) -> int | None:
        try:
            info = os.lstat(folder)
        except OSError:
            info = None
        if info is None or not stat.S_ISDIR(info.st_mode):
            # Gone, or swapped for a symlink: never list through it; what is below goes too.
            below = folder + os.sep
            for known in [k for k in self._seen if k == folder or k.startswith(below)]:
                del self._seen[known]
            return None
        return info.st_mtime_ns

    def _look(self, folder: str, made: list[Path]) -> None:
        """List `folder` and the folders below it not seen yet; protected names go in `made`."""
        root = str(self.vault)
        stack = [folder]
        while stack:
            current = stack.pop()
            stamp = self._mtime(current)  # before listing: an entry made meanwhile shows next time
            if stamp is None:
                continue
            self._seen[current] = stamp
            for entry in _entries(Path(current)):
                if _protected_name(entry.name, current == root):
                    made.append(Path(entry.path))
                elif entry.path not in self._seen and _is_folder(entry):
                    stack.append(entry.path)

    def _move_out(self, path: Path) -> Path:
        target = self.quarantine / time.strftime("%Y%m%d-%H%M%S") / path.relative_to(self.vault)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, target)
        except OSError:
            try:
                shutil.move(str(path), str(target))  # another filesystem
            except OSError:
                shutil.rmtree(path, ignore_errors=True) if _isdir(path) else path.unlink(missing_ok=True)
        return target


def _isdir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def quarantine_dir() -> Path:
    """Where protected entries a kernel made are moved (the user's state folder, never a vault)."""
    import platformdirs

    return Path(platformdirs.user_state_dir("vault-runner")) / "quarantine"


ROOT_REFUSED = (
    "[vault-runner: the Landlock sandbox cannot let a note create files or folders directly in the "
    "vault root: Landlock grants whole folders, and a grant of the root would let a note plant an "
    "Obsidian plugin in .obsidian/ or a git hook in .git/. Move the note into a folder, create the "
    "folder it writes to yourself (it can then write inside it), or install bubblewrap "
    "(`apt install bubblewrap`), whose sandbox allows it]"
)

# An IPython startup file for the Landlock tier without its own mounts: a PermissionError
# on a path directly in the vault root gets ROOT_REFUSED under its traceback.
_HINT = """
def __vault_runner_root_hint(vault, hint):
    import os, sys
    def handler(shell, etype, value, tb, tb_offset=None):
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        name = getattr(value, "filename", None)
        if isinstance(name, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(name))
            if os.path.dirname(path) == vault and not os.path.exists(path):
                print(hint, file=sys.stderr)
    get_ipython().set_custom_exc((PermissionError,), handler)
__vault_runner_root_hint(%r, %r)
del __vault_runner_root_hint
"""


def write_root_hint(ipython_dir: Path, vault: Path) -> None:
    """Install the startup file above in a kernel's own IPYTHONDIR."""
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-vault-runner-root.py").write_text(_HINT % (str(vault), ROOT_REFUSED), encoding="utf-8")

"""The vault entries no kernel may write or create: what runs outside the sandbox reads them.

``.git`` (at any depth: git on the host reads ``sub/.git/config`` when the user runs it in
``sub/``, and ``core.fsmonitor`` there is a command), ``.obsidian`` (at any depth: any folder
can be opened as a vault, and its plugins are code) and ``vault-runner.toml`` at the root
(it opts notes in).

How each tier keeps them, whether or not they exist yet:

- those that exist when a kernel starts are read-only for it: bubblewrap binds them read-only,
  Landlock grants write only around them (or, with its own mounts, binds them read-only);
- the folders holding them are each bound onto themselves (`pinned_folders`), so that a
  note cannot rename ``proj`` (its read-only ``.git`` would go with it) and make a ``.git``
  of its own at ``proj/.git``, where git on the host looks;
- one that does not exist yet cannot be created in the Landlock tier without mounts where its
  parent is not granted (the vault root, a folder holding a protected entry); everywhere else
  no mount or Landlock rule can refuse a *name* in a folder the kernel may write, so every
  sandboxed kernel's calls that make a name go to its supervisor (name_supervisor.py, where
  `names_supervised`), which refuses these names (`names_spec`) as they are made;
- behind it, and alone where there is none (no seccomp user notification), the
  `ProtectedGuard` watches the vault while the kernel lives: a protected name that appears
  is moved out of the vault into vault-runner's quarantine folder at once (nothing is ever
  deleted: what cannot be moved stays, and the note says so loudly), then the kernel is
  stopped (one it makes again meanwhile is caught the same way), and the note says so. On Linux the guard hears of each name the
  moment it is made (inotify on every folder of the vault, a new folder watched, then listed,
  as it appears), so the kernel is stopped within the time a kill takes, not a polling
  interval; it also looks by the folders' ctime (which no note can set back, unlike their
  mtime), the only way where there is no inotify or its watch limit is reached, and after an
  event overflow. It knows the user's own entries by inode, and walks the whole vault once
  more when the kernel is gone.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import select
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vault_runner.disk.atomic import Folder
from vault_runner.errors import VaultError
from vault_runner.kernel.sandbox import seccomp
from vault_runner.kernel.sandbox.inotify import IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW, Inotify
from vault_runner.kernel.sandbox.processes import launcher_command, run_quiet, succeeded

__all__ = (
    "PROTECTED_ANYWHERE",
    "PROTECTED_AT_ROOT",
    "ProtectedGuard",
    "ROOT_REFUSED",
    "existing_protected",
    "is_protected",
    "names_spec",
    "names_supervised",
    "pinned_folders",
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


def names_spec(vault: Path) -> dict[str, object]:
    """What the supervisor of the names a kernel makes refuses in `vault` (launch.py `names`)."""
    return {"vault": str(vault), "anywhere": list(PROTECTED_ANYWHERE), "at_root": list(PROTECTED_AT_ROOT)}


_SUPERVISOR_CHECK = (
    "import os, sys\n"
    "try:\n    os.mkdir(os.path.join(sys.argv[1], 'sub', '.git'))\nexcept PermissionError:\n"
    "    open(os.path.join(sys.argv[1], 'sub', 'made'), 'w').close()\n"
)


@functools.cache
def names_supervised() -> bool:
    """Whether the launcher can start name_supervisor.py here: tried once, for real (a
    protected name refused, another file made, in a child process)."""
    if not seccomp.supported():
        return False
    with tempfile.TemporaryDirectory() as vault:
        os.mkdir(os.path.join(vault, "sub"))
        spec = {"harden": True, "names": names_spec(Path(vault))}
        command = [*launcher_command(), json.dumps(spec), "--", sys.executable, "-I", "-S", "-c", _SUPERVISOR_CHECK]
        ran = succeeded(run_quiet([*command, vault]))
        return ran and os.path.exists(os.path.join(vault, "sub", "made"))


def _protected_name(name: str, at_root: bool) -> bool:
    return name in PROTECTED_ANYWHERE or (at_root and name in PROTECTED_AT_ROOT)


# Every folder of vault-runner's own that a kernel may write outside the vault (its ipc and
# runtime folder, the Landlock tier's private temp folder) is in a temp folder named so.
RUNTIME_PREFIX = "vr-"


def links_into_runtime(path: str) -> bool:
    """Whether `path` is a symlink to a folder in vault-runner's runtime folders. A kernel can
    make a `.git` there (outside the vault, allowed) and link to it from the vault: git on
    the host follows the link, while the kernel lives, into a repository of the note's. (A
    link to a file there is no repository: a note may link its temp plot.)"""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    relative = os.path.relpath(target, os.path.realpath(tempfile.gettempdir()))
    inside = not relative.startswith(os.pardir) and relative.split(os.sep)[0].startswith(RUNTIME_PREFIX)
    return inside and os.path.isdir(target)


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


def existing_protected(vault: Path, links: bool = False) -> list[Path]:
    """Every protected entry in the vault now (symlinks included: their names count), found
    without following a symlink or descending into a protected folder; with `links`, also
    every symlink into vault-runner's runtime folders (`links_into_runtime`)."""
    found: list[Path] = []
    stack = [vault]
    while stack:
        folder = stack.pop()
        for entry in _entries(folder):
            path = Path(entry.path)
            if _protected_name(entry.name, folder == vault) or (links and links_into_runtime(entry.path)):
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


def pinned_folders(vault: Path, protected: Iterable[Path]) -> list[Path]:
    """The folders between the vault root and its protected entries, shallowest first: each
    is bind-mounted onto itself in the kernel's mounts, so that the note cannot rename it (a
    mount point cannot be renamed: EBUSY) and move the user's `.git` away from the path git
    looks at. What is inside stays writable; a rename across such a folder's edge fails
    with EXDEV."""
    out: set[Path] = set()
    for path in protected:
        out.update(p for p in path.parents if vault in p.parents)
    return sorted(out, key=lambda p: (len(p.parts), str(p)))


class ProtectedGuard:
    """Watches a vault for protected names a kernel makes (see the module docstring).

    The entry is moved to `quarantine`, then `stop_kernel` is called; `tripped` holds
    the note's message until read. A look lists only the folders whose inode change time
    (ctime) moved since the last one, so it costs one stat per folder of the vault: a note
    can set a folder's mtime back (os.utime), never its ctime. The user's own entries are
    known by inode, not by path: a note that renames a folder holding one and makes a fresh
    one at the old path has its fresh one taken out, never the user's.
    """

    def __init__(self, vault: Path, stop_kernel: Callable[[], None], quarantine: Path) -> None:
        self.vault = vault
        self.stop_kernel = stop_kernel
        self.quarantine = quarantine
        self.tripped: str | None = None
        # folder -> (inode, ctime) when last listed; strings, not Paths: a look at a vault of
        # thousands of folders must stay cheap.
        self._seen: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify = Inotify.open()
        self._watched: dict[int, str] = {}  # watch descriptor -> folder
        # Every symlink seen in the vault, looked at again at each look: where a relative
        # link leads changes with the entries it goes through, which are not its own folder.
        self._links: set[str] = set()
        found: list[Path] = []
        self._look(str(vault), found)
        self.allowed = frozenset(found)  # there before the kernel: the user's own
        self._own = {key: path for path in found if (key := _inode(path)) is not None}
        self.moved: dict[Path, Path] = {}  # the user's entries a note moved: where -> from

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vault-runner-protected-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, after a last look at the whole vault, whatever the folders' times
        say (the kernel is gone: nothing can appear later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.check(everywhere=True)
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def _run(self) -> None:
        pause = GUARD_INTERVAL
        due = time.monotonic() + pause
        while not self._stop.is_set():
            self._heard(max(0.0, due - time.monotonic()))
            if self._stop.is_set() or time.monotonic() < due:
                continue
            # The look by ctime, also with inotify: folders past the watch limit, and a
            # stream of events never starves it.
            started = time.monotonic()
            self.check()
            # A vault of many thousand folders: at most a tenth of a core, a longer pause.
            pause = max(GUARD_INTERVAL, 9 * (time.monotonic() - started))
            due = time.monotonic() + pause

    def _heard(self, timeout: float) -> bool:
        """Wait up to `timeout` for inotify events and act on them; whether there were any."""
        notify = self._inotify
        if notify is None:
            self._stop.wait(timeout)
            return False
        try:
            ready, _, _ = select.select([notify.fd], [], [], timeout)
        except (OSError, ValueError):  # closed by stop()
            return False
        events = notify.read() if ready else []
        if not events:
            return False
        with self._lock:
            found: list[Path] = []
            for wd, mask, name in events:
                folder = self._watched.get(wd)
                if mask & IN_Q_OVERFLOW:
                    # Events were lost: every folder is listed again, whatever its ctime.
                    self._seen = {k: (v[0], -1) for k, v in self._seen.items()}
                    for known in list(self._seen):
                        self._look(known, found)
                elif mask & IN_IGNORED:
                    self._watched.pop(wd, None)
                elif folder is not None and name:
                    path = os.path.join(folder, name)
                    if os.path.islink(path):
                        self._links.add(path)
                    if _protected_name(name, folder == str(self.vault)) or links_into_runtime(path):
                        found.append(Path(path))
                    elif mask & IN_ISDIR:
                        self._seen.pop(path, None)  # a path seen before may be a new folder now
                        self._look(path, found)
            self._judge(found)
        return True

    def check(self, everywhere: bool = False) -> list[Path]:
        """One look (`everywhere`: a walk of the whole vault); returns the protected entries
        it found made (and moved out)."""
        with self._lock:
            found: list[Path] = existing_protected(self.vault, links=True) if everywhere else []
            for folder, stamp in [] if everywhere else list(self._seen.items()):
                if folder in self._seen and (stamp[1] < 0 or self._stamp(folder) != stamp):
                    self._look(folder, found)
            for link in list(self._links):
                if not os.path.islink(link):
                    self._links.discard(link)
                elif links_into_runtime(link):
                    found.append(Path(link))
            return self._judge(found)

    def _judge(self, found: list[Path]) -> list[Path]:
        """Of the protected entries found, those the kernel made: stop it, move them out."""
        made: list[Path] = []
        moved_to: list[Path | None] = []
        for path in dict.fromkeys(found):
            key = _inode(path)
            own = self._own.get(key) if key is not None else path
            if not (own is None or (own != path and _inode(own) == key)):
                if own != path and path not in self.moved:
                    self.moved[path] = own
                continue
            # New, or a second name (a hard link) for the user's own. Its folder is opened
            # from the vault root without following a symlink, and it is moved through that
            # folder: a note that swapped a folder for a link out of the vault after the
            # entry was found never gets a folder outside the vault moved.
            try:
                folder = Folder(path.parent, self.vault)
            except VaultError:
                continue  # its folder is gone, or now a symlink: nothing of the vault is there
            except OSError:
                made.append(path)
                moved_to.append(None)
                continue
            with folder:
                made.append(path)
                # Out of the vault first (a rename: microseconds), then the kernel is stopped
                # (walking its processes takes milliseconds, in which git on the host could
                # read the entry). One it makes again meanwhile is heard, and moved, next.
                moved_to.append(self._move_out(folder, path))
        if made:
            self.stop_kernel()
            self.tripped = self._message(made, moved_to)
        return made

    def _message(self, made: list[Path], moved_to: list[Path | None]) -> str:
        def rel(path: Path) -> str:
            return f"`{path.relative_to(self.vault).as_posix()}`"

        named = [rel(p) for p in made if _protected_name(p.name, p.parent == self.vault)]
        linked = [rel(p) for p in made if not _protected_name(p.name, p.parent == self.vault)]
        what = []
        if named:
            what.append(
                f"made {', '.join(named)} in the vault, which no note may create or change: git and Obsidian run "
                "what they find there outside the sandbox"
            )
        if linked:
            what.append(
                f"linked {', '.join(linked)} in the vault to the sandbox's own folders outside it: git on your "
                "machine would follow the link into what the note put there"
            )
        out = [f"[vault-runner: this note {'; it also '.join(what)}. The kernel was stopped"]
        done = [str(m) for m in moved_to if m is not None]
        if done:
            out.append(f", and what it made was moved where nothing reads it: {', '.join(done)}")
        left = [rel(p) for p, m in zip(made, moved_to, strict=True) if m is None]
        if left:
            out.append(
                f". WARNING: {', '.join(left)} could not be moved out of the vault and is still there: delete it "
                "yourself before you run git or open Obsidian there"
            )
        if self.moved:
            out.append(
                ". It also moved your own "
                + ", ".join(f"{rel(old)} to {rel(new)}" for new, old in self.moved.items())
                + " (left there, untouched)"
            )
        advice = (
            "; write such files outside the vault (e.g. in /tmp)" if named else "; link to nothing outside the vault"
        )
        return "".join(out) + advice + "]"

    def _stamp(self, folder: str) -> tuple[int, int] | None:
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
        if time.time_ns() - info.st_ctime_ns < _UNTRUSTED_NS:
            # Changed within the clock's grain: a name made right after this listing could
            # leave the same ctime. A stamp that is listed again next time, whatever it says.
            return (info.st_ino, -1)
        return (info.st_ino, info.st_ctime_ns)

    def _look(self, folder: str, made: list[Path]) -> None:
        """List `folder` and the folders below it not seen yet; protected names go in `made`."""
        root = str(self.vault)
        stack = [folder]
        while stack:
            current = stack.pop()
            stamp = self._stamp(current)  # before listing: an entry made meanwhile shows next time
            if stamp is None:
                continue
            self._seen[current] = stamp
            if self._inotify is not None:
                # Watched before it is listed: a name made in between is heard or listed.
                wd = self._inotify.watch(current)
                if wd is not None:
                    self._watched[wd] = current
            for entry in _entries(Path(current)):
                if entry.is_symlink():
                    self._links.add(entry.path)
                if _protected_name(entry.name, current == root) or links_into_runtime(entry.path):
                    made.append(Path(entry.path))
                elif entry.path not in self._seen and _is_folder(entry):
                    stack.append(entry.path)

    def _move_out(self, folder: Folder, path: Path) -> Path | None:
        """Move a made entry of `folder` to the quarantine; None when it cannot be moved.
        Never deleted, never copied: whatever it is, it may hold something the user wants back."""
        try:
            into = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=_made(self.quarantine)))
            target = into / path.relative_to(self.vault)
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.check_inside()
            try:
                os.rename(path.name, target, src_dir_fd=folder.fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # The quarantine is on another filesystem: renamed where it is, to a name
                # that neither git nor Obsidian reads.
                target = path.with_name(f"{path.name}.quarantined-{into.name}")
                os.rename(path.name, target.name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except (OSError, VaultError):
            return None
        return target


# A ctime this close to now is not trusted to show the next change (timestamps have a grain).
_UNTRUSTED_NS = 1_000_000_000


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


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

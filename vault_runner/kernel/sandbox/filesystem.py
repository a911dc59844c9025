"""What of the filesystem a sandboxed kernel sees: hidden folders, Python's own paths,
the protected entries of a vault (protected.py says how they are kept), Landlock's read
grants, each kernel's own matplotlib folder."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = (
    "PROTECTED_IN_VAULT",
    "empty_home",
    "hidden_roots",
    "kernel_mpl_dir",
    "mpl_cache_dir",
    "python_paths",
    "readable_outside",
)

PROTECTED_IN_VAULT = (".obsidian", ".git", "vault-runner.toml")


def python_paths() -> list[Path]:
    """What the kernel's Python needs to read, wherever it lives (a pyenv under $HOME ...).

    Not every sys.path entry: the first one is the folder of whatever script started this
    process, which may be anywhere (a temp folder, a home folder) and must stay hidden.
    """
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.executable).resolve().parent}
    paths |= {Path(p) for p in site.getsitepackages()} if hasattr(site, "getsitepackages") else set()
    paths |= {Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    paths.add(Path(__file__).resolve().parents[3])  # the folder vault_runner/ is in
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user_site:
        paths.add(Path(user_site))
    existing = sorted({p.resolve() for p in paths if p.exists()}, key=lambda p: len(p.parts))
    return _outermost(existing)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    kept: list[Path] = []
    for path in sorted(set(paths), key=lambda p: (len(p.parts), str(p))):
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return kept


def hidden_roots() -> list[Path]:
    """Folders the kernel must not see: home folders and shared temp/runtime folders."""
    candidates = [Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/home"), Path("/root"), Path.home()]
    for name in ("HOME",):
        if os.environ.get(name):
            candidates.append(Path(os.environ[name]))
    real = [Path(os.path.realpath(c)) for c in candidates]
    return _outermost(p for p in real if p.is_dir() and p != Path("/"))


def mpl_cache_dir() -> Path:
    """Matplotlib's font list, built once by vault-runner itself (it is slow to build) and
    never handed to a kernel: each kernel gets a copy in its own folder (`kernel_mpl_dir`)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("vault-runner")) / "matplotlib-fonts"


def empty_home() -> Path:
    """The Landlock kernel's HOME: an empty folder it may read but not write, as bubblewrap's
    hidden home looks. Its real home is unreadable there, and git, pip ... stop on a config
    file they may not read (EACCES), where a missing one (ENOENT) is fine."""
    import platformdirs

    folder = Path(platformdirs.user_cache_dir("vault-runner")) / "empty-home"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def kernel_mpl_dir(runtime_dir: Path) -> Path:
    """A kernel's own MPLCONFIGDIR, in its runtime folder: what a note writes there (a
    matplotlibrc, a font cache) dies with the kernel and never reaches another note."""
    folder = runtime_dir / "matplotlib"
    folder.mkdir(exist_ok=True)
    shared = mpl_cache_dir()
    if not any(shared.glob("fontlist-*.json")):
        _build_font_list(shared)
    for font_list in shared.glob("fontlist-*.json"):
        shutil.copyfile(font_list, folder / font_list.name)
    return folder


def _build_font_list(shared: Path) -> None:
    # Outside any sandbox but running only matplotlib's own code, in a fresh folder that no
    # kernel can write (the homes are hidden from kernels): nothing a note planted is read.
    shared.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=shared) as scratch:
        env = {**os.environ, "MPLCONFIGDIR": scratch}
        command = [sys.executable, "-I", "-c", "import matplotlib.font_manager"]
        try:
            subprocess.run(command, env=env, capture_output=True, timeout=120, check=True, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return  # no matplotlib here: a kernel builds its own list if it imports it
        for font_list in Path(scratch).glob("fontlist-*.json"):
            os.replace(font_list, shared / font_list.name)


def readable_outside(hidden: list[Path]) -> list[Path]:
    """Landlock read grants: the whole tree but the hidden folders and block devices."""
    grants: list[Path] = []

    def walk(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            real = Path(os.path.realpath(entry))
            if real in hidden or entry in hidden:
                continue
            if any(real in h.parents or entry in h.parents for h in hidden):
                walk(entry)  # an ancestor of a hidden folder: grant its other entries
            elif entry == Path("/dev"):
                grants.extend(_readable_devices())
            else:
                grants.append(entry)

    walk(Path("/"))
    return grants


def _readable_devices() -> list[Path]:
    import stat

    out = []
    for entry in sorted(Path("/dev").iterdir()):
        if entry.is_symlink():
            continue  # /dev/stdout, /dev/fd ...: they point into /proc, which is readable
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if stat.S_ISBLK(mode):
            continue  # raw disks would bypass every file permission for root
        # Not /dev/shm nor /dev/pts: the host's hold other programs' shared memory and the
        # user's terminals (whose keystrokes a reader would take). The Landlock tier grants
        # them only when they are the kernel's own (mounts.py).
        if stat.S_ISDIR(mode) and entry.name not in {"nvidia-caps", "dri", "hugepages", "mqueue"}:
            continue
        out.append(entry)
    return out

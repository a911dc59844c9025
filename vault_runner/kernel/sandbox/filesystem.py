"""What of the filesystem a sandboxed kernel sees: hidden folders, Python's own paths,
the protected entries of a vault, Landlock's read grants, the shared matplotlib cache."""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ("PROTECTED_IN_VAULT", "hidden_roots", "mpl_cache_dir", "python_paths", "readable_outside")

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
    """A matplotlib config/cache folder shared by sandboxed kernels (its font list is slow to build)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("vault-runner")) / "matplotlib"


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
        if stat.S_ISDIR(mode) and entry.name not in {"pts", "shm", "nvidia-caps", "dri", "hugepages", "mqueue"}:
            continue
        out.append(entry)
    return out

"""A note leaves nothing on the host that runs with more rights than it had (seccomp.py's
hardening filter): no setuid or setgid file, no user namespace of its own in which it would
stand for the kernel's host user (root, when vault-runner runs as root) and set file
capabilities the host honours. In every contained tier, for a forked and a started kernel.

Real kernels, real bubblewrap and Landlock, the host's own view of the files afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine
from vault_runner.kernel.sandbox import launch as launch_script
from vault_runner.kernel.sandbox import seccomp

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not seccomp.supported(), reason="no seccomp filter for this machine's ABI"),
]

ATTEMPTS = """
import ctypes, os, shutil, subprocess, sys
shutil.copy(sys.executable, "py")
for mode in (0o4755, 0o2755):
    try:
        os.chmod("py", mode)
        print("set", oct(mode))
    except OSError as exc:
        print("refused", oct(mode), exc.errno)
try:
    os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o4755))
    print("made", oct(os.stat("made").st_mode & 0o7777))
except OSError as exc:
    print("refused open", exc.errno)
libc = ctypes.CDLL(None, use_errno=True)
print("own user namespace", libc.unshare(0x10000000), ctypes.get_errno())
print("unshare -Ur", subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True).returncode)
print("still works:", subprocess.run(["sh", "-c", "echo sh"], capture_output=True, text=True).stdout.strip())
import resource
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # its own: allowed
try:
    resource.prlimit(os.getppid(), resource.RLIMIT_FSIZE, (4096, 4096))
    print("lowered its parent's limit")
except OSError as exc:
    print("parent's limit refused", exc.errno)
"""


def test_a_note_can_make_no_setuid_file_nor_a_user_namespace(
    sandbox_tier: str, kernel_kind: str, tmp_path: Path
) -> None:
    if sandbox_tier == "plain":
        pytest.skip("the plain tier is uncontained by design (doctor and README say so)")
    root = make_note_vault(
        tmp_path / "vault", {"Notas/n.md": f"---\nvault-runner: true\n---\n# N\n\n```python\n{ATTEMPTS.strip()}\n```\n"}
    )
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    out = "".join(o.get("text", "") for o in report.blocks[0].outputs if o.get("name") == "stdout")
    assert report.kernel == kernel_kind, report
    assert "refused 0o4755 1" in out and "refused 0o2755 1" in out, out
    assert "refused open 1" in out, out
    assert "own user namespace -1 1" in out, out
    assert "unshare -Ur 0" not in out, out
    assert "still works: sh" in out, out
    assert "parent's limit refused 1" in out, out
    for name in ("py", "made"):
        path = root / "Notas" / name
        if path.exists():
            assert path.stat().st_mode & 0o6000 == 0, oct(path.stat().st_mode)


def test_the_launcher_hardens_what_it_starts(tmp_path: Path) -> None:
    script = (
        "import os\n"
        "open('f', 'w').close()\n"
        "os.chmod('f', 0o755)\n"
        "try:\n"
        "    os.chmod('f', 0o4755)\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", launch_script.__file__, json.dumps({"harden": True}), "--", sys.executable,
         "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused"]
    assert os.stat(tmp_path / "f").st_mode & 0o7777 == 0o755


def test_a_note_reaches_no_other_kernels_socket_by_its_path(
    sandbox_tier: str, kernel_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Another kernel's ipc sockets are in a runtime folder of the shared temp folder, and
    # /proc/net/unix names them: no Landlock rule refuses connecting to a unix socket by path.
    if sandbox_tier == "plain":
        pytest.skip("the plain tier is uncontained by design (doctor and README say so)")
    other = Path(tempfile.mkdtemp(prefix="vr-other-kernel-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(other / "k-1"))
        listener.listen()
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "try:\n"
            f"    s.connect({str(other / 'k-1')!r})\n"
            "    print('reached')\n"
            "except OSError as exc:\n"
            "    print('unreached', type(exc).__name__)\n"
        )
        root = make_note_vault(
            tmp_path_factory.mktemp("vault"), {"Notas/n.md": f"---\nvault-runner: true\n---\n```python\n{code}```\n"}
        )
        report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
        out = "".join(o.get("text", "") for o in report.blocks[0].outputs if o.get("name") == "stdout")
        assert report.kernel == kernel_kind, report
        assert "unreached" in out, out
    finally:
        listener.close()
        shutil.rmtree(other, ignore_errors=True)

"""Protected names are refused as they are made (issue 9.3, name_supervisor.py): no note
makes a ``.git`` or ``.obsidian`` anywhere in its vault, or ``vault-runner.toml`` at its
root, by any call (open, mkdir, rename, link, symlink, mknod, bind, a child process, a
thread racing to change the path), and everything an honest note makes still works. In
every contained tier, for a forked and a started kernel; the supervisor's own life through
the launcher.

Real kernels, real bubblewrap and Landlock, the host's own view of the vault afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine
from vault_runner.kernel.sandbox import launch as launch_script
from vault_runner.kernel.sandbox import name_supervisor, seccomp
from vault_runner.kernel.sandbox.protected import names_spec, names_supervised

pytestmark = pytest.mark.kernel

CHECKLIST = (Path(__file__).parent / "names_checklist.py").read_text()
GUARD_SAID = "which no note may create or change"  # the guard's words, when it had to act


def supervised() -> None:
    if not names_supervised():
        pytest.skip("no seccomp user notification here (doctor says so): the guard alone keeps the names")


def protected_in(root: Path) -> set[Path]:
    """Every entry in the vault whose name a case-insensitive filesystem would take for a protected one."""
    names = {".git", ".obsidian"}
    found = {p for p in root.rglob("*") if p.name.lower().rstrip(". ") in names}
    return found | ({root / "vault-runner.toml"} if (root / "vault-runner.toml").exists() else set())


def test_a_note_makes_no_protected_name_and_all_else_it_makes(
    sandbox_tier: str, kernel_kind: str, tmp_path: Path
) -> None:
    if sandbox_tier == "plain":
        pytest.skip("the plain tier is uncontained by design (doctor and README say so)")
    supervised()
    root = make_note_vault(
        tmp_path / "vault", {"Notas/n.md": f"---\nvault-runner: true\n---\n# N\n\n```python\n{CHECKLIST}\n```\n"}
    )
    before = protected_in(root)
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert report.kernel == kernel_kind, report
    outputs = report.blocks[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert not report.blocks[0].failed and text, outputs
    result = json.loads(text.strip().splitlines()[-1])
    assert {what: error for what, error in result["allowed"].items() if error} == {}
    wrong = {what: got for what, got in result["refused"].items() if got not in ("EPERM", "EACCES", "EXDEV")}
    assert wrong == {}, result["refused"]
    assert result["refused"]["rename a folder holding .git into the vault"] == "EXDEV"
    assert result["git init"] != 0
    assert result["race"][".git made"] == 0 and result["race"]["attempts"] > 100, result["race"]
    # The host's view: nothing made, so the guard never had to act.
    assert protected_in(root) == before
    assert GUARD_SAID not in json.dumps([o for b in report.blocks for o in b.outputs])


SIGNALLED = """
import os, signal, time
signal.signal(signal.SIGALRM, lambda *_: None)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)  # a handler at 10 kHz
made = 0
end = time.monotonic() + 1.5
try:
    while time.monotonic() < end:
        os.mkdir("k")
        os.rename("k", "k2")
        os.rmdir("k2")
        made += 1
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
print("made", made)
"""


def test_a_note_with_a_busy_signal_handler_never_sees_an_interrupted_mkdir(
    sandbox_tier: str, kernel_kind: str, tmp_path: Path
) -> None:
    # A signal that comes before the supervisor has taken a call interrupts it (EINTR); the
    # kernel's prelude retries it, as Python retries open() (PEP 475). Without: about one
    # mkdir in ten at this rate raised InterruptedError.
    if sandbox_tier == "plain":
        pytest.skip("the plain tier is uncontained by design: no supervisor")
    supervised()
    root = make_note_vault(
        tmp_path / "vault", {"n.md": f"---\nvault-runner: true\n---\n# N\n\n```python\n{SIGNALLED}\n```\n"}
    )
    report = Engine(load_vault(root)).run_note(root / "n.md")
    assert report.kernel == kernel_kind, report
    outputs = report.blocks[0].outputs
    assert not report.blocks[0].failed, outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert int(text.split()[-1]) > 100, text


LIFECYCLE = """
import ctypes, errno, json, os, signal, sys, time
vault = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ours = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
sup = [int(p) for p in ours if vault.encode() in cmdline(p) and b"launch.py" in cmdline(p)]
out = {"supervisors": len(sup)}
pid = sup[0]
try:
    open(f"/proc/{pid}/mem", "rb").read(1)
    out["mem"] = "read"
except OSError as exc:
    out["mem"] = errno.errorcode[exc.errno]
out["ptrace"] = errno.errorcode[ctypes.get_errno()] if libc.ptrace(16, pid, 0, 0) else "attached"
pidfd = os.pidfd_open(pid)
got = libc.syscall(438, pidfd, 3, 0)
out["pidfd_getfd"] = errno.errorcode[ctypes.get_errno()] if got < 0 else "got"
os.kill(pid, signal.SIGKILL)  # the note can stop its supervisor, never get past it
time.sleep(0.5)
try:
    os.mkdir(os.path.join(vault, "after"))
    out["mkdir after"] = "made"
except OSError as exc:
    out["mkdir after"] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def test_the_supervisor_is_out_of_the_kernels_reach_and_ends_with_it(tmp_path: Path) -> None:
    supervised()
    vault = tmp_path / "vault"
    vault.mkdir()
    spec = {"harden": True, "names": names_spec(vault), "drop_caps": os.geteuid() == 0}
    launcher = [sys.executable, "-I", "-S", launch_script.__file__, json.dumps(spec), "--"]
    # One that lives on: its supervisor serves it, and is gone once it is.
    done = subprocess.run([*launcher, sys.executable, "-c", LIFECYCLE, str(vault)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["supervisors"] == 1
    # Non-dumpable, no capabilities left to the kernel: neither its memory nor its listener.
    assert result["mem"] in ("EACCES", "EPERM") and result["ptrace"] == "EPERM", result
    assert result["pidfd_getfd"] == "EPERM", result
    assert result["mkdir after"] == "ENOSYS", result  # fail closed
    assert not (vault / "after").exists()
    waiter = subprocess.Popen([*launcher, sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not _supervisors_of(vault) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _supervisors_of(vault), "no supervisor was started"
        waiter.kill()
        waiter.wait()
        deadline = time.monotonic() + 10
        while _supervisors_of(vault) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _supervisors_of(vault), "the supervisor outlived its kernel"
    finally:
        waiter.kill()
        waiter.wait()


def _supervisors_of(vault: Path) -> list[int]:
    """Live processes whose command line names `vault` (the launcher's spec does) and are not zombies."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(vault).encode() in cmdline and b"launch.py" in cmdline and state != "Z":
            found.append(int(entry))
    return found


def test_the_names_are_protected_py_s_and_checked_without_case() -> None:
    spec = names_spec(Path("/v"))
    assert name_supervisor.refused(b".git", 1, spec) and name_supervisor.refused(b".Obsidian ", 1, spec)
    assert name_supervisor.refused(b"VAULT-RUNNER.TOML", 2, spec)
    assert not name_supervisor.refused(b"vault-runner.toml", 1, spec)  # below the root: a note's own file
    assert not name_supervisor.refused(b".git", 0, spec)  # outside the vault
    assert not name_supervisor.refused(b".github", 2, spec)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_name_filter_assembles_for_each_machine(machine: str) -> None:
    trapped = name_supervisor.trapped(machine)
    program = seccomp.names_program(trapped, machine)
    assert len(program) % 8 == 0 and len(program) // 8 > len(trapped)
    assert {nr: flags for nr, flags in trapped.items() if flags is not None} == (
        {2: 1, 257: 2} if machine == "x86_64" else {56: 2}
    )

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
import signal
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
from vault_runner.kernel.sandbox.launch import landlock_abi
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
    wrong = {what: got for what, got in result["refused"].items() if got not in ("EPERM", "EACCES", "EXDEV", "EBUSY")}
    assert wrong == {}, result["refused"]
    assert result["refused"]["rename a folder holding .git into the vault"] == "EXDEV"
    assert result["git init"] != 0
    assert result["race"][".git made"] == 0 and result["race"]["attempts"] > 100, result["race"]
    assert result["made, however briefly"] == []  # inotify heard no protected name made
    assert result["file moved in"] in ("moved", "EXDEV")  # EXDEV: the tier's temp folder is a mount
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


def test_the_checklist_through_the_launcher_alone(tmp_path: Path) -> None:
    # No sandbox tier around it: the supervisor's own answers, on one filesystem (a file
    # moves in from outside the vault; a folder gets EXDEV from the supervisor itself).
    supervised()
    vault = tmp_path / "vault"
    vault.mkdir()
    done = subprocess.run(
        [*launcher(vault), sys.executable, str(Path(__file__).parent / "names_checklist.py"), str(vault)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {what: error for what, error in result["allowed"].items() if error} == {}
    assert {what: got for what, got in result["refused"].items() if got not in ("EPERM", "EXDEV", "EBUSY")} == {}
    assert result["file moved in"] == "moved"
    assert result["race"][".git made"] == 0 and result["made, however briefly"] == []
    assert protected_in(vault) == set()


LIFECYCLE = """
import ctypes, errno, json, os, signal, sys, time
vault, report = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
supervisor = os.getppid()
out = {}
try:
    open(f"/proc/{supervisor}/mem", "rb").read(1)
    out["mem"] = "read"
except OSError as exc:
    out["mem"] = errno.errorcode[exc.errno]
out["ptrace"] = errno.errorcode[ctypes.get_errno()] if libc.ptrace(16, supervisor, 0, 0) else "attached"
got = libc.syscall(438, os.pidfd_open(supervisor), 3, 0)
out["pidfd_getfd"] = errno.errorcode[ctypes.get_errno()] if got < 0 else "got"
try:
    os.kill(supervisor, 0)  # SIGSTOP would stop it: the starter would see a live kernel
    out["signal"] = "sent"
except OSError as exc:
    out["signal"] = errno.errorcode[exc.errno]
handle = open(report, "w")  # made now, written by an orphan once the supervisor is gone
handle.write(json.dumps(out) + "\\n")
handle.flush()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)  # the starter reads to the end of the kernel's output
        while True:  # until the supervisor is gone (a zombie holds no listener)
            try:
                if open(f"/proc/{supervisor}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.1)
        try:
            os.mkdir(os.path.join(vault, "after"))
            handle.write("made\\n")
        except OSError as exc:
            handle.write(errno.errorcode[exc.errno] + "\\n")
        handle.close()
    os._exit(0)
time.sleep(30)
print("the kernel outlived its supervisor")
"""


def launcher(vault: Path) -> list[str]:
    spec = {"harden": True, "names": names_spec(vault), "drop_caps": os.geteuid() == 0}
    return [sys.executable, "-I", "-S", launch_script.__file__, json.dumps(spec), "--"]


def _lines(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path} has fewer than {count} lines")


def test_the_supervisor_is_out_of_the_kernels_reach_and_the_kernel_dies_with_it(tmp_path: Path) -> None:
    supervised()
    vault = tmp_path / "vault"
    vault.mkdir()
    report = tmp_path / "report"
    command = [*launcher(vault), sys.executable, "-c", LIFECYCLE, str(vault), str(report)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        result = json.loads(_lines(report, 1)[0])
        process.kill()  # the supervisor is the process its starter knows
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert "outlived" not in out  # the kernel died with it (PR_SET_PDEATHSIG)
    # Non-dumpable, no capabilities left to the kernel: neither its memory nor its listener.
    assert result["mem"] in ("EACCES", "EPERM") and result["ptrace"] == "EPERM", result
    assert result["pidfd_getfd"] == "EPERM", result
    if landlock_abi() >= 6:  # the kernel's own Landlock domain scopes its signals
        assert result["signal"] == "EPERM", result
    assert _lines(report, 2)[1] == "ENOSYS"  # a process the note left behind: its calls fail closed
    assert not (vault / "after").exists()


def test_the_supervisor_keeps_the_kernels_pid_for_its_starter(tmp_path: Path) -> None:
    # Whoever started the kernel (jupyter_client, a fork template) knows the supervisor's
    # pid: it exits as the kernel does, and passes on the signals it gets.
    supervised()
    vault = tmp_path / "vault"
    vault.mkdir()
    assert subprocess.run([*launcher(vault), sys.executable, "-c", "raise SystemExit(7)"]).returncode == 7
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert subprocess.run([*launcher(vault), sys.executable, "-c", killed]).returncode == -signal.SIGTERM
    waits = "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    raise SystemExit(3)"
    process = subprocess.Popen([*launcher(vault), sys.executable, "-c", waits], stdout=subprocess.PIPE)
    try:
        time.sleep(1.5)  # the kernel waits in its sleep
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 3
    finally:
        process.kill()
        process.wait()


def test_the_names_are_protected_py_s_and_checked_without_case() -> None:
    spec = names_spec(Path("/v"))
    assert name_supervisor.refused(b".git", 1, spec) and name_supervisor.refused(b".Obsidian ", 1, spec)
    assert name_supervisor.refused(b"VAULT-RUNNER.TOML", 2, spec)
    assert not name_supervisor.refused(b"vault-runner.toml", 1, spec)  # below the root: a note's own file
    assert not name_supervisor.refused(b".git", 0, spec)  # outside the vault
    assert not name_supervisor.refused(b".github", 2, spec)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_name_filter_assembles_for_each_machine(machine: str) -> None:
    calls = seccomp.name_calls(machine)
    program = seccomp.names_program(machine)
    assert len(program) % 8 == 0 and len(program) // 8 > len(calls)
    assert {name for name, _, _ in calls.values()} >= {"openat", "mkdirat", "renameat2", "linkat", "symlinkat", "bind"}

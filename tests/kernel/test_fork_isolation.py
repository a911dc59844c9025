"""Kernels forked from one template cannot reach each other, the template, or a later note.

The attacks of the review (F3, F4), as notes run one after the other in kernels of one
ForkFactory, in every sandbox tier this machine has (the plain tier contains nothing):
note A tries to write the template's and a spare's memory, ptrace and signal them, read
another kernel's key and sign requests to a spare, plant files in temp and cache folders
and the IPython startup folders; note B, forked after it (a spare, or on demand once A
killed them), must show nothing of A. Real template, real bubblewrap/Landlock, no mocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import available_tiers
from tests.kernel.forked_notes import ForkedNotes, forked_notes
from vault_runner.kernel.fork.common import fork_disabled_reason
from vault_runner.kernel.fork.forked import ForkedKernelManager
from vault_runner.kernel.fork.session import ForkedSession
from vault_runner.kernel.sandbox.launch import CAP_SYS_ADMIN, landlock_abi
from vault_runner.kernel.sandbox.probe import probe

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        fork_disabled_reason() is not None, reason=f"kernels are not forked here: {fork_disabled_reason()}"
    ),
]

SANDBOXED = [tier for tier in available_tiers() if tier != "plain"]


class Notes(ForkedNotes):
    """Notes of one vault, each run in its own kernel from one factory (2 spares)."""

    def __init__(self, root: Path, tier: str) -> None:
        super().__init__(root, tier, spares=2)

    def spares_ready(self, session: ForkedSession, count: int) -> None:
        assert isinstance(session.manager, ForkedKernelManager)
        template = session.manager.template
        deadline = time.monotonic() + 120
        while template.spares_ready() < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert template.spares_ready() >= count, "the template made no spares"


@pytest.fixture(scope="module", params=SANDBOXED)
def notes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Notes]:
    yield from forked_notes(Notes, request, tmp_path_factory)  # type: ignore[misc]


# Note A's attack on the template (its parent, or its supervisor's: name_supervisor.py) and
# on the spares (the template's other descendants: each kernel and its supervisor).
ATTACK = r"""
import ctypes, json, os, signal, sys
def status(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
me, mine = os.getpid(), [os.getpid(), os.getppid()]
template = os.getppid()
while status(template, "Seccomp_filters") and template > 1:  # the template has no filter of its own
    template = status(template, "PPid")
    mine.append(template)
parents = {}
for pid in os.listdir("/proc"):
    try:
        parents[int(pid)] = status(pid, "PPid")
    except (OSError, ValueError):
        continue
def below(pid):
    while pid in parents and pid > 1:
        pid = parents[pid]
        if pid == template:
            return True
    return False
siblings = [pid for pid in parents if pid not in mine and below(pid)]
libc = ctypes.CDLL(None, use_errno=True)
def mem(pid):
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0):
            return "opened"
    except OSError as exc:
        return type(exc).__name__
def trace(pid):
    if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        return "attached"
    return os.strerror(ctypes.get_errno())
def signal_(pid):
    try:
        os.kill(pid, 0)
        return "signalled"
    except OSError as exc:
        return type(exc).__name__
targets = [template, *siblings]
result = {"siblings": len(siblings), "mem": [mem(p) for p in targets], "ptrace": [trace(p) for p in targets],
          "signal": [signal_(p) for p in targets]}
# As in the review: patch sys.copyright wherever the template's memory can be written,
# then kill the spares so that the next note is forked from the patched template.
patched = 0
try:
    with open(f"/proc/{template}/mem", "r+b", buffering=0) as m:
        for line in open(f"/proc/{template}/maps"):
            f = line.split()
            if f[1] != "rw-p":
                continue
            a, b = (int(x, 16) for x in f[0].split("-"))
            try:
                m.seek(a); data = m.read(b - a)
            except OSError:
                continue
            i = data.find(sys.copyright.encode())
            if i != -1:
                m.seek(a + i); m.write(b"PWNEDBY-A"); patched += 1
except OSError:
    pass
for pid in siblings:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
result["patched"] = patched
print(json.dumps(result))
"""


def test_a_kernel_cannot_touch_the_template_or_its_siblings(notes: Notes) -> None:
    """F3: no /proc/PID/mem, no ptrace, no signal to the template or a spare; the next
    note runs in an unpatched kernel."""
    a = notes.session()
    try:
        notes.spares_ready(a, 1)
        seen = notes.run(a, ATTACK)
    finally:
        a.shutdown()
    assert seen["siblings"] >= 1, seen  # there was a spare to attack
    assert all(r != "opened" for r in seen["mem"]), seen
    assert all(r != "attached" for r in seen["ptrace"]), seen
    assert seen["patched"] == 0, seen
    if landlock_abi() >= 6:  # signals are scoped from ABI 6 on
        assert all(r == "PermissionError" for r in seen["signal"]), seen
    b = notes.session()
    try:
        assert notes.run(b, "import json, sys; print(json.dumps(sys.copyright[:9]))") != "PWNEDBY-A"
        assert notes.run(b, "import json, sys; print(json.dumps(sys.copyright.startswith('Copyright')))") is True
    finally:
        b.shutdown()


CAPABILITIES = r"""
import json, os
def status(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
template = os.getppid()
while int(status(template, "Seccomp_filters")) and template > 1:
    template = int(status(template, "PPid"))
print(json.dumps({"template": int(status(template, "CapEff"), 16), "mine": int(status(os.getpid(), "CapEff"), 16)}))
"""


def test_a_landlock_template_keeps_only_the_capability_its_forks_mount_with(notes: Notes) -> None:
    # It runs outside Landlock, in a user namespace of its own, so that each fork can make
    # its own mounts before it applies the ruleset: CAP_SYS_ADMIN there, nothing else.
    if notes.tier != "landlock" or not probe().landlock_mounts:
        pytest.skip("only the Landlock tier with its own mounts has such a template")
    a = notes.session()
    try:
        seen = notes.run(a, CAPABILITIES)
    finally:
        a.shutdown()
    assert seen == {"template": 1 << CAP_SYS_ADMIN, "mine": 0}, seen


# Note A looks for the other kernels' keys in every file it can read under the runtime
# folders and /tmp, and signs execute requests (with the only key it has, its own) to every
# kernel socket it can find, to prepare the kernel of a later note.
PREPARE = r"""
import glob, json, os, time
import zmq
from jupyter_client.session import Session
keys = KEYS
found, sockets = [], set()
roots = {os.path.dirname(os.environ["JUPYTER_RUNTIME_DIR"]), "/tmp"}
for root in roots:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                data = open(path, "rb").read(1 << 20)
            except OSError:
                continue
            found += [path for key in keys if key.encode() in data]
for line in open("/proc/net/unix").read().splitlines()[1:]:
    parts = line.split()
    if len(parts) >= 8 and parts[7].endswith("-1"):  # ipc shell sockets: <ip>-<port>
        sockets.add(parts[7])
mine = get_ipython().kernel.session.key
session = Session(key=mine)
ctx = zmq.Context.instance()
sent = 0
for path in sockets:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect("ipc://" + path)
    session.send(s, "execute_request", {"code": "import builtins; builtins.PLANTED_BY_A = 1", "silent": True,
        "store_history": False, "user_expressions": {}, "allow_stdin": False})
    sent += 1
    s.close()
time.sleep(1.0)
print(json.dumps({"found": found, "sent": sent}))
"""


def test_a_kernel_cannot_read_another_kernels_key_or_prepare_a_later_note(notes: Notes) -> None:
    """F4: no key of another kernel is anywhere a kernel can read; a request signed with
    any other key is ignored, so the spare a later note takes is as the template made it."""
    a = notes.session()
    try:
        notes.spares_ready(a, 2)
        assert isinstance(a.manager, ForkedKernelManager)
        others = [k for k in a.manager.template.kernels() if k is not a.manager.forked]
        keys = [k.connection_info["key"] for k in others]
        assert len(keys) >= 2 and all(keys)
        seen = notes.run(a, PREPARE.replace("KEYS", json.dumps(keys)))
    finally:
        a.shutdown()
    assert seen["found"] == [], seen
    assert seen["sent"] >= 2, seen  # it did reach the spares' sockets
    for _ in range(2):  # both spares A tried to prepare
        b = notes.session()
        try:
            assert notes.run(b, "import builtins, json; print(json.dumps(hasattr(builtins, 'PLANTED_BY_A')))") is False
        finally:
            b.shutdown()


def test_each_kernel_has_its_own_temp_folder_the_others_cannot_write(notes: Notes) -> None:
    """F4 (shared /tmp): what one kernel writes to its temp, cache or IPython folders is not
    in the next kernel's, and no kernel can write another's (nor the template's profile,
    whose startup folder every later kernel would run)."""
    plant = r"""
import json, os, tempfile
tmp = tempfile.gettempdir()
open(os.path.join(tmp, "from_a.txt"), "w").write("A was here")
os.makedirs(os.environ["XDG_CACHE_HOME"], exist_ok=True)
open(os.path.join(os.environ["XDG_CACHE_HOME"], "from_a"), "w").write("x")
def can_write(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "50-from-a.py"), "w").write("import builtins; builtins.PLANTED_BY_A = 1\n")
        return True
    except OSError:
        return False
startup = get_ipython().profile_dir.startup_dir
print(json.dumps({"tmp": tmp, "startup": can_write(startup), "tmp_root": can_write("/tmp/vr-from-a")}))
"""
    a = notes.session()
    try:
        seen_a = notes.run(a, plant)
        b = notes.session()
        try:
            check = f"""
import builtins, json, os, tempfile
a_tmp = {seen_a["tmp"]!r}
try:
    open(os.path.join(a_tmp, "from_b.txt"), "w").write("B")
    wrote = True
except OSError:
    wrote = False
print(json.dumps({{"tmp": tempfile.gettempdir(), "sees": os.listdir(tempfile.gettempdir()),
    "cache": os.path.exists(os.path.join(os.environ["XDG_CACHE_HOME"], "from_a")),
    "wrote_a": wrote, "planted": hasattr(builtins, "PLANTED_BY_A")}}))
"""
            seen_b = notes.run(b, check)
        finally:
            b.shutdown()
        back = notes.run(a, "import json, os, tempfile; print(json.dumps(os.listdir(tempfile.gettempdir())))")
    finally:
        a.shutdown()
    assert seen_b["tmp"] != seen_a["tmp"]
    assert "from_a.txt" not in seen_b["sees"] and not seen_b["cache"], seen_b
    assert not seen_b["wrote_a"] and "from_b.txt" not in back, (seen_b, back)
    assert not seen_a["startup"] and not seen_a["tmp_root"], seen_a
    assert not seen_b["planted"]


def test_an_isolated_kernel_still_does_what_notes_do(notes: Notes, tmp_path: Path) -> None:
    """The nested domain takes away only what reaches other kernels: shell commands, plots,
    torch, threads and processes, renames across folders, writes in the vault all work."""
    code = r"""
import json, os, subprocess, tempfile, multiprocessing
out = get_ipython().getoutput("echo shell-ok")
import matplotlib.pyplot as plt
plt.plot([1, 2]); plt.savefig("plot.png")
import torch
t = float(torch.ones(3).sum())
for root in (tempfile.gettempdir(), "."):  # a rename across folders (not mounts)
    os.makedirs(os.path.join(root, "one"), exist_ok=True); os.makedirs(os.path.join(root, "two"), exist_ok=True)
    open(os.path.join(root, "one", "f"), "w").write("x")
    os.replace(os.path.join(root, "one", "f"), os.path.join(root, "two", "moved.txt"))
with multiprocessing.get_context("fork").Pool(2) as pool:
    squares = pool.map(abs, [-1, -2])
print(json.dumps({"shell": out[0], "torch": t, "plot": os.path.getsize("plot.png") > 0,
    "moved": open(os.path.join("two", "moved.txt")).read(), "pool": squares,
    "sub": subprocess.run(["true"]).returncode}))
"""
    session = notes.session()
    try:
        seen = notes.run(session, code)
    finally:
        session.shutdown()
    assert seen == {"shell": "shell-ok", "torch": 3.0, "plot": True, "moved": "x", "pool": [1, 2], "sub": 0}, seen

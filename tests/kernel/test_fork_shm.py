"""Each forked kernel has a /dev/shm and an IPC namespace of its own.

Forks of one template shared its /dev/shm (bubblewrap's private one, or the Landlock
tier's own mount), its ptys and its IPC namespace (bubblewrap's --unshare-ipc): a note could
leave a file, a POSIX shared memory object or a SysV segment there, or hold a pty, that a
sibling running beside it, or a later note, reads. (POSIX message queues are refused to a
forked kernel by its Landlock domain already.) Nothing a note writes may reach another note's
run except through the vault. These tests run notes in kernels of one ForkFactory, in every
sandbox tier this machine has, with a real template and no mocks; and check that shared
memory as notes use it (torch, multiprocessing, DataLoader workers) still works.

In the Landlock tier with a mount namespace the template runs outside Landlock (which refuses
every mount) and each fork applies the tier's ruleset after making its own. Where a forked
kernel cannot get its own (Landlock without a mount namespace; bubblewrap without user
namespaces), the template says so in its facts, and the isolation tests are expected failures
there (strict: they fail the day it is done, to be updated).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import available_tiers
from tests.kernel.forked_notes import ForkedNotes, forked_notes
from vault_runner.engine.machine import kernel_start
from vault_runner.kernel.fork.common import fork_disabled_reason, shared_shm_reason
from vault_runner.kernel.fork.forked import ForkedKernelManager
from vault_runner.kernel.fork.session import ForkedSession, finish_shutdowns
from vault_runner.kernel.sandbox.probe import probe

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        fork_disabled_reason() is not None, reason=f"kernels are not forked here: {fork_disabled_reason()}"
    ),
]

PLAIN_SKIP = (
    "the plain tier contains nothing: a note there reads and writes all the user can (the host's "
    "/dev/shm, the home folder), so a /dev/shm of its own would keep nothing apart"
)
LANDLOCK_GAP = (
    "Landlock tier without a mount namespace (no user namespaces, not root): there is no /dev/shm "
    "or IPC namespace of a kernel's own to make, and the template's kernels share the host's"
)


def _gap(tier: str) -> str | None:
    """Why forked kernels of this tier share the template's /dev/shm here (None: they do not)."""
    if tier == "landlock" and not probe().landlock_mounts:
        return LANDLOCK_GAP
    if tier == "bubblewrap" and not probe().bwrap_userns:
        return "bubblewrap cannot make user namespaces here"
    return None


def _tier_params(isolation: bool) -> list:
    out = []
    for tier in available_tiers():
        marks = []
        if tier == "plain" and isolation:
            marks.append(pytest.mark.skip(reason=PLAIN_SKIP))
        elif isolation and _gap(tier) is not None:
            # Strict: it fails the day the gap is closed, to be turned into a plain test.
            marks.append(pytest.mark.xfail(strict=True, reason=_gap(tier)))
        out.append(pytest.param(tier, marks=marks, id=tier))
    return out


def _notes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedNotes]:
    # Notes of one vault, each run in its own kernel forked from one template.
    yield from forked_notes(ForkedNotes, request, tmp_path_factory)


@pytest.fixture(scope="module", params=_tier_params(isolation=True))
def notes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedNotes]:
    yield from _notes(request, tmp_path_factory)


@pytest.fixture(scope="module", params=_tier_params(isolation=False))
def any_notes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedNotes]:
    yield from _notes(request, tmp_path_factory)


def _forked_pid(session: ForkedSession) -> int:
    assert isinstance(session.manager, ForkedKernelManager) and session.manager.forked is not None
    return session.manager.forked.pid


# Note A leaves something in every shared place a note can name: a file in /dev/shm, a
# POSIX shared memory object, a SysV segment, a POSIX message queue, and a pty it holds.
LEAVE = r"""
import ctypes, json, os, _posixshmem
open("/dev/shm/vr_file_from_a", "w").write("A was here")
fd = _posixshmem.shm_open("/vr_shm_from_a", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 4096); os.close(fd)
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.restype = ctypes.c_int
sysv = libc.shmget(0x56520001, 4096, 0o1000 | 0o600)  # IPC_CREAT
mq = libc.mq_open(b"/vr_mq_from_a", os.O_CREAT | os.O_RDWR, 0o600, None)
PTY_OF_A = os.openpty()  # kept open, as a running `!cmd` keeps its pty
print(json.dumps({"sysv": sysv, "mq": mq, "listed": sorted(os.listdir("/dev/shm"))}))
"""

# Note B looks for each of them.
LOOK = r"""
import ctypes, json, os, _posixshmem
def posix():
    try:
        os.close(_posixshmem.shm_open("/vr_shm_from_a", os.O_RDWR, 0))
        return True
    except OSError:
        return False
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.restype = ctypes.c_int
mq = libc.mq_open(b"/vr_mq_from_a", os.O_RDWR, 0, None)
if mq >= 0:
    os.close(mq)
print(json.dumps({"file": os.path.exists("/dev/shm/vr_file_from_a"), "posix": posix(),
    "sysv": libc.shmget(0x56520001, 0, 0) >= 0, "mq": mq >= 0, "listed": sorted(os.listdir("/dev/shm")),
    "pts": any(name.isdigit() for name in os.listdir("/dev/pts"))}))
"""

# What A made in an IPC namespace it may share with the host (the Landlock tier's): removed.
CLEAN = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
seg = libc.shmget(0x56520001, 0, 0)
if seg >= 0:
    libc.shmctl(seg, 0, None)  # IPC_RMID
libc.mq_unlink(b"/vr_mq_from_a")
for name in ("vr_file_from_a", "vr_shm_from_a"):
    try:
        os.unlink("/dev/shm/" + name)
    except OSError:
        pass
print(json.dumps({}))
"""

NOTHING = {"file": False, "posix": False, "sysv": False, "mq": False, "pts": False}


def _seen(look: dict) -> dict:
    return {k: look[k] for k in NOTHING}


def test_a_sibling_running_beside_a_note_sees_nothing_it_left_in_shared_memory(notes: ForkedNotes) -> None:
    """Note A and note B run at the same time (render -j 2): nothing A put in /dev/shm or
    its IPC namespace is there for B; A still sees its own."""
    a = notes.session()
    try:
        left = notes.run(a, LEAVE)
        assert left["sysv"] >= 0, left  # A could make it
        assert {"vr_file_from_a", "vr_shm_from_a"} <= set(left["listed"]), left
        b = notes.session()
        try:
            seen_b = notes.run(b, LOOK)
        finally:
            b.shutdown()
        seen_a = notes.run(a, LOOK)
        notes.run(a, CLEAN)
    finally:
        a.shutdown()
    # A message queue is refused by the kernel's Landlock domain already (it is a file of
    # mqueue's internal mount, which no rule grants): where it could be made, B must not see it.
    assert _seen(seen_a) == {**{k: True for k in NOTHING}, "mq": left["mq"] >= 0}, seen_a
    assert _seen(seen_b) == NOTHING, seen_b


REACH = r"""
import json, os, socket
own = os.environ["JUPYTER_RUNTIME_DIR"]
runtime = os.path.dirname(own)
rows = [line.split() for line in open("/proc/net/unix").read().splitlines()[1:]]
others = sorted({r[-1] for r in rows if len(r) >= 8 and r[-1].startswith(runtime + "/") and not r[-1].startswith(own + "/")})
reached = []
for path in others:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        reached.append(path)
    except OSError:
        pass
    finally:
        s.close()
print(json.dumps({"others": len(others), "reached": reached}))
"""


def test_a_note_cannot_reach_a_siblings_kernel_sockets(notes: ForkedNotes) -> None:
    """Every kernel's ipc sockets are in the template's runtime folder, and /proc/net/unix
    names them: a note connected to a sibling's (its output channel has no signature to
    check) and read what the sibling ran and printed. Each kernel sees only its own folder."""
    a = notes.session()
    try:
        b = notes.session()  # a sibling running beside it (and the spare the filler makes)
        try:
            found = notes.run(a, REACH)
        finally:
            b.shutdown()
    finally:
        a.shutdown()
    assert found["others"] >= 5, found  # b's five sockets at least
    assert found["reached"] == [], found


def test_a_later_note_sees_nothing_an_earlier_one_left_in_shared_memory(notes: ForkedNotes) -> None:
    """What note A left behind when it ended is not there for the next note (it went with A's kernel)."""
    a = notes.session()
    try:
        notes.run(a, LEAVE)
    finally:
        a.shutdown()
    finish_shutdowns()  # A's kernel has ended
    b = notes.session()
    try:
        seen = notes.run(b, LOOK)
        notes.run(b, CLEAN)  # where it was shared after all
    finally:
        b.shutdown()
    assert _seen(seen) == NOTHING, seen


def test_the_template_says_whether_its_kernels_get_a_shm_of_their_own(any_notes: ForkedNotes) -> None:
    """Honest facts: private in the bubblewrap tier where user namespaces nest, else a reason."""
    session = any_notes.session()
    try:
        assert isinstance(session.manager, ForkedKernelManager)
        facts = session.manager.template.info
        described = any_notes.factory.describe()["templates"]
    finally:
        session.shutdown()
    private = facts.get("private_shm")
    if any_notes.tier == "plain":
        assert private is None, facts  # nothing is isolated there: nothing is claimed
        return
    if _gap(any_notes.tier) is None:
        assert private is True, facts
    else:
        assert isinstance(private, str) and "cannot make its own /dev/shm" in private, facts
    # `doctor` forecasts it from the same rules, without a template.
    forecast = shared_shm_reason(any_notes.tier, probe().bwrap_userns, probe().landlock_mounts)
    assert (forecast is None) == (private is True), forecast
    if probe().tier == any_notes.tier:  # what `doctor` says of the tier notes get here
        assert ("each with its own /dev/shm" in kernel_start()) == (private is True), kernel_start()
    assert [t["private_shm"] for t in described] == [private], described


def test_each_kernel_has_its_own_mount_and_ipc_namespace_and_its_shm_is_counted_as_its_own(notes: ForkedNotes) -> None:
    """The watchdog counts the tmpfs memory of each kernel (Sandbox._tmpfs_used): a note's
    /dev/shm files count for it, and for no sibling."""
    a = notes.session()
    try:
        b = notes.session()
        try:
            pids = _forked_pid(a), _forked_pid(b)
            for kind in ("mnt", "ipc"):
                assert os.readlink(f"/proc/{pids[0]}/ns/{kind}") != os.readlink(f"/proc/{pids[1]}/ns/{kind}"), kind
            notes.run(a, 'import json; open("/dev/shm/big", "wb").write(b"x" * (16 << 20)); print(json.dumps({}))')
            assert a.sandbox is not None and b.sandbox is not None
            used_a = a.sandbox._tmpfs_used(a.sandbox.pids())
            used_b = b.sandbox._tmpfs_used(b.sandbox.pids())
        finally:
            b.shutdown()
    finally:
        a.shutdown()
    assert used_a >= 16 << 20, used_a
    assert used_b < 16 << 20, used_b


# Shared memory as notes use it: torch tensors moved to shared memory and handed to another
# process, multiprocessing's named shared memory and locks (sem_open), DataLoader workers.
SHARED = r"""
import json, os, ctypes
import torch, torch.multiprocessing as tmp
from multiprocessing import shared_memory
t = torch.ones(3).share_memory_()
ctx = tmp.get_context("fork")
q, done = ctx.Queue(), ctx.Event()
def child(q, done):
    q.put(torch.full((4,), 7.0))
    done.wait(60)  # the tensor's fd is handed over by this process: it lives until then
p = ctx.Process(target=child, args=(q, done)); p.start()
got = q.get(timeout=60).clone(); done.set(); p.join(60)
shm = shared_memory.SharedMemory(create=True, size=64)
shm.buf[:2] = b"ok"; other = shared_memory.SharedMemory(name=shm.name); same = bytes(other.buf[:2]).decode()
other.close(); shm.close(); shm.unlink()
lock = ctx.Lock()
with lock:
    pass
from torch.utils.data import DataLoader, TensorDataset
loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=2, multiprocessing_context="fork")
total = float(sum(batch[0].sum() for batch in loader))
get_ipython().system("exit 3")  # `!cmd` runs on a pty (pexpect)
libc = ctypes.CDLL(None)
print(json.dumps({"shared": t.is_shared(), "queue": got.tolist(), "shm": same, "loader": total,
    "shell": get_ipython().user_ns["_exit_code"],
    "pdeathsig": (lambda v: (libc.prctl(2, ctypes.byref(v)), v.value)[1])(ctypes.c_int())}))
"""


def test_torch_and_multiprocessing_shared_memory_still_work(any_notes: ForkedNotes) -> None:
    session = any_notes.session()
    try:
        seen = any_notes.run(session, SHARED)
    finally:
        session.shutdown()
    assert seen == {"shared": True, "queue": [7.0] * 4, "shm": "ok", "loader": 28.0, "shell": 3, "pdeathsig": 9}, seen


def test_a_kernel_of_its_own_namespaces_is_still_interrupted_and_killed(any_notes: ForkedNotes) -> None:
    """The parent signals it (SIGINT for a timeout, SIGKILL at shutdown) across its user namespace."""
    session = any_notes.session()
    try:
        started = time.monotonic()
        done = session.execute("import time; time.sleep(60)", timeout=1.0)
        assert done.status != "ok" and time.monotonic() - started < 30, done
        assert any_notes.run(session, "import json; print(json.dumps({'alive': True}))") == {"alive": True}
        pid = _forked_pid(session)
        assert isinstance(session.manager, ForkedKernelManager) and session.manager.forked is not None
        session.manager.forked.kill()
        assert session.manager.forked.wait(10) is not None
        assert not Path(f"/proc/{pid}/status").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        session.shutdown()

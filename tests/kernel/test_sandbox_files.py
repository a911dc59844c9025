"""What a kernel can do to files, in every sandbox tier the machine has (issue 9.3, 9.5, 9.6,
10.13, 10.14): protected vault entries, /dev/shm, per-kernel caches, `!cmd`, writing next to
a root-level note. Real kernels in real bubblewrap and Landlock; plain is uncontained, so the
tests that are about containment skip it, saying so.

The Landlock tier without its own mounts (what a user without root or user namespaces gets)
is tried too, on a Sandbox whose probe says mounts do not work.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine
from vault_runner.kernel import sandbox as sandbox_module
from vault_runner.kernel.factory import close_default_kernels
from vault_runner.kernel.sandbox import Policy, Sandbox
from vault_runner.kernel.sandbox.inotify import Inotify
from vault_runner.kernel.sandbox.probe import probe
from vault_runner.kernel.sandbox.protected import (
    ROOT_REFUSED,
    ProtectedGuard,
    existing_protected,
    names_supervised,
    write_grants,
)
from vault_runner.kernel.session import KernelSession

pytestmark = pytest.mark.kernel

PROTECTED_ATTEMPTS = (
    "vault-runner.toml",
    ".obsidian/plugins/x/main.js",
    ".git/config",
    "sub/.git/config",
    "sub/deeper/.git/hooks/pre-commit",
)


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The quarantine lives in the user's state folder: a test's own."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


def note(*blocks: str) -> str:
    body = "".join(f"```python\n{code}\n```\n\n" for code in blocks)
    return f"---\nvault-runner: true\n---\n# Nota\n\n{body}"


def stdout_of(report, index: int = 0) -> str:  # type: ignore[no-untyped-def]
    return "".join(o.get("text", "") for o in report.blocks[index].outputs if o.get("name") == "stdout")


def all_text(report) -> str:  # type: ignore[no-untyped-def]
    parts = []
    for block in report.blocks:
        for output in block.outputs:
            parts += [str(output.get("text", "")), str(output.get("evalue", "")), *output.get("traceback", [])]
    return "\n".join(parts)


def contained(tier: str) -> None:
    if tier == "plain":
        pytest.skip("the plain tier is uncontained by design (doctor and README say so)")


# -- protected entries (9.3) -------------------------------------------------------------------
PLANT = (
    "import os, time\n"
    "root = os.environ['VAULT_RUNNER_VAULT']\n"
    f"for rel in {PROTECTED_ATTEMPTS!r}:\n"
    "    path = os.path.join(root, rel)\n"
    "    try:\n"
    "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
    "        with open(path, 'w') as handle:\n"
    "            handle.write('[core]\\n\\tfsmonitor = touch /tmp/pwned\\n')\n"
    "        print('made', rel)\n"
    "    except OSError as exc:\n"
    "        print('refused', rel, type(exc).__name__)\n"
    "time.sleep(3)  # the guard stops the kernel meanwhile, where the tier let a name be made\n"
    "print('still running')"
)


@pytest.mark.parametrize("where", ["Raíz.md", "Notas/n.md"])
def test_no_note_creates_a_protected_entry_in_any_tier(sandbox_tier: str, where: str, tmp_path: Path) -> None:
    contained(sandbox_tier)
    root = make_note_vault(tmp_path / "vault", {where: note(PLANT)})
    (root / "sub").mkdir()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    report = Engine(load_vault(root)).run_note(root / where)
    for relative in PROTECTED_ATTEMPTS:
        assert not (root / relative).exists(), (relative, all_text(report))
    assert not list(root.rglob(".git")) and not (root / "vault-runner.toml").exists(), all_text(report)
    assert (root / ".obsidian" / "app.json").read_bytes() == before[root / ".obsidian" / "app.json"]
    assert not (root / ".obsidian" / "plugins").exists()
    text = all_text(report)
    if names_supervised():  # refused as they were made (name_supervisor.py): nothing for the guard
        assert stdout_of(report).count("refused") == len(PROTECTED_ATTEMPTS), text
        assert "still running" in text and "which no note may create or change" not in text
    elif "made" in stdout_of(report):
        # The tier let it make a name (no mount can refuse one in a writable folder): the
        # guard stopped the kernel, moved what it made out, and the note says so.
        assert "still running" not in text
        assert "which no note may create or change" in text
        assert report.blocks[0].failed


RACE = (
    "import os\n"
    "root = os.environ['VAULT_RUNNER_VAULT']\n"
    "for attempt in range(2000):\n"
    "    try:\n"
    "        os.makedirs(os.path.join(root, 'sub', '.git'), exist_ok=True)\n"
    "        with open(os.path.join(root, 'sub', '.git', 'config'), 'w') as handle:\n"
    "            handle.write('[core]\\n\\tfsmonitor = touch /tmp/pwned\\n')\n"
    "    except OSError:\n"
    "        pass\n"
    "print('still running after', attempt + 1, 'attempts')"
)


def test_a_note_racing_to_plant_a_git_config_is_refused_every_time(sandbox_tier: str, tmp_path: Path) -> None:
    """The hostile note makes `sub/.git/config` over and over as fast as it can: every
    attempt is refused as it is made (name_supervisor.py), and nothing reaches the guard."""
    contained(sandbox_tier)
    if not names_supervised():
        pytest.skip("no seccomp user notification here: the guard alone keeps the names (the test below)")
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(RACE)})
    (root / "sub").mkdir()
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    text = all_text(report)
    assert "still running after 2000 attempts" in text and not report.blocks[0].failed, text
    assert not (root / "sub" / ".git").exists()
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "vault-runner" / "quarantine").exists(), text


@pytest.fixture
def unsupervised(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernels started and forked as where there is no name supervisor."""
    monkeypatch.setattr(sandbox_module, "names_supervised", lambda: False)
    close_default_kernels()  # no template of the supervised kind is reused, nor one of these after
    yield
    close_default_kernels()


@pytest.mark.usefixtures("unsupervised")
def test_without_the_supervisor_a_racing_note_is_stopped_at_its_first_attempt(
    sandbox_tier: str, tmp_path: Path
) -> None:
    """The guard, the backstop where there is no supervisor (no seccomp user notification):
    it hears the folder made (inotify), moves it out and stops the kernel at once, so the
    loop never gets through. (The host can still read the config for the instant between its
    making and the move: inotify reports a name, it cannot refuse one.)"""
    contained(sandbox_tier)
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(RACE)})
    (root / "sub").mkdir()
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    text = all_text(report)
    assert "still running" not in text and report.blocks[0].failed, text
    assert "which no note may create or change" in text
    assert not (root / "sub" / ".git").exists()
    # Moved out, not deleted: the quarantine holds what the note made.
    quarantined = list((Path(os.environ["XDG_STATE_HOME"]) / "vault-runner" / "quarantine").rglob(".git"))
    assert quarantined, text


LINK_OUT = (
    "import os, time\n"
    "base = os.path.join(os.environ['JUPYTER_RUNTIME_DIR'], 'plant')  # the kernel's own, on the host\n"
    "os.makedirs(os.path.join(base, '.git'), exist_ok=True)\n"
    "with open(os.path.join(base, '.git', 'config'), 'w') as handle:\n"
    "    handle.write('[core]\\n\\tfsmonitor = touch /tmp/pwned\\n')\n"
    "os.symlink(base, 'sub')  # git on the host, in Notas/sub, would read plant/.git/config\n"
    "print('linked')\n"
    "time.sleep(3)\n"
    "print('still running')"
)


LINK_REPOINTED = (
    "import os, shutil, time\n"
    "repo = os.path.join(os.environ['JUPYTER_RUNTIME_DIR'], 'repo')\n"
    "os.makedirs(os.path.join(repo, '.git'), exist_ok=True)\n"
    "vault = os.environ['VAULT_RUNNER_VAULT']\n"
    "inner = os.path.join(vault, 'd') + repo  # the same path, below a real folder of the vault\n"
    "os.makedirs(inner, exist_ok=True)\n"
    "os.makedirs('sub', exist_ok=True)\n"
    "os.symlink(os.path.relpath(inner, os.path.abspath('sub')), 'sub/x')  # leads inside the vault\n"
    "time.sleep(2.5)  # looked at, and let be (past the guard's second of doubt about fresh times)\n"
    "shutil.rmtree(os.path.join(vault, 'd'))\n"
    "os.symlink('/', os.path.join(vault, 'd'))  # now sub/x leads to the kernel's repo\n"
    "time.sleep(3)\n"
    "print('still running')"
)


@pytest.mark.parametrize(
    ("code", "link"), [(LINK_OUT, "Notas/sub"), (LINK_REPOINTED, "Notas/sub/x")], ids=["made", "repointed"]
)
def test_a_link_from_the_vault_into_the_kernels_own_folders_is_moved_out(
    sandbox_tier: str, tmp_path: Path, code: str, link: str
) -> None:
    # The kernel writes folders of its own outside the vault (ipc, temp) that the host sees:
    # a `.git` made there is outside the vault, but a link to it from the vault is a repository
    # in the vault for git on the host, as long as the kernel lives (`serve` keeps it). Made
    # so at once, or re-pointed there later through a folder far from the link's own.
    contained(sandbox_tier)
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(code)})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert "still running" not in stdout_of(report), all_text(report)
    assert not os.path.lexists(root / link)
    assert f"this note linked `{link}` in the vault to the sandbox's own folders" in all_text(report)


def test_a_link_to_a_file_in_the_kernels_temp_folder_is_left_alone(sandbox_tier: str, tmp_path: Path) -> None:
    # A file is no repository: a note may link its latest plot from its temp folder.
    code = (
        "import os, tempfile, time\n"
        "plot = os.path.join(tempfile.gettempdir(), 'plot.png')\n"
        "open(plot, 'w').close()\n"
        "os.symlink(plot, 'latest.png')\n"
        "time.sleep(1)\n"
        "print('still running')"
    )
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(code)})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert "still running" in stdout_of(report), all_text(report)
    assert os.path.islink(root / "Notas" / "latest.png")


def test_existing_protected_entries_are_read_only_at_any_depth(sandbox_tier: str, tmp_path: Path) -> None:
    contained(sandbox_tier)
    code = (
        "import os\n"
        "root = os.environ['VAULT_RUNNER_VAULT']\n"
        "for rel in ('.git/config', '.obsidian/app.json', 'vault-runner.toml', 'sub/repo/.git/config'):\n"
        "    try:\n"
        "        open(os.path.join(root, rel), 'a').write('evil')\n"
        "        print('wrote', rel)\n"
        "    except OSError as exc:\n"
        "        print('refused', rel)\n"
        "open(os.path.join(root, 'sub', 'repo', 'data.txt'), 'w').write('ok')"
    )
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(code)}, config="[run]\n")
    for folder in (root / ".git", root / "sub" / "repo" / ".git"):
        folder.mkdir(parents=True)
        (folder / "config").write_text("[core]\n", encoding="utf-8")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git" in p.parts or p.name == "app.json"}
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert "wrote" not in stdout_of(report), stdout_of(report)
    assert stdout_of(report).count("refused") == 4
    assert {p: p.read_bytes() for p in before} == before
    if sandbox_tier == "bubblewrap" or probe().landlock_mounts:
        assert (root / "sub" / "repo" / "data.txt").read_text() == "ok"  # the rest of the folder is the note's


def test_the_guard_moves_a_made_entry_out_and_stops_the_kernel(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    (vault / "sub" / "repo" / ".git").mkdir(parents=True)
    stopped: list[bool] = []
    guard = ProtectedGuard(vault, lambda: stopped.append(True), tmp_path / "quarantine")
    assert guard.allowed == {vault / "sub" / "repo" / ".git"}  # the user's own: left alone
    assert guard.check() == [] and not stopped
    (vault / "new" / "deep").mkdir(parents=True)
    (vault / "new" / "deep" / ".obsidian").mkdir()
    (vault / "vault-runner.toml").write_text("x")
    (vault / "sub" / "vault-runner.toml").write_text("only the root's counts")
    made = guard.check()
    assert sorted(made) == [vault / "new" / "deep" / ".obsidian", vault / "vault-runner.toml"]
    assert (
        stopped and not (vault / "vault-runner.toml").exists() and not (vault / "new" / "deep" / ".obsidian").exists()
    )
    assert (vault / "sub" / "vault-runner.toml").exists()
    assert {p.name for p in (tmp_path / "quarantine").rglob("*")} >= {"vault-runner.toml", ".obsidian"}
    assert guard.tripped is not None and "`vault-runner.toml`" in guard.tripped


def test_the_guard_never_looks_through_a_symlink(tmp_path: Path) -> None:
    vault, outside = tmp_path / "vault", tmp_path / "outside"
    (vault / "datos").mkdir(parents=True)
    (outside / ".git").mkdir(parents=True)  # someone's repository outside the vault
    guard = ProtectedGuard(vault, lambda: None, tmp_path / "quarantine")
    (vault / "datos").rmdir()
    (vault / "datos").symlink_to(outside)  # a folder swapped for a symlink out of the vault
    (vault / "enlace").symlink_to(outside)
    assert guard.check() == []
    assert (outside / ".git").is_dir()


def test_the_guard_never_moves_through_a_folder_swapped_for_a_symlink(tmp_path: Path) -> None:
    vault, outside = tmp_path / "vault", tmp_path / "outside"
    (vault / "sub").mkdir(parents=True)
    (outside / "proj" / ".git").mkdir(parents=True)  # someone's repository outside the vault
    (outside / "proj" / ".git" / "config").write_text("[core]\n")
    stopped: list[bool] = []
    guard = ProtectedGuard(vault, lambda: stopped.append(True), tmp_path / "quarantine")
    # The guard has found `sub/.git`; before it moves it, the note swaps `sub` for a link out.
    (vault / "sub").rmdir()
    (vault / "sub").symlink_to(outside / "proj")
    assert guard._judge([vault / "sub" / ".git"]) == []
    assert (outside / "proj" / ".git" / "config").read_text() == "[core]\n"  # never moved
    assert not list((tmp_path / "quarantine").rglob("config"))


RESET_TIMES = (
    "import os, time\n"
    "root = os.environ['VAULT_RUNNER_VAULT']\n"
    "def plant(rel):\n"
    "    path = os.path.join(root, rel)\n"
    "    folders = [d for d in (root, os.path.join(root, 'sub'), os.path.join(root, '.obsidian')) if os.path.isdir(d)]\n"
    "    times = [(d, os.stat(d).st_mtime_ns) for d in folders]\n"
    "    try:\n"
    "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
    "        open(path, 'w').write('[core]\\n\\tfsmonitor = touch /tmp/pwned\\n')\n"
    "        for d, m in times:\n"
    "            os.utime(d, ns=(m, m))  # the folders look untouched by their mtime\n"
    "        print('made', rel)\n"
    "    except OSError as exc:\n"
    "        print('refused', rel, type(exc).__name__)\n"
    "for rel in ('sub/.git/config', 'vault-runner.toml', '.obsidian/plugins/x/main.js'):\n"
    "    plant(rel)\n"
    "time.sleep(3)\n"
    "print('still running')"
)


def test_a_note_that_resets_folder_times_is_still_caught(sandbox_tier: str, tmp_path: Path) -> None:
    contained(sandbox_tier)
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(RESET_TIMES)})
    shutil.rmtree(root / ".obsidian")  # a folder that is not an Obsidian vault yet: nothing to bind
    (root / "sub").mkdir()
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert not list(root.rglob(".git")) and not (root / "vault-runner.toml").exists(), all_text(report)
    assert not (root / ".obsidian").exists(), all_text(report)
    if "made" in stdout_of(report):
        assert "still running" not in all_text(report) and report.blocks[0].failed


def test_the_guard_sees_through_reset_times_and_looks_everywhere_last(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    (vault / "sub").mkdir(parents=True)
    guard = ProtectedGuard(vault, lambda: None, tmp_path / "quarantine")
    time.sleep(1.1)  # past the window in which a folder's time is not trusted
    assert guard.check() == []
    stamp = (vault / "sub").stat().st_mtime_ns
    (vault / "sub" / ".git").mkdir()
    os.utime(vault / "sub", ns=(stamp, stamp))
    assert guard.check() == [vault / "sub" / ".git"]
    # The last look, once the kernel is gone, walks the whole vault whatever the times say.
    (vault / "vault-runner.toml").write_text("[run]\n")
    guard._seen.clear()  # as if every folder's time looked unchanged
    guard.stop()
    assert not (vault / "vault-runner.toml").exists() and guard.tripped is not None


def test_the_guard_knows_the_users_entries_by_inode_not_by_path(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    (vault / "proj" / ".git").mkdir(parents=True)
    (vault / "proj" / ".git" / "config").write_text("[core]\n")
    guard = ProtectedGuard(vault, lambda: None, tmp_path / "quarantine")
    (vault / "proj").rename(vault / "proj-moved")  # the user's repository goes with its folder
    (vault / "proj" / ".git").mkdir(parents=True)
    (vault / "proj" / ".git" / "config").write_text("[core]\n\tfsmonitor = touch /tmp/pwned\n")
    assert guard.check() == [vault / "proj" / ".git"]
    assert (vault / "proj-moved" / ".git" / "config").read_text() == "[core]\n"  # never quarantined
    assert not (vault / "proj" / ".git").exists()
    assert guard.tripped is not None and "proj-moved" in guard.tripped  # and the note is told
    (vault / "vault-runner.toml").write_text("[run]\n")
    guard = ProtectedGuard(vault, lambda: None, tmp_path / "quarantine")
    os.link(vault / "vault-runner.toml", vault / "proj-moved" / ".obsidian")  # a second name: made
    assert guard.check(everywhere=True) == [vault / "proj-moved" / ".obsidian"]
    assert (vault / "vault-runner.toml").read_text() == "[run]\n"


def test_the_guard_leaves_what_it_cannot_move_and_says_so(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    blocked = tmp_path / "quarantine"
    blocked.write_text("a file where the quarantine folder should be")  # every move fails
    stopped: list[bool] = []
    guard = ProtectedGuard(vault, lambda: stopped.append(True), blocked)
    (vault / ".git").mkdir()
    (vault / ".git" / "config").write_text("maybe the user's")
    assert guard.check() == [vault / ".git"]
    assert stopped and (vault / ".git" / "config").read_text() == "maybe the user's"  # nothing deleted
    assert guard.tripped is not None and "could not be moved" in guard.tripped


RENAME_REPO = (
    "import os\n"
    "root = os.environ['VAULT_RUNNER_VAULT']\n"
    "p = os.path.join(root, 'proj')\n"
    "try:\n"
    "    os.rename(p, p + '-moved')\n"
    "    print('renamed')\n"
    "except OSError as exc:\n"
    "    print('rename refused', type(exc).__name__)\n"
    "open(os.path.join(p, 'data.csv'), 'w').write('a,b\\n')  # its folder stays the note's\n"
    "os.makedirs(os.path.join(p, 'datos'))\n"
    "os.rename(os.path.join(p, 'datos'), os.path.join(p, 'datos2'))\n"
    "print('wrote inside')"
)


def test_a_folder_holding_a_repository_cannot_be_renamed(sandbox_tier: str, tmp_path: Path) -> None:
    contained(sandbox_tier)
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(RENAME_REPO)})
    (root / "proj" / ".git").mkdir(parents=True)
    (root / "proj" / ".git" / "config").write_text("[core]\n")
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    out = stdout_of(report)
    assert "rename refused" in out and "wrote inside" in out, all_text(report)
    assert (root / "proj" / ".git" / "config").read_text() == "[core]\n"
    if sandbox_tier == "bubblewrap" or probe().landlock_mounts:
        assert (root / "proj" / "data.csv").exists() and (root / "proj" / "datos2").is_dir()


def test_landlock_grants_go_around_protected_entries(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    for folder in ("a/b/.git", "a/c", "d", ".obsidian"):
        (vault / folder).mkdir(parents=True)
    (vault / "n.md").write_text("x")
    (vault / "link").symlink_to(tmp_path)
    grants = write_grants(vault, existing_protected(vault))
    assert sorted(p.relative_to(vault).as_posix() for p in grants) == ["a/c", "d", "n.md"]
    assert write_grants(tmp_path / "empty", []) == [tmp_path / "empty"]  # nothing to go around


# -- /dev/shm (9.5) ----------------------------------------------------------------------------
@pytest.fixture
def host_shm_file() -> Iterator[Path]:
    path = Path("/dev/shm") / f"vault-runner-test-{uuid.uuid4().hex}"
    path.write_text("host secret", encoding="utf-8")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_a_note_cannot_reach_the_hosts_dev_shm(sandbox_tier: str, host_shm_file: Path, tmp_path: Path) -> None:
    contained(sandbox_tier)
    code = (
        "import os\n"
        f"path = {str(host_shm_file)!r}\n"
        "for mode in ('r', 'r+'):  # r+: write the host's file, not make one of its own\n"
        "    try:\n"
        "        with open(path, mode) as handle:\n"
        "            handle.read() if mode == 'r' else handle.write('pwned')\n"
        "        print('reached', mode)\n"
        "    except OSError as exc:\n"
        "        print('refused', mode, type(exc).__name__)\n"
        "import multiprocessing as mp\n"
        "queue = mp.Queue()\n"
        "worker = mp.Process(target=queue.put, args=(42,))\n"
        "worker.start(); print('from a worker', queue.get(timeout=60)); worker.join()"
    )
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(code)})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    out = stdout_of(report)
    assert "reached" not in out, out
    assert host_shm_file.read_text(encoding="utf-8") == "host secret"
    # Shared memory still works where the kernel has its own /dev/shm (bubblewrap, Landlock
    # with mounts); without mounts Landlock refuses /dev/shm and doctor says so.
    if sandbox_tier == "bubblewrap" or probe().landlock_mounts:
        assert "from a worker 42" in out, all_text(report)


SYSV = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
found = libc.shmget({host_key}, 0, 0)
print("host segment", "reached" if found >= 0 else "unseen")
made = libc.shmget({note_key}, 4096, 0o1600)  # IPC_CREAT | rw for its owner
print("note segment", "made" if made >= 0 else os.strerror(ctypes.get_errno()))
"""


def test_a_note_shares_no_sysv_shared_memory_with_the_host(sandbox_tier: str, tmp_path: Path) -> None:
    # SysV segments live in an IPC namespace, not in /dev/shm: a kernel in the host's could
    # read and write another program's (or leave its own to a later note).
    contained(sandbox_tier)
    if sandbox_tier == "landlock" and not probe().landlock_mounts:
        pytest.skip("Landlock without namespaces here: SysV IPC is the host's (doctor says so)")
    libc = ctypes.CDLL(None, use_errno=True)
    host_key, note_key = (0x5652_0000 + secrets.randbelow(0xFFFF) for _ in range(2))
    host = libc.shmget(host_key, 4096, 0o1600)
    assert host >= 0, os.strerror(ctypes.get_errno())
    try:
        root = make_note_vault(
            tmp_path / "vault", {"Notas/n.md": note(SYSV.format(host_key=host_key, note_key=note_key))}
        )
        report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
        out = stdout_of(report)
        assert "host segment unseen" in out and "note segment made" in out, all_text(report)
        assert libc.shmget(note_key, 0, 0) < 0  # nothing of the note's in the host's namespace
    finally:
        libc.shmctl(host, 0, None)  # IPC_RMID
        leaked = libc.shmget(note_key, 0, 0)
        if leaked >= 0:
            libc.shmctl(leaked, 0, None)


FILL_SHM = (
    "import time\n"
    "chunk, n = b'\\1' * (64 * 2**20), 0\n"
    "try:\n"
    "    with open('/dev/shm/fill', 'wb') as handle:\n"
    "        for _ in range(16):  # 1 GiB, twice the budget\n"
    "            handle.write(chunk); handle.flush(); n += len(chunk)\n"
    "except OSError as exc:\n"
    "    print('refused', type(exc).__name__)\n"
    "print('wrote', n >> 20, 'MiB')\n"
    "time.sleep(3)\n"
    "print('still running')"
)


def test_files_in_a_kernels_own_dev_shm_count_as_its_memory(
    sandbox_tier: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contained(sandbox_tier)
    # The budget is shared by every kernel of this process: templates and spares that earlier
    # tests left warm would count against it, so this note starts from none.
    close_default_kernels()
    monkeypatch.setenv("VAULT_RUNNER_MEMORY", "640M")
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note(FILL_SHM)})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    text = all_text(report)
    assert "wrote 1024 MiB" not in text, text  # the tmpfs is capped ...
    if sandbox_tier == "bubblewrap" or probe().landlock_mounts:
        assert "still running" not in text and "of memory" in text, (text, report)  # ... and counted


# -- caches (9.6) ------------------------------------------------------------------------------
PLANT_CACHES = (
    "import os, pathlib, sys\n"
    "rc = pathlib.Path(os.environ['MPLCONFIGDIR']) / 'matplotlibrc'\n"
    "rc.write_text('lines.linewidth: 17\\n')\n"
    "for font_list in [*rc.parent.glob('fontlist-*.json'), rc.parent / 'fontlist-v390.json']:\n"
    "    font_list.write_text('{junk')\n"
    "for name in sys.argv[-1].split(','):\n"
    "    folder = pathlib.Path(os.environ[name])\n"
    "    try:\n"
    "        folder.mkdir(parents=True, exist_ok=True)\n"
    "        (folder / 'planted-by-a').write_text('junk')\n"
    "        print('planted', name)\n"
    "    except OSError:\n"
    "        print('refused', name)"
)
CHECK_CACHES = (
    "import os, pathlib, matplotlib, matplotlib.pyplot as plt\n"
    "print('B sees', matplotlib.rcParams['lines.linewidth'])\n"
    "plt.plot([1, 2]); plt.close()\n"
    "for name in ('MPLCONFIGDIR', 'XDG_CACHE_HOME', 'IPYTHONDIR', 'TMPDIR', 'HOME'):\n"
    "    if (pathlib.Path(os.environ[name]) / 'planted-by-a').exists():\n"
    "        print('found', name)"
)


def test_what_a_note_writes_to_its_caches_never_reaches_another_vault(sandbox_tier: str, tmp_path: Path) -> None:
    # The plain tier is uncontained: a note there could write your home, so this one does not.
    names = "MPLCONFIGDIR,XDG_CACHE_HOME,IPYTHONDIR,TMPDIR" + (",HOME" if sandbox_tier != "plain" else "")
    first = make_note_vault(
        tmp_path / "a", {"Notas/a.md": note(f"import sys\nsys.argv.append({names!r})", PLANT_CACHES)}
    )
    second = make_note_vault(tmp_path / "b", {"Notas/b.md": note(CHECK_CACHES)})
    report_a = Engine(load_vault(first)).run_note(first / "Notas" / "a.md")
    assert "planted MPLCONFIGDIR" in stdout_of(report_a, 1), all_text(report_a)
    report_b = Engine(load_vault(second)).run_note(second / "Notas" / "b.md")
    out = stdout_of(report_b)
    assert "B sees 1.5" in out, all_text(report_b)
    found = {line.split()[1] for line in out.splitlines() if line.startswith("found")}
    assert found == set(), out
    assert not (Path.home() / "planted-by-a").exists()


# -- `!cmd` and writing next to a root-level note (10.13, 10.14) ---------------------------------
def test_shell_commands_and_files_beside_a_root_level_note_work(sandbox_tier: str, tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "MODEL_PATH = Path('models')\n"
        "MODEL_PATH.mkdir(parents=True, exist_ok=True)\n"
        "(MODEL_PATH / 'm.pt').write_bytes(b'weights')\n"
        "Path('resultados.csv').write_text('a,b\\n')"
    )
    root = make_note_vault(tmp_path / "vault", {"Raíz.md": note("!echo hi", code, "!ls models")})
    report = Engine(load_vault(root)).run_note(root / "Raíz.md")
    assert [b.status for b in report.blocks] == ["ok", "ok", "ok"], all_text(report)
    assert stdout_of(report, 0).strip() == "hi"
    assert stdout_of(report, 2).strip() == "m.pt"
    assert (root / "models" / "m.pt").read_bytes() == b"weights"
    assert (root / "resultados.csv").read_text() == "a,b\n"


# -- the Landlock tier without its own mounts ---------------------------------------------------
@pytest.fixture
def landlock_without_mounts(tmp_path: Path) -> Iterator[KernelSession]:
    if not probe().landlock_abi:
        pytest.skip("this Linux kernel has no Landlock")
    vault = make_note_vault(tmp_path / "vault", {"Raíz.md": note("1")})
    (vault / "Notas").mkdir()
    box = Sandbox(Policy(vault=vault.resolve(), cwd=vault.resolve(), memory=None, max_tasks=None), tier="landlock")
    box.probe = dataclasses.replace(box.probe, landlock_mounts=False)
    env = {"VAULT_RUNNER_VAULT": str(vault.resolve())}
    session = KernelSession(vault.resolve(), env, sandbox=box)
    session.start()
    try:
        yield session
    finally:
        session.shutdown()


def test_without_mounts_landlock_says_why_a_root_level_note_cannot_create_beside_itself(
    landlock_without_mounts: KernelSession,
) -> None:
    session = landlock_without_mounts
    done = session.execute("from pathlib import Path\nPath('models').mkdir()", timeout=60)
    assert done.status == "error"
    text = "".join(o.get("text", "") for o in done.outputs)
    assert ROOT_REFUSED in text
    assert any(o.get("ename") == "PermissionError" for o in done.outputs)
    # Inside a folder it may, and nothing of the host's /dev/shm or terminals is reachable.
    done = session.execute("Path('Notas/m.pt').write_bytes(b'x')", timeout=60)
    assert done.status == "ok", done.outputs
    for path in ("/dev/shm", "/dev/pts"):
        listed = session.execute(f"import os\nos.listdir({path!r})", timeout=60)
        assert listed.status == "error", (path, listed.outputs)
    # `!cmd` still gets a pty, from the helper of ptys.py, never through /dev/pts.
    done = session.execute("!echo hi\n!ls Notas", timeout=60)
    assert done.status == "ok", done.outputs
    assert "".join(o.get("text", "") for o in done.outputs).split() == ["hi", "m.pt"]
    done = session.execute("import sys\nprint(sys.stdout.isatty())\n!test -t 1 && echo tty", timeout=60)
    assert "tty" in "".join(o.get("text", "") for o in done.outputs), done.outputs


def test_the_launcher_without_mounts_refuses_the_hosts_dev_shm(host_shm_file: Path, tmp_path: Path) -> None:
    if not probe().landlock_abi:
        pytest.skip("this Linux kernel has no Landlock")
    vault = tmp_path / "vault"
    (vault / "Notas").mkdir(parents=True)
    box = Sandbox(Policy(vault=vault, cwd=vault / "Notas", memory=None, max_tasks=None), tier="landlock")
    box.probe = dataclasses.replace(box.probe, landlock_mounts=False)
    runtime = tmp_path / "rt"
    runtime.mkdir()
    box.setup(runtime, lambda: None)
    try:
        script = f"open({str(host_shm_file)!r}).read()"
        done = subprocess.run(box.wrap([sys.executable, "-c", script]), capture_output=True, text=True, timeout=120)
    finally:
        box.close()
    assert done.returncode != 0 and "PermissionError" in done.stderr
    assert os.path.exists(host_shm_file)


def _caught(stopped: list[bool], path: Path, timeout: float = 15.0) -> bool:
    """The running guard stopped the kernel and moved `path` out, within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped and not path.exists():
            return True
        time.sleep(0.05)
    return False


def test_without_inotify_the_guard_still_catches_a_made_entry_by_its_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine without inotify: the look by folder ctime alone (issue 9.3's fallback)."""
    monkeypatch.setattr(Inotify, "open", classmethod(lambda cls: None))
    vault = tmp_path / "vault"
    (vault / "sub").mkdir(parents=True)
    stopped: list[bool] = []
    guard = ProtectedGuard(vault, lambda: stopped.append(True), tmp_path / "quarantine")
    guard.start()
    try:
        (vault / "sub" / ".git").mkdir()
        (vault / "sub" / ".git" / "config").write_text("[core]\n\tfsmonitor = touch /tmp/pwned\n")
        assert _caught(stopped, vault / "sub" / ".git")
    finally:
        guard.stop()
    assert guard.tripped is not None and "`sub/.git`" in guard.tripped


def test_past_the_watch_limit_the_guard_still_catches_a_made_entry_in_a_new_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify's watch limit reached: a folder made after the start is not watched, and the
    look by ctime finds what is made in it (issue 9.3's fallback)."""
    vault = tmp_path / "vault"
    vault.mkdir()
    stopped: list[bool] = []
    guard = ProtectedGuard(vault, lambda: stopped.append(True), tmp_path / "quarantine")
    monkeypatch.setattr(Inotify, "watch", lambda self, folder: None)  # the kernel refuses every new watch
    guard.start()
    try:
        (vault / "new").mkdir()
        time.sleep(0.5)  # heard, listed, not watched
        (vault / "new" / "deep").mkdir()
        time.sleep(0.5)
        (vault / "new" / "deep" / ".obsidian").mkdir()
        assert _caught(stopped, vault / "new" / "deep" / ".obsidian")
    finally:
        guard.stop()

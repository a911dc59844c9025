"""What a note may and may not make in its vault under the name supervisor
(name_supervisor.py): run as a note's code (its text is read by test_protected_names.py), or
as a script with the vault as its argument. Prints one JSON object last:

  allowed   what an honest note does, each None or the error it met
  refused   each attack, the error name it met, or "allowed"
  race      a thread flips a path between `.gix` and `.git` while mkdir runs on it
"""

import ctypes
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

VAULT = os.environ.get("VAULT_RUNNER_VAULT") or sys.argv[1]
os.chdir(VAULT)
libc = ctypes.CDLL(None, use_errno=True)
results: dict = {"allowed": {}, "refused": {}}


def allowed(what, fn):
    try:
        fn()
        results["allowed"][what] = None
    except Exception as exc:  # noqa: BLE001 - reported, the test names it
        results["allowed"][what] = f"{type(exc).__name__}: {exc}"


def refused(what, fn):
    try:
        fn()
        results["refused"][what] = "allowed"
    except OSError as exc:  # shutil.Error (copytree's) has no errno, only the messages
        code = exc.errno or (errno.EPERM if os.strerror(errno.EPERM) in str(exc) else 0)
        results["refused"][what] = errno.errorcode.get(code, str(exc))


def checked(result):
    if result != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def write(path, text="x"):
    with open(path, "w") as handle:
        handle.write(text)


def tmpfile_link(name):  # O_TMPFILE, then linkat(AT_EMPTY_PATH): how some programs write atomically
    fd = os.open("sub", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"t")
    checked(libc.linkat(fd, b"", -100, name.encode(), 0x1000))


def to_stdout():  # /dev/stdout is /proc/self/fd/1: the note's own fd 1, never the supervisor's
    saved = os.dup(1)
    fd = os.open("stdout.txt", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    try:
        with open("/dev/stdout", "w") as handle:
            handle.write("to-stdout")
    finally:
        os.dup2(saved, 1)
    assert open("stdout.txt").read() == "to-stdout"


def fifo_blocks_nothing_else():  # a FIFO opened for writing waits for a reader: only that call waits
    opened = []
    writer = threading.Thread(target=lambda: opened.append(open("sub/fifo", "w")))
    writer.start()
    time.sleep(0.2)
    os.mkdir("sub/while-fifo-waits")
    reader = open("sub/fifo")
    writer.join(5)
    assert opened and not writer.is_alive()
    reader.close()


def umask_kept():
    old = os.umask(0o077)
    try:
        write("umask.txt")
        os.mkdir("umask.d")
        assert os.stat("umask.txt").st_mode & 0o777 == 0o600
        assert os.stat("umask.d").st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def cloexec_kept():
    assert not os.get_inheritable(os.open("ce", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC))
    libc.open.restype = ctypes.c_int
    assert os.get_inheritable(libc.open(b"nce", os.O_CREAT | os.O_WRONLY, 0o644))


def page_edge():  # a path that ends right before an unmapped page; EFAULT past it
    libc.mmap.restype = ctypes.c_void_p
    base = libc.mmap(None, 8192, 3, 0x22, -1, 0)
    libc.munmap(ctypes.c_void_p(base + 4096), 4096)
    path = b"sub/pagedge\0"
    ctypes.memmove(base + 4096 - len(path), path, len(path))
    checked(libc.mkdir(ctypes.c_void_p(base + 4096 - len(path)), 0o755))
    assert os.path.isdir("sub/pagedge")
    ctypes.memmove(base + 4096 - 3, b"abc", 3)
    assert libc.mkdir(ctypes.c_void_p(base + 4096 - 3), 0o755) != 0 and ctypes.get_errno() == errno.EFAULT


os.makedirs("sub/deep", exist_ok=True)
# Every name made in these folders, however briefly (a check that undoes what it made is
# no refusal): inotify's IN_CREATE events, read at the end.
IN_CREATE = 0x100
watch = libc.inotify_init1(os.O_NONBLOCK)
watched = {}
for folder in (".", "sub", "sub/deep", "race"):
    os.makedirs(folder, exist_ok=True)
    watched[libc.inotify_add_watch(watch, folder.encode(), IN_CREATE)] = folder
allowed("open(w), root and subfolder", lambda: (write("a.txt"), write("sub/deep/b.txt")))
allowed("open(a), O_EXCL", lambda: (open("a.txt", "a").close(), os.close(os.open("ex", os.O_CREAT | os.O_EXCL | 1))))
allowed("os.makedirs", lambda: os.makedirs("m/n/o/p"))
allowed("tempfile in the vault", lambda: (tempfile.mkstemp(dir="sub"), tempfile.mkdtemp(dir="sub")))
allowed("shutil.copytree, rmtree", lambda: (shutil.copytree("m", "m2"), shutil.rmtree("m2")))
allowed("os.rename, os.replace", lambda: (os.rename("a.txt", "sub/a2.txt"), os.replace("sub/a2.txt", "a.txt")))
allowed("os.symlink, os.link", lambda: (os.symlink("a.txt", "sub/lnk"), os.link("a.txt", "sub/hard")))
allowed("os.mkfifo", lambda: os.mkfifo("sub/fifo"))
allowed("vault-runner.toml below the root", lambda: write("sub/vault-runner.toml"))
allowed("open relative to a dirfd", lambda: os.close(os.open("viafd", os.O_CREAT | 1, dir_fd=os.open("sub", 0))))
allowed(
    "O_CREAT through a dangling symlink", lambda: (os.symlink("made", "sub/dl"), write("sub/dl"), os.stat("sub/made"))
)
allowed("unix socket bound by name", lambda: socket.socket(socket.AF_UNIX).bind("sub/sock"))
allowed(
    "shell redirect, mkdir", lambda: subprocess.run(["sh", "-c", "echo hi > sub/sh.txt && mkdir sub/shd"], check=True)
)
allowed(".git outside the vault", lambda: os.mkdir(os.path.join(tempfile.mkdtemp(), ".git")))
allowed("O_TMPFILE linked in", lambda: tmpfile_link("sub/from-tmpfile"))
allowed("open('/dev/stdout', 'w')", to_stdout)
allowed("a FIFO waiting blocks nothing else", fifo_blocks_nothing_else)
allowed("the note's umask", umask_kept)
allowed("O_CLOEXEC kept, and its absence", cloexec_kept)
allowed("a path ending at an unmapped page", page_edge)


def replaced_from_outside():  # a file written in the temp folder, then moved in: a file holds no name
    fd, made = tempfile.mkstemp()
    os.close(fd)
    try:
        os.replace(made, "from-temp.txt")
        results["file moved in"] = "moved"
    except OSError as exc:  # the temp folder is a mount of its own in a sandbox tier: EXDEV there
        results["file moved in"] = errno.errorcode.get(exc.errno or 0, str(exc))


def flags_as_asked():  # F_GETFL shows what the note asked, on a new file and an existing one
    import fcntl

    for _ in range(2):
        fd = os.open("flags.txt", os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_NOFOLLOW | os.O_APPEND) == os.O_APPEND
        os.close(fd)


def netlink_pid():  # an automatically bound netlink socket takes the note's pid, as natively
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW) as sock:
        sock.bind((0, 0))
        assert sock.getsockname()[0] == os.getpid()


def fifo_open_interrupted():  # a signal the note catches ends a FIFO's open that waits
    import signal

    class Late(Exception):
        pass

    def late(*_):
        raise Late

    def rescue():  # if the signal does not end the open, a reader does, and the check fails
        if not done.wait(10):
            os.close(os.open("sub/fifo", os.O_RDONLY | os.O_NONBLOCK))

    done = threading.Event()
    threading.Thread(target=rescue, daemon=True).start()
    old = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        open("sub/fifo", "w")
    except Late:
        assert time.monotonic() - started < 5
    else:
        raise AssertionError("the signal did not interrupt the open")
    finally:
        done.set()
        signal.signal(signal.SIGALRM, old)


allowed("a file made outside, then os.replace'd in", replaced_from_outside)
allowed("O_NOFOLLOW shows only where asked", flags_as_asked)
allowed("netlink autobind", netlink_pid)
allowed("a signal interrupts a FIFO open", fifo_open_interrupted)
allowed("numpy.save", lambda: __import__("numpy").save("arr.npy", __import__("numpy").arange(3)))

write("x")
os.mkdir("xd")
refused("mkdir .git", lambda: os.mkdir(".git"))
refused("mkdir sub/deep/.git", lambda: os.mkdir("sub/deep/.git"))
refused("open .git O_CREAT", lambda: os.open(".git", os.O_CREAT | os.O_WRONLY))
refused("open sub/.obsidian w", lambda: write("sub/.obsidian"))
refused("vault-runner.toml at the root", lambda: write("vault-runner.toml"))
refused("rename x to .git", lambda: os.rename("x", ".git"))
refused("rename a folder to sub/.git", lambda: os.rename("xd", "sub/.git"))
refused("symlink named .git", lambda: os.symlink("t", ".git"))
refused("hard link named sub/.git", lambda: os.link("x", "sub/.git"))
refused("fifo named .obsidian", lambda: os.mkfifo(".obsidian"))
refused("mknod sub/.git", lambda: os.mknod("sub/.git", 0o600 | 0o100000))
refused(".GIT", lambda: os.mkdir("sub/.GIT"))
refused(".git. (trailing dot)", lambda: os.mkdir("sub/.git."))
refused("through a symlink named lnk to .git", lambda: (os.symlink(".git", "lnk"), write("lnk")))
refused("/proc/self/cwd/.git", lambda: os.mkdir("/proc/self/cwd/.git"))
refused("absolute path", lambda: os.mkdir(os.path.join(VAULT, "sub", ".obsidian")))
refused("relative to a dirfd", lambda: os.mkdir(".git", dir_fd=os.open("sub", os.O_RDONLY)))
refused("unix socket bound as sub/.git", lambda: socket.socket(socket.AF_UNIX).bind("sub/.git"))
refused("O_TMPFILE linked in as sub/.git", lambda: tmpfile_link("sub/.git"))
refused("RENAME_EXCHANGE of x and sub/.git", lambda: checked(libc.renameat2(-100, b"x", -100, b"sub/.git", 2)))


def child_mkdir():
    code = "import os\ntry:\n    os.mkdir('.git')\nexcept OSError as exc:\n    raise SystemExit(exc.errno)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    if done.returncode:
        raise OSError(done.returncode, "in a child process")


refused("a child process's mkdir", child_mkdir)
outside = tempfile.mkdtemp()
os.makedirs(os.path.join(outside, "repo", ".git"))
refused("rename a folder holding .git into the vault", lambda: os.rename(os.path.join(outside, "repo"), "repo"))
refused("shutil.move of it (copies, whose .git is refused)", lambda: shutil.move(os.path.join(outside, "repo"), "repo"))
refused("a signal to the supervisor (Landlock ABI 6 scopes)", lambda: os.kill(os.getppid(), 0))
refused("the vault's own folder renamed", lambda: os.rename(VAULT, VAULT + ".old"))


def linked_through_a_symlink():  # linkat(AT_SYMLINK_FOLLOW): a hard link to what the symlink names
    os.symlink("../a.txt", "sub/to-a")
    checked(libc.linkat(-100, b"sub/to-a", -100, b"sub/hard-a", 0x400))
    assert os.path.samefile("sub/hard-a", "a.txt") and not os.path.islink("sub/hard-a")


allowed("a hard link through a symlink", linked_through_a_symlink)
git = subprocess.run(["git", "init", "-q", "sub/deep"], capture_output=True, text=True)
results["git init"] = git.returncode


def unsearchable_on_the_way_up():  # where the way up from a folder cannot be walked
    os.makedirs(os.path.join(outside, "A", "B", "repo", ".git"))
    below = os.open(os.path.join(outside, "A", "B"), os.O_RDONLY | os.O_DIRECTORY)
    os.chmod(os.path.join(outside, "A"), 0o600)  # chmod makes no name: the supervisor never sees it
    try:
        os.rename("repo", os.path.join(VAULT, "repo2"), src_dir_fd=below)
    finally:
        os.chmod(os.path.join(outside, "A"), 0o700)


refused("rename from a folder whose way up cannot be walked", unsearchable_on_the_way_up)


def bind_while_the_cwd_flips(seconds=1.0):  # bind(".git") from outside, a thread flipping the cwd into the vault
    away = tempfile.mkdtemp()
    fds = os.open(away, os.O_RDONLY), os.open(VAULT, os.O_RDONLY)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for fd in fds:
                os.fchdir(fd)

    thread = threading.Thread(target=flip)
    thread.start()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.bind(".git")
                except OSError:
                    pass
            for folder in (away, "/"):
                try:
                    os.unlink(os.path.join(folder, ".git"))
                except OSError:
                    pass
    finally:
        stop.set()
        thread.join()
        os.chdir(VAULT)


allowed("binds while a thread flips the cwd", bind_while_the_cwd_flips)


def proc_fifo_blocks_nothing_else():  # the same FIFO, opened by its /proc/self/fd link
    node = os.open("sub/fifo", os.O_PATH)
    opened = []
    writer = threading.Thread(target=lambda: opened.append(os.open(f"/proc/self/fd/{node}", os.O_CREAT | os.O_WRONLY)))
    writer.start()
    time.sleep(0.2)
    os.mkdir("sub/while-proc-fifo-waits")
    reader = os.open("sub/fifo", os.O_RDONLY | os.O_NONBLOCK)
    writer.join(5)
    assert opened and not writer.is_alive()
    os.close(reader)


allowed("a FIFO opened by its /proc link blocks nothing else", proc_fifo_blocks_nothing_else)


def race(seconds=2.0):
    buffer = ctypes.create_string_buffer(b"race/.gix")
    os.makedirs("race", exist_ok=True)
    stop = threading.Event()

    def flip():
        address = ctypes.addressof(buffer) + 8
        while not stop.is_set():
            for char in (b"t", b"x"):
                ctypes.memmove(address, char, 1)

    thread = threading.Thread(target=flip)
    thread.start()
    attempts = made = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        attempts += 1
        if libc.mkdir(buffer, 0o755) == 0:
            made += os.path.isdir("race/.git")
            for name in (".gix", ".git"):
                if os.path.isdir(f"race/{name}"):
                    os.rmdir(f"race/{name}")
    stop.set()
    thread.join()
    return {"attempts": attempts, ".git made": made}


results["race"] = race()
events = b""
try:
    while True:
        events += os.read(watch, 65536)
except BlockingIOError:
    pass
made, offset = [], 0
while offset < len(events):  # struct inotify_event: wd, mask, cookie, len, name
    wd, _, _, size = struct.unpack_from("iIII", events, offset)
    name = events[offset + 16 : offset + 16 + size].rstrip(b"\0").decode(errors="replace")
    protected = (".git", ".obsidian", *(("vault-runner.toml",) if watched[wd] == "." else ()))
    made += [f"{watched[wd]}/{name}"] if name.lower().rstrip(". ") in protected else []
    offset += 16 + size
results["made, however briefly"] = made
print(json.dumps(results))

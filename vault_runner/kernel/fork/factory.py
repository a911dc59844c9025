"""The fork factory: one warm template per launch key, a forked kernel per note.

`ForkFactory` is a `KernelFactory` (kernel/factory.py). For each note it builds the
note's sandbox as the default factory does, works out the `TemplateKey` its kernel would
be launched under (vault, sandbox tier and what is fixed at launch: network, device
nodes, the Landlock folders; hash seed), and gives a `ForkedSession` bound to the
template of that key, started on first demand (or ahead, by `prewarm`, while the first
note is parsed) inside a sandbox of that key. Templates keep pre-initialised spare
kernels, so a note takes a kernel that only has to move into its folder.

A note the templates cannot serve gets a kernel started the normal way, and says why:
fork turned off (`VAULT_RUNNER_FORK=0`) or not possible here, a note whose folder lies
outside its vault, CUDA under Landlock (the CUDA driver writes into the kernel's own
/proc entry, which the template's ruleset names by the template's pid). Per-note limits
(memory, processes) are the note's own, applied to the forked kernel.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vault_runner.errors import ForkError, ForkUnavailable, KernelDied, SandboxError
from vault_runner.kernel.fork.common import (
    DEFAULT_MPLBACKEND,
    STARTUP_TIMEOUT,
    TemplateKey,
    fork_disabled_reason,
)
from vault_runner.kernel.fork.session import ForkedSession, finish_shutdowns
from vault_runner.kernel.fork.template import KernelTemplate
from vault_runner.kernel.sandbox import Policy, Sandbox, network, policy_from_options
from vault_runner.kernel.sandbox.cgroup import Cgroup
from vault_runner.kernel.sandbox.filesystem import PROTECTED_IN_VAULT
from vault_runner.kernel.sandbox.gpu import nvidia_device_nodes
from vault_runner.kernel.sandbox.policy import default_memory
from vault_runner.kernel.setup import kernel_env, prelude_code

__all__ = ("SPARES_ENV", "ForkFactory", "close_shared_fork_factory", "shared_fork_factory")

SPARES_ENV = "VAULT_RUNNER_FORK_SPARES"  # pre-initialised kernels per template (default 1)
MAX_TEMPLATES = 4  # templates are ~0.5 GB each with torch: the least recently used goes
MAX_SPARES = 4


class _Slot:
    """One template: started on a thread, waited for by the notes that need it."""

    def __init__(self, key: TemplateKey, sandbox: Sandbox, env: dict[str, str], spares: int) -> None:
        self.key = key
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vr-tpl-"))
        self.sandbox = sandbox
        self.env = env
        self.spares = spares
        self.template: KernelTemplate | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.used = time.monotonic()
        self.started_in: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._start, name="vault-runner-template-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        # This thread lives as long as the template: bubblewrap's --die-with-parent (a
        # parent-death signal) fires when the *thread* that started it ends.
        started = time.monotonic()
        try:
            policy = self.sandbox.policy
            template = KernelTemplate(
                self.key,
                env={},
                cwd=policy.vault or policy.cwd,
                runtime_dir=self.runtime_dir,
                startup_code=prelude_code(),  # the session's prelude, run before a note is known
                # Kernels of a sandbox cannot reach each other or the template (a plain
                # kernel can do all a user can: no_new_privs there would only break sudo).
                isolate=self.sandbox.tier != "plain",
            )
            self.sandbox.setup(self.runtime_dir, lambda: template.pid)
            if template.isolate:
                template.writable, template.device_files = _kernel_grants(self.sandbox, self.runtime_dir)
                template.landlock = _kernel_ruleset(self.sandbox, self.runtime_dir)
            template.launch_prefix = self.sandbox.wrap([], fork_template=True)
            template.harden = template.isolate and network.hardening_works()  # after its own namespaces
            template.names = self.sandbox.names_spec() if template.harden else None
            if self.sandbox.private_tmp is not None:  # the template's IPython profile is there
                template.keep_visible = [self.sandbox.private_tmp]
            template.env = {**self.env, **self.sandbox.env()}
            template.env.setdefault("MPLBACKEND", DEFAULT_MPLBACKEND)
            template.env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
            # Each spare joins a cgroup of its own while it waits, in the memory budget of
            # the notes to come; the note that takes it puts its caps on that one
            # (Sandbox.adopt_cgroup) instead of moving it.
            template.spare_cgroup = lambda: Cgroup.create(_spare_policy(policy))
            template.start()
            template.keep_spares(self.spares)
            self.template = template
            self.started_in = time.monotonic() - started
        except (ForkError, ForkUnavailable, SandboxError, OSError, ValueError) as exc:
            self.error = f"the kernel template could not be started: {exc}"
        finally:
            self.ready.set()
        self._stop.wait()
        if self.template is not None:
            self.template.close()

    def get(self, timeout: float) -> tuple[KernelTemplate | None, str | None]:
        self.used = time.monotonic()
        if not self.ready.wait(timeout):
            return None, f"the kernel template did not start within {timeout:g} s"
        if self.template is None:
            return None, self.error
        refusal = self.template.refusal()
        return (None, refusal) if refusal else (self.template, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(STARTUP_TIMEOUT)
        self.sandbox.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


class ForkFactory:
    """A KernelFactory that forks each note's kernel from a warm template. Thread-safe."""

    def __init__(self, *, spares: int | None = None, wait: float = STARTUP_TIMEOUT) -> None:
        self.spares = _spares() if spares is None else spares
        self.wait = wait
        self._lock = threading.Lock()
        self._slots: dict[TemplateKey, _Slot] = {}
        self._closed = False

    # -- KernelFactory ------------------------------------------------------------------------
    def __call__(self, cwd: Path, env: dict[str, str], note_options: Mapping[str, Any]) -> ForkedSession:
        try:
            sandbox = Sandbox(policy_from_options(cwd, env, note_options))
        except (SandboxError, ValueError) as exc:
            raise KernelDied(f"the kernel's sandbox could not be set up: {exc}") from None
        return self.session(sandbox, cwd, env)

    def session(self, sandbox: Sandbox, cwd: Path, env: dict[str, str]) -> ForkedSession:
        """A note's kernel in `sandbox` (its policy and limits), forked where a template can serve."""
        key, refusal = self.key_for(sandbox, env)
        if key is None:
            return ForkedSession(cwd, env, sandbox=sandbox, template=None, refusal=refusal)
        slot = self._slot(key, sandbox, env)
        return ForkedSession(
            cwd, env, sandbox=sandbox, template=lambda: slot.get(self.wait), runtime_dir=slot.runtime_dir
        )

    # -- templates ----------------------------------------------------------------------------
    def prewarm(self, vault_root: Path, note_options: Mapping[str, Any]) -> None:
        """Start the template a note of these options will need (e.g. the vault's defaults),
        on a thread, so it is ready by the time the first note has been read."""
        env = kernel_env(vault_root, None, note_options)
        try:
            sandbox = Sandbox(policy_from_options(vault_root, env, note_options))
        except (SandboxError, ValueError):
            return  # the note will say so when it starts
        try:
            key, _ = self.key_for(sandbox, env)
            if key is not None:
                self._slot(key, sandbox, env)
        finally:
            sandbox.close()

    def key_for(self, sandbox: Sandbox, env: Mapping[str, str]) -> tuple[TemplateKey | None, str | None]:
        """The template a kernel in `sandbox` can be forked from, or None and why not."""
        disabled = fork_disabled_reason()
        if disabled is not None:
            return None, disabled
        policy = sandbox.policy
        vault = policy.vault
        if vault is None or not policy.cwd.is_relative_to(vault):
            return None, "the note's folder is not inside its vault"
        gpu_nodes = policy.device != "cpu" and bool(nvidia_device_nodes())
        if sandbox.tier == "landlock" and gpu_nodes:
            return None, "CUDA kernels are started, not forked, in the landlock tier"
        layout: dict[str, Any] = {"gpu_nodes": gpu_nodes}
        if sandbox.tier in {"landlock", "bubblewrap"}:
            # What the template's sandbox was made from: its protected entries (both tiers),
            # and under Landlock the vault's top-level folders, each granted by name.
            layout["protected"] = [n for n in PROTECTED_IN_VAULT if _exists(vault / n)]
        if sandbox.tier == "landlock":
            layout["folders"] = sorted(
                e.name
                for e in vault.iterdir()
                if e.is_dir() and not e.is_symlink() and e.name not in PROTECTED_IN_VAULT
            )
        key = TemplateKey.for_launch(
            vault, sandbox.tier, env, network=policy.network, device="cpu" if not gpu_nodes else "auto", extra=layout
        )
        return key, None

    def _slot(self, key: TemplateKey, like: Sandbox, env: Mapping[str, str]) -> _Slot:
        stale: list[_Slot] = []
        with self._lock:
            if self._closed:
                raise KernelDied("vault-runner is shutting down; no kernel was started")
            slot = self._slots.get(key)
            if slot is not None and slot.ready.is_set() and slot.get(0)[0] is None and slot.template is not None:
                stale.append(self._slots.pop(key))  # it died: a new one
                slot = None
            if slot is None:
                slot = _Slot(key, _template_sandbox(like, key), _template_env(env, key), self.spares)
                self._slots[key] = slot
                while len(self._slots) > MAX_TEMPLATES:
                    oldest = min(self._slots, key=lambda k: self._slots[k].used)
                    stale.append(self._slots.pop(oldest))
            slot.used = time.monotonic()
        for old in stale:
            threading.Thread(target=old.close, name="vault-runner-template-close", daemon=True).start()
        return slot

    def describe(self) -> dict[str, Any]:
        """For `doctor`: whether kernels are forked, and the templates running now."""
        disabled = fork_disabled_reason()
        with self._lock:
            slots = list(self._slots.values())
        return {
            "kernels": "started" if disabled else "forked from a warm template",
            "why": disabled,
            "spares": self.spares,
            "templates": [
                {
                    "tier": s.sandbox.tier,
                    "network": s.sandbox.policy.network,
                    "running": s.template is not None and s.template.is_alive(),
                    "started_in_s": None if s.started_in is None else round(s.started_in, 2),
                    "error": s.error,
                    # True: each kernel has its own /dev/shm and IPC namespace; else why its
                    # kernels share the template's (None: not isolated, or not started yet)
                    "private_shm": s.template.info.get("private_shm") if s.template is not None else None,
                }
                for s in slots
            ],
        }

    def close(self) -> None:
        """End every template and the kernels forked from it. Idempotent."""
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
        finish_shutdowns()
        for slot in slots:
            slot.close()


def _exists(path: Path) -> bool:
    return path.exists() and not path.is_symlink()


def _spare_policy(template_policy: Policy) -> Policy:
    """The policy a spare's cgroup is made with: that of a note with no caps of its own, so
    that the note's sandbox can adopt it (the same budget's memory cgroup)."""
    budget = default_memory()[0]
    return dataclasses.replace(template_policy, memory=budget, budget=budget)


def _template_sandbox(like: Sandbox, key: TemplateKey) -> Sandbox:
    """The template's own sandbox: the note's tier and launch-time policy, no per-note limits
    (each forked kernel gets its own), the device nodes when its notes may use a GPU."""
    policy = like.policy
    vault = policy.vault or policy.cwd
    device = "cpu" if key.device_class == "cpu" else "template"  # binds the nodes, claims no GPU
    template_policy = Policy(vault=vault, cwd=vault, network=policy.network, memory=None, max_tasks=None, device=device)
    return Sandbox(template_policy, tier=like.tier, watch_vault=False)  # its kernels' own sandboxes watch


def _kernel_grants(sandbox: Sandbox, runtime_dir: Path) -> tuple[list[str], list[str]]:
    """What a forked kernel may write besides its own folder: the sandbox's own grants
    (Sandbox.landlock_spec) less the template's runtime folder, where every kernel has its
    folder; under bubblewrap the vault whole (its protected entries are read-only mounts)
    and /dev/shm and /dev/pts: the kernel's own where it could make them (mounts.py
    `enter_own_devices`, before these grants are made), else bubblewrap's."""
    spec = sandbox.landlock_spec()
    files = [*spec["files"], "/dev/pts"]
    if sandbox.tier == "landlock":
        return [p for p in spec["write"] if not Path(p).is_relative_to(runtime_dir)], files
    policy = sandbox.policy
    return [str(p) for p in dict.fromkeys([policy.vault or policy.cwd, policy.cwd])] + ["/dev/shm"], files


def _kernel_ruleset(sandbox: Sandbox, runtime_dir: Path) -> dict[str, Any] | None:
    """The Landlock ruleset each forked kernel applies itself, where its template runs outside
    Landlock (`Sandbox.forks_apply_landlock`), else None: a started kernel's
    (Sandbox.landlock_spec), narrowed as `_kernel_grants`: it writes its own folder (child.py
    adds it) instead of the template's runtime folder, which it may still read, as under a
    nested domain (the IPython profile the template initialised is there)."""
    if not sandbox.forks_apply_landlock:
        return None
    spec = sandbox.landlock_spec()
    write, files = _kernel_grants(sandbox, runtime_dir)
    read = [*spec["read"], *(p for p in spec["write"] if p not in write)]
    return {**spec, "read": read, "write": write, "files": list(dict.fromkeys(files))}


def _template_env(env: Mapping[str, str], key: TemplateKey) -> dict[str, str]:
    """The environment a kernel of this key is launched with, less what is per note."""
    out = {k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"}
    out.update({k: v for k, v in env.items() if k not in {"VAULT_RUNNER_NOTE"}})
    if key.hash_seed == "random":
        out.pop("PYTHONHASHSEED", None)
    else:
        out["PYTHONHASHSEED"] = key.hash_seed
    return out


def _spares() -> int:
    try:
        return max(0, min(MAX_SPARES, int(os.environ.get(SPARES_ENV, "1"))))
    except ValueError:
        return 1


_shared: ForkFactory | None = None
_shared_lock = threading.Lock()


def shared_fork_factory() -> ForkFactory:
    """The process's fork factory (its templates are closed at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ForkFactory()
            atexit.register(_shared.close)
        return _shared


def close_shared_fork_factory() -> None:
    """End the process's templates and their kernels now (a one-shot command is done:
    nothing of it may keep running); a later note starts a new template."""
    global _shared
    with _shared_lock:
        factory, _shared = _shared, None
    if factory is not None:
        atexit.unregister(factory.close)
        factory.close()

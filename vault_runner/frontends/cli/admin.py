"""`vault-runner doctor`, `trust` and `untrust`: what this machine offers, and which vaults
may run code in the background (watch/serve). `run`/`render`/`test` need no trust: typing
them is the user's consent."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

from vault_runner import __version__
from vault_runner.disk import trust
from vault_runner.disk.vault import find_root
from vault_runner.engine.machine import doctor_report, kernel_start, nvidia_device_nodes
from vault_runner.errors import VaultError
from vault_runner.frontends.cli.main import default_vault, vault_command

EXIT_OK, EXIT_USAGE = 0, 2


def _torch_lines() -> list[tuple[str, str]]:
    """Torch and its devices, asked in a child process: importing torch here costs a second
    and a CUDA context, and a broken driver must not take doctor down with it."""
    probe = (
        "import json, torch\n"
        "out = {'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'cuda': torch.cuda.is_available(),\n"
        "       'devices': [], 'mps': bool(getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available())}\n"
        "if out['cuda']:\n"
        "    for i in range(torch.cuda.device_count()):\n"
        "        p = torch.cuda.get_device_properties(i)\n"
        "        out['devices'].append(f'cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB')\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return [("torch", f"could not be checked ({exc})")]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [("torch", f"not importable: {last}")]
    import json

    info = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [("torch", f"{info['torch']} (CUDA build: {info['cuda_build'] or 'none'})")]
    devices = ["cpu"]
    devices += info["devices"]
    if info["mps"]:
        devices.append("mps")
    lines.append(("devices", "; ".join(devices)))
    if not info["cuda"] and nvidia_device_nodes():
        lines.append(("warning", "NVIDIA device nodes exist, but torch cannot use CUDA (driver or build mismatch?)"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        lines.append(("CUDA_VISIBLE_DEVICES", visible))
    return lines


def doctor_lines() -> list[tuple[str, str]]:
    lines = [
        ("vault-runner", __version__),
        ("python", f"{platform.python_version()} at {sys.executable}"),
        ("system", f"{platform.system()} {platform.release()} {platform.machine()}"),
    ]
    lines += _torch_lines()
    lines += doctor_report().lines
    lines.append(("kernels", kernel_start()))
    lines.append(("trust store", str(trust.config_dir() / "trusted-vaults.json")))
    trusted = trust.trusted_vaults()
    lines.append(("trusted vaults", ", ".join(str(v) for v in trusted) if trusted else "none"))
    return lines


def cmd_doctor(args: argparse.Namespace) -> int:
    lines = doctor_lines()
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


def _vault_root(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise VaultError(path, "does not exist; give the vault's folder")
    if not path.is_dir():
        raise VaultError(path, "is a file; give the vault's folder")
    return find_root(path)


def cmd_trust(args: argparse.Namespace) -> int:
    root = _vault_root(default_vault(args.vault))
    trust.trust(root)
    print(f"trusted {root}: `vault-runner watch` and `serve` will run its notes' code")
    return EXIT_OK


def cmd_untrust(args: argparse.Namespace) -> int:
    given = default_vault(args.vault)
    root = _vault_root(given) if Path(given).expanduser().exists() else Path(given).expanduser()
    if not trust.is_trusted(root):
        print(f"{root} was not trusted; nothing to do")
        return EXIT_OK
    trust.untrust(root)
    print(f"untrusted {root}: `watch` and `serve` will no longer run its code")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor", help="show Python, torch, devices, the sandbox tier and the limits kernels run under"
    )
    doctor.set_defaults(func=cmd_doctor)

    trust_cmd = vault_command(
        sub, "trust", help="let `watch` and `serve` run the code of a vault's notes (stored in your config folder)"
    )
    trust_cmd.set_defaults(func=cmd_trust)
    untrust_cmd = vault_command(sub, "untrust", help="take back `trust` for a vault")
    untrust_cmd.set_defaults(func=cmd_untrust)

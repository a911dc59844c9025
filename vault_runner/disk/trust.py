"""Which vaults the user trusts to execute code in the background (DESIGN.md contract 6).

Trust lives in the user's config directory, never inside the vault: a cloned vault is
written by someone else, so it must not be able to declare itself trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

CONFIG_DIR_ENV = "VAULT_RUNNER_CONFIG_DIR"


def config_dir() -> Path:
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_config_dir("vault-runner"))


def trust_file() -> Path:
    """Where the trust store is: the user's config dir, never a vault."""
    return config_dir() / "trusted-vaults.json"


def trusted_vaults(store: Path | None = None) -> list[Path]:
    try:
        data = json.loads((store or trust_file()).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return []
    return [Path(p) for p in data.get("vaults", []) if isinstance(p, str)]


def is_trusted(root: Path, store: Path | None = None) -> bool:
    """`store`: a trust file read at start (a long-running server keeps asking the same one)."""
    return root.resolve() in {p.resolve() for p in trusted_vaults(store)}


def _save(vaults: list[Path]) -> None:
    path = trust_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"vaults": sorted({str(v) for v in vaults})}, indent=2), encoding="utf-8")
    os.chmod(temp, 0o600)
    os.replace(temp, path)


def trust(root: Path) -> None:
    vaults = trusted_vaults()
    resolved = root.resolve()
    if resolved not in vaults:
        _save([*vaults, resolved])


def untrust(root: Path) -> None:
    resolved = root.resolve()
    _save([v for v in trusted_vaults() if v.resolve() != resolved])


def untrusted_message(root: Path) -> str:
    return (
        f"{root}: this vault is not trusted, so vault-runner will not execute its code in the "
        f"background; if you trust its notes, run `vault-runner trust {root}`"
    )

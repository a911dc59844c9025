"""`vault-runner obsidian install VAULT`: put the Obsidian plugin into a vault, enable it if asked.

The built plugin (main.js, manifest.json, styles.css) ships inside this package
(vault_runner/frontends/obsidian_plugin), so no Node is needed. It is copied into
`VAULT/.obsidian/plugins/vault-runner/`, replacing an older copy; then, only if the user
says yes (a prompt, or `--enable` for scripts), `vault-runner` is added to
`.obsidian/community-plugins.json`, the list of plugins Obsidian turns on. Nothing is
enabled silently: installing code into a vault is the user's call.

The vault is someone else's folder (a cloned vault is written by whoever wrote it): every
folder on the way is opened from the vault root without following a symlink and every file
is written by disk/atomic.py, so a `.obsidian` that is a symlink, or a plugin folder that
points elsewhere, is refused and nothing is written outside the vault.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vault_runner.disk.atomic import Folder, read_file, write_attachment, write_if_unchanged
from vault_runner.errors import VaultError, WriteConflict
from vault_runner.frontends.cli.main import VAULT_HELP, default_vault, vault_command
from vault_runner.model import EXIT_OK, EXIT_USAGE

__all__ = ("PLUGIN_ID", "add_commands", "install", "shipped_plugin")

PLUGIN_ID = "vault-runner"
_FILES = ("main.js", "manifest.json", "styles.css")


def shipped_plugin() -> dict[str, bytes]:
    """The plugin's files as this package ships them, by name."""
    folder = resources.files("vault_runner.frontends.obsidian_plugin")
    return {name: folder.joinpath(name).read_bytes() for name in _FILES}


def _enabled_list(root: Path) -> tuple[bytes | None, list[str]]:
    """community-plugins.json as it is (None: there is none) and the ids it lists."""
    path = root / ".obsidian" / "community-plugins.json"
    try:
        data = read_file(path, root=root)
    except FileNotFoundError:
        return None, []
    try:
        listed = json.loads(data.decode("utf-8")) if data.strip() else []
    except (UnicodeDecodeError, ValueError):
        listed = None
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise VaultError(path, "is not a JSON list of plugin ids; fix it in Obsidian (Settings → Community plugins)")
    return data, listed


def _enable(root: Path) -> bool:
    """Add the plugin to community-plugins.json (compare-and-swap); False when it was there already."""
    path = root / ".obsidian" / "community-plugins.json"
    for _attempt in range(10):
        old, listed = _enabled_list(root)
        if PLUGIN_ID in listed:
            return False
        new = (json.dumps([*listed, PLUGIN_ID], indent=2) + "\n").encode("utf-8")
        if old is None:
            write_attachment(path, new, root=root)
            return True
        try:
            write_if_unchanged(path, old, new, root=root)
        except WriteConflict:
            continue  # Obsidian saved it meanwhile: add ours to what it wrote
        return True
    raise VaultError(path, "kept changing while vault-runner tried to update it; close Obsidian and try again")


def install(root: Path, confirm: Callable[[], bool]) -> tuple[list[str], bool | None]:
    """Copy the plugin into the vault at `root`; enable it if `confirm()` says so.

    Returns the files written (unchanged ones are not rewritten) and whether it was enabled
    now (None: it was enabled already, so nobody was asked). VaultError when the vault is not
    an Obsidian vault or a folder on the way is a symlink.
    """
    if not (root / ".obsidian").is_dir() or (root / ".obsidian").is_symlink():
        raise VaultError(
            root / ".obsidian",
            "is not a folder here, so this is not an Obsidian vault (or its settings folder is a link); open the "
            "folder as a vault in Obsidian once, then install again",
        )
    target = root / ".obsidian" / "plugins" / PLUGIN_ID
    with Folder(target, root, create=True) as folder:
        folder.check_inside()
    written = [name for name, data in shipped_plugin().items() if write_attachment(target / name, data, root=root)]
    _, listed = _enabled_list(root)
    if PLUGIN_ID in listed:
        return written, None
    return written, _enable(root) if confirm() else False


def _ask(console: Console) -> bool:
    if not sys.stdin.isatty():
        return False  # nobody to ask: never enable without a yes
    console.print(
        "Enable the plugin in this vault now? It runs inside Obsidian and talks to `vault-runner serve`. [y/N] ",
        end="",
    )
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_install(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    vault = default_vault(args.vault)
    root = Path(vault).absolute()
    if not root.is_dir():
        console.print(f"[red]error[/] {escape(vault)}: there is no such folder; give the vault's folder")
        return EXIT_USAGE

    def confirm() -> bool:
        return bool(args.enable) or _ask(console)

    try:
        written, enabled = install(root, confirm)
    except (VaultError, OSError) as exc:
        message = exc.one_line() if isinstance(exc, VaultError) else f"{root}: {exc}"
        console.print(f"[red]error[/] {escape(message)}; nothing was enabled")
        return EXIT_USAGE
    where = root / ".obsidian" / "plugins" / PLUGIN_ID
    what = f"updated {', '.join(written)}" if written else "already up to date"
    console.print(f"installed the vault-runner plugin in {escape(str(where))} ({what})")
    if enabled is None:
        console.print("it is enabled in this vault; reload Obsidian (or the plugin) to use the new version")
    elif enabled:
        console.print(
            "enabled it in .obsidian/community-plugins.json; in Obsidian, turn off Restricted mode "
            "(Settings → Community plugins) if it is on, then reload"
        )
    else:
        console.print(
            "not enabled: turn it on in Obsidian (Settings → Community plugins → Vault Runner), "
            f"or run `vault-runner obsidian install {escape(vault)} --enable`"
        )
    console.print(f"next: `vault-runner trust {escape(vault)}` once, then `vault-runner serve {escape(vault)}`")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    obsidian = sub.add_parser(
        "obsidian",
        help="install the Obsidian plugin into a vault",
        description="The Obsidian plugin of vault-runner (it ships with this package; no Node needed).",
    )
    actions = obsidian.add_subparsers(dest="obsidian_command", required=True, metavar="ACTION")
    install_parser = vault_command(
        actions,
        "install",
        vault_help="the vault folder (the one holding .obsidian/); " + VAULT_HELP,
        help="copy the plugin into VAULT/.obsidian/plugins/vault-runner (enable it if you say yes)",
        description="Copy the plugin into VAULT/.obsidian/plugins/vault-runner/, replacing an older copy. It is "
        "enabled (added to .obsidian/community-plugins.json) only if you say yes when asked, or pass --enable.",
    )
    install_parser.add_argument(
        "--enable",
        "--yes",
        "-y",
        dest="enable",
        action="store_true",
        help="enable the plugin without asking (for scripts)",
    )
    install_parser.set_defaults(func=cmd_install)

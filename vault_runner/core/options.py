"""Execution options: defaults < vault config < frontmatter `execute:` < block `#|` lines.

Names follow Quarto where Quarto has one (DESIGN.md, contract 7).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vault_runner.errors import OptionError

OPT_IN_PROPERTY = "vault-runner"
FRONTMATTER_OPTIONS_KEY = "execute"

DEFAULTS: dict[str, Any] = {
    "eval": True,  # run the block at all
    "output": True,  # write what it printed/displayed into the note
    "error": True,  # keep going after a block raises (False: stop the note there)
    "warning": True,  # show Python warnings
    "timeout": 300,  # seconds per block
    "seed": None,  # seed python, numpy and torch before the first block
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "label": None,
    "raises": None,  # exception name a block is expected to raise (vault-runner test)
    "compare": False,  # compare text output with the stored one (vault-runner test)
    "output-lines": 400,  # longest text output kept before it is truncated
    "network": True,  # sandbox: allow network access from the kernel
    "deterministic": False,  # deterministic torch algorithms, CUBLAS workspace config
    "gpu-memory-fraction": None,  # per-kernel cap of CUDA memory (0 < f <= 1)
    "memory": None,  # kernel memory cap, e.g. "8G"
    "gpus": None,  # GPUs a note reserves on a Ray cluster (0.5, 1, 2); None: 1 for device cuda, else 0
}

# Options that describe the kernel of a whole note; a `#|` line cannot change them.
NOTE_LEVEL = frozenset({"seed", "device", "network", "deterministic", "gpu-memory-fraction", "memory", "gpus"})
# Options that cannot change what a block outputs; kept out of the staleness hash.
# `gpus` only says where a note is scheduled, not what it computes.
NOT_HASHED = frozenset({"label", "raises", "compare", "timeout", "gpus"})

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*[KMGT]?i?B?$", re.IGNORECASE)


def _check(name: str, value: Any) -> Any:
    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise OptionError(f"option `{name}` must be {what}, not {value!r}", option=name)

    if name in {"eval", "output", "error", "warning", "compare", "network", "deterministic"}:
        expect(isinstance(value, bool), "true or false")
    elif name == "timeout":
        expect(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, "a number of seconds above 0"
        )
    elif name == "seed":
        expect(value is None or (isinstance(value, int) and not isinstance(value, bool)), "a whole number")
    elif name == "device":
        expect(isinstance(value, str) and bool(_DEVICE_RE.match(value)), "auto, cpu, cuda, cuda:N or mps")
    elif name == "output-lines":
        expect(isinstance(value, int) and not isinstance(value, bool) and value >= 10, "a whole number of at least 10")
    elif name == "gpu-memory-fraction":
        expect(value is None or (isinstance(value, (int, float)) and 0 < value <= 1), "a number between 0 and 1")
    elif name == "gpus":
        expect(
            value is None
            or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1)
            or (isinstance(value, int) and not isinstance(value, bool) and value > 1),
            "a number of GPUs: a fraction between 0 and 1, or a whole number",
        )
    elif name == "memory":
        expect(value is None or (isinstance(value, str) and bool(_MEMORY_RE.match(value))), "a size such as 4G or 512M")
    elif name in {"label", "raises"}:
        expect(value is None or isinstance(value, str), "text")
    return value


class OptionWarning(str):
    """A warning about one option: its text, with the option's `name` and the layer it came from."""

    name: str
    origin: str  # vault config | frontmatter | block

    def __new__(cls, message: str, name: str, origin: str) -> OptionWarning:
        warning = super().__new__(cls, message)
        warning.name, warning.origin = name, origin
        return warning


@dataclass(frozen=True)
class Resolved:
    values: Mapping[str, Any]
    warnings: tuple[OptionWarning, ...] = field(default=())

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def hashed(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in NOT_HASHED}


# A security option is never ignored: a flat `network: false` property (what Obsidian's
# Properties panel writes) counts as if it were under `execute:`, which still wins.
TOP_LEVEL_OPTIONS = frozenset({"network"})


def frontmatter_options(frontmatter: Mapping[str, Any]) -> Mapping[str, Any]:
    options = frontmatter.get(FRONTMATTER_OPTIONS_KEY)
    if options is not None and not isinstance(options, Mapping):
        raise OptionError(
            f"the `{FRONTMATTER_OPTIONS_KEY}` property must hold options such as `seed: 42`",
            option=FRONTMATTER_OPTIONS_KEY,
            origin="frontmatter",
        )
    flat = {name: frontmatter[name] for name in TOP_LEVEL_OPTIONS if name in frontmatter}
    if not flat:
        return options or {}
    return {**flat, **(options or {})}


def resolve(
    config_defaults: Mapping[str, Any],
    frontmatter: Mapping[str, Any],
    block: Mapping[str, Any] | None = None,
) -> Resolved:
    """Merge the option layers; raise OptionError on a bad value."""
    values = dict(DEFAULTS)
    warnings: list[OptionWarning] = []
    layers = [("vault config", config_defaults), ("frontmatter", frontmatter_options(frontmatter))]
    if block is not None:
        layers.append(("block", block))
    for origin, layer in layers:
        for name, value in layer.items():
            if name not in DEFAULTS:
                warnings.append(OptionWarning(f"unknown option `{name}` in {origin} is ignored", name, origin))
                continue
            try:
                _check(name, value)
            except OptionError as exc:
                exc.origin = origin
                raise
            if origin == "block" and name in NOTE_LEVEL:
                warnings.append(
                    OptionWarning(f"option `{name}` applies to the whole note; set it in the frontmatter", name, origin)
                )
                continue
            values[name] = value
    return Resolved(values, tuple(warnings))


def opted_in(frontmatter: Mapping[str, Any], relative_path: str, include: list[str], exclude: list[str]) -> bool:
    """A note runs when its property says so, or when the vault config includes its folder."""
    flag = frontmatter.get(OPT_IN_PROPERTY)
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, str) and flag.strip().lower() in {"true", "yes", "on"}:
        return True
    if isinstance(flag, str) and flag.strip().lower() in {"false", "no", "off"}:
        return False
    if any(glob_match(p, relative_path) for p in exclude):
        return False
    return any(glob_match(p, relative_path) for p in include)


def glob_match(pattern: str, path: str) -> bool:
    """Match a vault-relative POSIX path against a glob with `**`; a folder matches its notes."""
    regex = _glob_regex(pattern.strip().strip("/"))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(regex.fullmatch(candidate) for candidate in candidates)


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))

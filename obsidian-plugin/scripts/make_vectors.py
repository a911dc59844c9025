#!/usr/bin/env python3
"""Generate obsidian-plugin/test/vectors/splice-vectors.json from the Python splice.

The TypeScript region logic (src/regions.ts) must give the same bytes as the engine for the
same input: this script runs the engine's own matching (`Runner._regions_for`: blocks found
again by code, occurrence by occurrence, hand-edited regions left alone) and splice
(`note.splice` with `removable_orphans`, `note.region_lines`) on generated notes, and records input and output.
test/vectors/README.md describes the file; test/vectors.test.ts consumes it.

    python obsidian-plugin/scripts/make_vectors.py [--cases N] [--seed S] [--out PATH]

Run from the repository root with vault_runner importable (pip install -e .).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vault_runner.core import note as notes  # parse_note, splice, region_lines, removable_orphans, code_hash
from vault_runner.core.plan import PlannedBlock
from vault_runner.engine.writeback import WriteBack  # its _regions_for matches blocks again by code

_WRITER = WriteBack

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "test" / "vectors" / "splice-vectors.json"

PROSE = [
    "Some prose.",
    "# Título",
    "",
    "- a list item",
    "Trailing spaces   ",
    "\ttabbed line",
    "emoji 🧪 and ñ",
    "<!-- a comment of the user -->",
    "| a | b |",
    "```js\nconsole.log(1)\n```",  # a closed fence that is not python
]
CODES = [
    "x = 1\nprint(x)\n",
    "print('hola')\n",
    "#| eval: false\nimport os\n",
    "for i in range(3):\n    print(i)\n",
    "y = [1,\n     2]\n",
    "print('🧪')\n",
    "\n",
    "pass\n",
]
BODIES = [
    "```\n1\n```\n",
    "```\nhola\n```\n",
    "> [!failure] ValueError: no\n> trace\n",
    "```\na\n\nb\n```\n",
    "plain markdown **bold**\n",
    "```\n🧪\n```\n",
    "",
    "```\n<!\u200b-- vault-runner:end sum=000 -->\n```\n",
]


def _block(rng: random.Random, code: str, prefix: str, eol: str, fence: str, region: str | None, hand_edit: bool) -> list[str]:
    info = rng.choice(["python", "py", "python3", "{python}", "Python title=x", "ipython"])
    lines = [prefix + fence + info]
    for line in code.split("\n")[:-1]:
        lines.append((prefix + line) if line else prefix.rstrip())
    lines.append(prefix + fence)
    if region is not None:
        if rng.random() < 0.3:
            lines.append(prefix.rstrip())  # a blank line between fence and region
        block = SimpleNamespace(prefix=prefix, eol="")
        body_lines = [line for line in notes.region_lines(block, "0123abcd4567", region)]
        if hand_edit and len(body_lines) > 1:
            body_lines.insert(1, prefix + "my own note inside the region")
        lines.extend(body_lines)
    return [line + eol for line in lines]


def make_note(rng: random.Random) -> tuple[str, list[str]]:
    eol = rng.choice(["\n", "\n", "\r\n", "\r"])
    out: list[str] = []
    if rng.random() < 0.3:
        out += ["---" + eol, "vault-runner: true" + eol, rng.choice(["---", "..."]) + eol]
    codes: list[str] = []
    for _ in range(rng.randint(0, 5)):
        for _ in range(rng.randint(0, 2)):
            out.append(rng.choice(PROSE).replace("\n", eol) + eol)
        code = rng.choice(CODES)
        prefix = rng.choice(["", "", "> ", "    ", "- ", ">", "> > "])
        if prefix == "- ":
            out.append("- item" + eol)
            prefix = "  "
        fence = rng.choice(["```", "```", "~~~", "````"])
        region = rng.choice([None, None, rng.choice(BODIES)])
        out += _block(rng, code, prefix, eol, fence, region, rng.random() < 0.15)
        if ">" in prefix:
            out.append(eol)  # end the blockquote
        codes.append(code)
    if rng.random() < 0.2:
        out.append(rng.choice(PROSE).replace("\n", eol) + eol)
    text = "".join(out)
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")  # no final newline
    if rng.random() < 0.1:
        text = "\ufeff" + text
    if rng.random() < 0.05:
        text += eol + "```python" + eol + "never closed" + eol
    return text, codes


def mutate(rng: random.Random, text: str) -> str:
    """What the note-taker did while the run was in flight."""
    lines = notes.split_lines(text)
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        at = rng.randint(0, len(lines))
        if kind < 0.4:
            lines.insert(at, rng.choice(["typed while it ran\n", "more\n", "print('edit')\n"]))
        elif kind < 0.6 and lines:
            del lines[min(at, len(lines) - 1)]
        elif kind < 0.8 and lines:
            i = min(at, len(lines) - 1)
            lines[i] = notes._strip_ending(lines[i]) + " typed" + (lines[i][len(notes._strip_ending(lines[i])) :])
        else:
            chunk = lines[at : at + rng.randint(1, 8)]
            lines[at:at] = chunk  # a pasted duplicate
    return "".join(lines)


def run_updates(rng: random.Random, ran_note: Any) -> list[dict[str, Any]]:
    updates = []
    previous = ""
    for block in ran_note.blocks:
        evaluated = not block.code.startswith("#| eval: false")
        code_hash = None
        if evaluated:
            code_hash = notes.code_hash(previous, block.code, {})
            previous = code_hash
        region = rng.choice(BODIES) if evaluated and rng.random() < 0.85 else None
        updates.append({"index": block.index, "code": block.code, "code_hash": code_hash, "region": region})
    return updates


def python_splice(current_text: str, updates: list[dict[str, Any]], force: bool) -> dict[str, Any]:
    note = notes.parse_note(current_text)
    if note.problems:
        return {"expected": current_text, "applied": [], "unwritten": [], "hand_edited": [], "problem": True}
    ran = []
    by_report = {}
    for update in updates:
        block = SimpleNamespace(index=update["index"], code=update["code"])
        planned = PlannedBlock(block, {}, update["code_hash"])
        result = None
        if update["region"] is not None:
            result = SimpleNamespace(
                rendered=SimpleNamespace(body=update["region"]),
                report=SimpleNamespace(status="ok", message=None),
            )
        ran.append((planned, result))
        by_report[update["index"]] = SimpleNamespace(note="note.md")
    runner = SimpleNamespace(force=force)
    regions, _old_links, unwritten, matched = _WRITER._regions_for(runner, note, ran, by_report)  # type: ignore[arg-type]
    applied = sorted(p for p, c in matched.items() if c in regions)
    hand_edited = sorted(p.block.index for p, r in ran if r is not None and r.report.status == "hand-edited")
    return {
        # as write_back does: orphaned regions exactly as we wrote them are removed too
        "expected": notes.splice(note, regions, notes.removable_orphans(note)),
        "applied": applied,
        "unwritten": sorted(unwritten),
        "hand_edited": hand_edited,
        "problem": False,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=20260601)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    cases = []
    for n in range(args.cases):
        ran_text, _ = make_note(rng)
        ran_note = notes.parse_note(ran_text)
        updates = run_updates(rng, ran_note)
        current = mutate(rng, ran_text) if rng.random() < 0.7 else ran_text
        force = rng.random() < 0.1
        result = python_splice(current, updates, force)
        expected: str = result.pop("expected")
        cases.append(
            {
                "name": f"case-{n:04d}",
                "text": current,
                "updates": updates,
                "force": force,
                "expected": expected,
                "expected_sha256": hashlib.sha256(expected.encode("utf-8", "surrogatepass")).hexdigest(),
                **result,
            }
        )
    payload = {"version": FORMAT_VERSION, "generator": "obsidian-plugin/scripts/make_vectors.py", "seed": args.seed, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, ensure_ascii=True, separators=(",", ":")) + "\n", encoding="ascii")
    print(f"{args.out}: {len(cases)} cases", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

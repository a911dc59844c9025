"""What the repository ships cites only what a clone holds (issue 15 review)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

SHIPPED = ("docs/openapi.json", "obsidian-plugin/PROTOCOL.md", ".pre-commit-hooks.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_no_shipped_text_cites_a_file_or_a_tag_a_clone_does_not_have(name: str) -> None:
    text = (REPO / name).read_text(encoding="utf-8")
    if not (REPO / "DESIGN.md").exists():
        assert "DESIGN.md" not in text, f"{name} cites DESIGN.md, which a clone does not have"
    assert "<a tag>" not in text, f"{name} asks for a tag; none is released: pin a commit"


def test_the_readme_says_what_the_test_install_line_installs() -> None:
    """`pip install torch==2.13.0` is the CUDA build from PyPI on Linux, and `.[test,ray]` installs Ray."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    said = readme[readme.index("What it installs:") :].split("\n\n", 1)[0]
    assert "the CPU build of torch" not in said
    assert "Ray" in said

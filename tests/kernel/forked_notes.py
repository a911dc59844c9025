"""The fork tests' harness: notes of one vault, each run in a kernel forked from one template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from vault_runner.kernel.fork.factory import ForkFactory
from vault_runner.kernel.fork.session import ForkedSession
from vault_runner.kernel.sandbox import Policy, Sandbox


class ForkedNotes:
    """Notes of one vault in a sandbox tier, each in its own kernel from one factory."""

    def __init__(self, root: Path, tier: str, spares: int = 1) -> None:
        self.root, self.tier = root, tier
        self.factory = ForkFactory(spares=spares)

    def session(self) -> ForkedSession:
        """A started session of a note in the vault's folder N, certainly forked."""
        policy = Policy(vault=self.root, cwd=self.root / "N", network=True, device="cpu")
        session = self.factory.session(Sandbox(policy, self.tier), policy.cwd, {"VAULT_RUNNER_VAULT": str(self.root)})
        session.start()
        assert session.origin == "forked", session.fallback
        return session

    def run(self, session: ForkedSession, code: str) -> dict:
        """Run `code`, which ends by printing one JSON object; that object."""
        done = session.execute(code, timeout=120)
        text = "".join(o.get("text", "") for o in done.outputs if o.get("name") == "stdout")
        assert done.status == "ok", done.outputs
        return json.loads(text.strip().splitlines()[-1])


def forked_notes(
    kind: type[ForkedNotes], request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ForkedNotes]:
    """A module fixture's body: `kind` in a fresh vault for the tier `request.param`."""
    root = tmp_path_factory.mktemp(f"vault-{request.param}").resolve()
    (root / "N").mkdir()
    made = kind(root, request.param)
    try:
        yield made
    finally:
        made.factory.close()

"""schemathesis against the served OpenAPI document, on a live server: no 5xx, no schema violation.

Bounded: few examples per operation, no deadline; a vault of trivial notes and a kernel
cap of 1, so a generated request that happens to name a real note runs in milliseconds.
The event stream is left out (it never ends, by design); tests/frontends/api/test_server.py covers it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation

from tests.conftest import make_note_vault, using_config_dir
from tests.frontends.api.test_server import TOKEN, serving
from vault_runner.disk import trust
from vault_runner.frontends.api.app import ApiServer

pytestmark = pytest.mark.kernel

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRIVIAL = """
    ---
    vault-runner: true
    ---
    ```python
    1 + 1
    ```
    """


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = make_note_vault(
        tmp_path_factory.mktemp("vault"),
        {"a.md": TRIVIAL, "Folder/b.md": TRIVIAL, "PyTorch/01 Tensores.md": TRIVIAL, "plain.md": "no code\n"},
    )
    with using_config_dir(tmp_path_factory.mktemp("config")):
        with serving(root, max_kernels=1, spares=0) as (server, _runner, _app):
            server.root = root  # type: ignore[attr-defined]
            yield server


@pytest.fixture(autouse=True)
def _trusted(request: pytest.FixtureRequest, _isolated_config: None) -> None:
    if "live" in request.fixturenames:
        trust.trust(request.getfixturevalue("live").root)


def api_operations(live: ApiServer) -> list[APIOperation]:
    """Every operation of the served document but the event stream, which never ends by design."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=AUTH, timeout=60)
    schema = schema.exclude(path="/api/v1/events")
    return [result.ok() for result in schema.get_all_operations()]


def test_api_follows_its_openapi_document(live: ApiServer) -> None:
    # Drives schemathesis through its public strategy API: its pytest integration reaches into
    # pytest's private node attributes and broke with pytest 9.2 (AttributeError: _nodeid).
    operations = api_operations(live)
    assert len(operations) >= 8, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def follows(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={**(case.headers or {}), **AUTH}, timeout=120)

        try:
            follows()
        except Exception as error:  # noqa: BLE001 - collect every operation's finding, then fail once
            failures.append(f"{operation.label}: {type(error).__name__}: {error}")
    assert not failures, "\n\n".join(failures)

"""Moved to vault_runner.frontends.api; these names keep old imports working during the refactor.

`python -m vault_runner.server` still prints the OpenAPI document (docs/openapi.json).
"""

from vault_runner.frontends.api.app import ApiApp, ApiServer, create_app, main, openapi_spec
from vault_runner.frontends.api.codes import ERROR_CODES, RUN_ERROR_CODES
from vault_runner.frontends.api.events import EventHub, event_json
from vault_runner.frontends.api.routes import API_PREFIX

__all__ = (
    "API_PREFIX",
    "ERROR_CODES",
    "RUN_ERROR_CODES",
    "ApiApp",
    "ApiServer",
    "EventHub",
    "create_app",
    "event_json",
    "openapi_spec",
)

if __name__ == "__main__":  # pragma: no cover
    main()

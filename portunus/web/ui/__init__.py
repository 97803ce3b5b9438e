"""The Web UI: server-rendered pages on the operator HTTP listener, next to /v1.

One module per page group; each exposes ``routes``.  Pages call the control RPC
through the same helper as the /v1 routes, so every operation has one
implementation and the same error codes in the API and in a form.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from portunus.web.ui import (
    account,
    audit,
    clients,
    dashboard,
    metrics,
    owner_caps,
    render,
    rules,
    users,
)


def ui_routes() -> list[BaseRoute]:
    return [
        *render.routes,
        *account.routes,
        *dashboard.routes,
        *rules.routes,
        *clients.routes,
        *users.routes,
        *owner_caps.routes,
        *audit.routes,
        *metrics.routes,
    ]

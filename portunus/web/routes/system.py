"""/v1/health and /v1/openapi.json: the two routes that need no token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from portunus.control.rpc.caller import ControlCaller
from portunus.errors import PortunusError
from portunus.web.routes.common import endpoint, error_response, route

HEALTH_TIMEOUT = 3.0


@endpoint
async def health(request: Request) -> Response:
    """200 only when the control process answers ``health``: a load balancer or
    systemd check must see a wedged control process, not just a live web one."""
    main: ControlCaller = request.app.state.control
    probe = ControlCaller(main.socket_path, None, timeout=HEALTH_TIMEOUT)
    try:
        await probe.call("health")
    except PortunusError as err:
        return error_response(
            PortunusError("unavailable", f"control process not healthy: {err.message}")
        )
    except ValueError:  # a reply that is not JSON
        return error_response(
            PortunusError("unavailable", "control process sent an unreadable reply")
        )
    return JSONResponse({"status": "ok"})


@endpoint
async def openapi_json(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


routes = [route("/v1/health", GET=health), route("/v1/openapi.json", GET=openapi_json)]

"""Dependencies over ``app.state`` shared by the routers."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

import hmac

from ..errors import Forbidden, NotReady, Unauthorized


def server_state(request: Request):
    return request.app.state.server


State = Annotated[object, Depends(server_state)]


def ready_state(state: State):
    """The server state once the model is loaded; 503 before."""
    if not state.ready.is_set():
        detail = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        raise NotReady(detail)
    return state


Ready = Annotated[object, Depends(ready_state)]


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.get_secret_value().encode())


def check_access(request: Request, settings, admin: bool) -> None:
    """API keys are optional. With ``api_key`` set, every read route needs it (or the admin key); with
    ``admin_key`` set, admin routes need that one (a read key gets 403). With only ``api_key`` set, it opens
    the admin routes too. Keys are compared in constant time and never logged."""
    read_key, admin_key = settings.api_key, settings.admin_key
    if (admin and admin_key is None and read_key is None) or (not admin and read_key is None):
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key>)")
    if _matches(token, admin_key):
        return
    if _matches(token, read_key):
        if admin and admin_key is not None:
            raise Forbidden("this route needs the admin key")
        return
    raise Unauthorized("the API key is not valid")


def check_metrics(request: Request, settings) -> None:
    """With ``metrics_auth``, ``/metrics`` needs one of the keys that are set (read or admin); the settings
    refuse ``metrics_auth`` without any key. Off, it is open."""
    if not settings.metrics_auth:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key>)")
    if not (_matches(token, settings.api_key) or _matches(token, settings.admin_key)):
        raise Unauthorized("the API key is not valid")


def require_read(request: Request) -> None:
    check_access(request, request.app.state.server.settings, admin=False)


def require_admin(request: Request) -> None:
    check_access(request, request.app.state.server.settings, admin=True)


def require_metrics(request: Request) -> None:
    check_metrics(request, request.app.state.server.settings)


_CHECKS = {require_read: lambda r, s: check_access(r, s, admin=False),
           require_admin: lambda r, s: check_access(r, s, admin=True),
           require_metrics: check_metrics}


def route_check(route):
    """The access check a route declares (``require_read``, ``require_admin`` or ``require_metrics``, on the
    route or its router), or None for an open route."""
    stack = list(getattr(getattr(route, "dependant", None), "dependencies", ()))
    while stack:
        dependency = stack.pop()
        for declared, check in _CHECKS.items():
            if dependency.call is declared:
                return check
        stack.extend(dependency.dependencies)
    return None


def authorize(scope, settings) -> None:
    """Run the access check of the route that the router chose for ``scope`` (``scope["route"]``). The ASGI
    middleware calls it when the route first reads the body: FastAPI parses a declared body before it runs the
    route's dependencies, so without this an unauthenticated caller would get the body parsed and 422 field
    errors instead of 401. The dependencies still run (and still declare which key a route needs)."""
    check = route_check(scope.get("route"))
    if check is not None:
        check(Request(scope), settings)

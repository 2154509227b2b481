"""Who asked: the HTTP request being served, for the audit entries written while it is handled.

MONAI Label does not hand the HTTP request to ``app.infer`` or to the datastore; :class:`RequestContextMiddleware`
keeps the request's ASGI scope in a context variable for the duration of the request, and :func:`request_actor`
reads from it the authenticated user (``scope["state"]["user_name"]``, set by the access control when
authentication is on; None when it is off) and the client's address.
"""
from __future__ import annotations

import contextvars
import os
from typing import Any, Dict, Optional

__all__ = ["RequestContextMiddleware", "request_actor"]

_scope: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("adl_denoise_request_scope", default=None)


# ------------------------------------------------------------------------------------------------ who asked
class RequestContextMiddleware:
    """Pure ASGI middleware: the request's scope in a context variable while the request is handled (the route
    functions MONAI Label runs in worker threads see it: Starlette copies the context into them)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        token = _scope.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _scope.reset(token)


def request_actor() -> Dict[str, Any]:
    """``user`` (the verified token's user with authentication on, else None), ``authenticated``, ``client``
    (address of the HTTP client) and ``route``; outside a request (the training subprocess) ``process``."""
    scope = _scope.get()
    if scope is None:
        return {"user": None, "authenticated": False, "process": f"pid {os.getpid()} (no HTTP request)"}
    state = scope.get("state") or {}
    user = state.get("user_name")
    client = scope.get("client")
    return {"user": user, "authenticated": user is not None, "client": client[0] if client else None,
            "route": f"{scope.get('method', '')} {scope.get('path', '')}"}

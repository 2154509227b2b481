"""Access control for every route of the server, MONAI Label's stock routes and the app's own: who the caller is
(a verified token of the site's Keycloak realm) and which role the route needs.

Off by default (the single-user loopback demo, ``./run.sh``): nothing here is installed and :func:`current_user`
returns None. On with MONAI Label's own settings, ``MONAI_LABEL_AUTH_ENABLE=true`` and
``MONAI_LABEL_AUTH_REALM_URI`` (the realm's URL, whose JSON carries its RSA public key):

* :class:`AccessControlMiddleware` sits in front of the whole router (stock routes, the app's routes and the
  guards that ``install`` places before the stock routes), so no route can be reached without passing it. It
  matches (method, path) against :data:`ROUTE_ROLES`, verifies the bearer token (RS256 signature with the realm's
  public key, expiry, issuer, the client it was issued to, the audience where ``ADL_AUTH_TOKEN_AUDIENCE`` sets one,
  a user name), and answers ``401`` (no token, bad
  signature, expired, another algorithm, ``alg: none``, another realm or client) or ``403`` (role missing)
  itself, as JSON ``{"detail": ...}``. A (method, path) missing from the table needs the admin role: a route added
  later is closed until someone decides who may use it.
* Roles are ordered, each implying the ones below it: ``admin > reviewer > annotator > user`` (MONAI Label's role
  names, ``MONAI_LABEL_AUTH_ROLE_*``). A token's roles are expanded along that order (:func:`effective_roles`)
  before any check, here and in MONAI Label's own ``RBAC`` dependencies, which get the same verified user through
  ``dependency_overrides[get_current_user]``: the stock checks and this table never disagree about who the
  caller is.
* The verified user is kept on the request (``request.state.user_name``, ``user_roles``, ``user``):
  :func:`current_user` is what routes record as the reviewer or the user of an audit entry, never a name from the
  request body.

MONAI Label 0.8.5's own ``from_token`` calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 refuses for every
token (and which, with an older PyJWT, would accept whatever algorithm the token names): the verification here
pins RS256 and keeps MONAI Label's claim settings (``MONAI_LABEL_AUTH_TOKEN_USERNAME``, ``..._ROLES``, ...).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, List, Optional, Sequence

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import OAuth2PasswordRequestForm

__all__ = [
    "ADMIN", "ANNOTATOR", "AUTHENTICATED", "PUBLIC", "REVIEWER", "ROLE_ORDER", "ROUTE_ROLES", "TOKEN_ALGORITHMS",
    "USER", "AUDIENCE_ENV", "AccessControlMiddleware", "AccessDenied", "ISSUER_ENV", "auth_enabled", "current_user",
    "effective_roles", "expected_audience", "expected_issuer", "install_access_control", "login_router",
    "required_role", "role_name", "verify_token",
]

log = logging.getLogger(__name__)

# levels of the role table; ROLE_ORDER maps the four roles to MONAI Label's role names (settings)
PUBLIC = "public"                # no token: MONAI Label's "is auth on?" and the login
AUTHENTICATED = "authenticated"  # any valid token, no role: "is my token valid, which roles do I have?"
USER = "user"
ANNOTATOR = "annotator"
REVIEWER = "reviewer"
ADMIN = "admin"
ROLE_ORDER = (USER, ANNOTATOR, REVIEWER, ADMIN)  # lowest first; a role implies every role before it

# Signature algorithms accepted: Keycloak signs access tokens with RS256 by default. Pinned, so that a token naming
# "none" or an HMAC algorithm (with the public key as the "secret") is refused.
TOKEN_ALGORITHMS = ("RS256",)
# clock difference between the realm and this server tolerated on exp / nbf / iat, seconds
CLOCK_LEEWAY_S = 30
# the issuer tokens must name, where it differs from MONAI_LABEL_AUTH_REALM_URI (see expected_issuer)
ISSUER_ENV = "ADL_AUTH_TOKEN_ISSUER"
# the audience tokens must name (``aud``), when set: Keycloak puts the client in ``aud`` only with an audience mapper
# (its default access tokens carry "account"), so the check is on where the realm is configured for it (RFC 9068)
AUDIENCE_ENV = "ADL_AUTH_TOKEN_AUDIENCE"
# a signature that fails against the cached realm key triggers a refetch of the key at most this often, seconds
KEY_REFRESH_MIN_INTERVAL_S = 10.0
_key_refresh_lock = threading.Lock()
_key_refreshed_at: dict[str, float] = {}

# (methods, path template relative to MONAI_LABEL_API_STR, level); first match wins, so specific templates come
# before general ones. HEAD is allowed where GET is. The templates use Starlette's syntax ({name} is one path
# segment, {name:path} the rest of the path). Routes outside the API prefix are marked by ROOT_ROUTES.
ROUTE_ROLES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    # login (MONAI Label's /auth router, mounted only when auth is on)
    (("GET",), "/auth/", PUBLIC),
    (("POST",), "/auth/token", PUBLIC),
    (("GET",), "/auth/token/valid", AUTHENTICATED),
    # reading: app info, models' status, the datastore, sessions, logs of the work
    (("GET",), "/info/", USER),
    (("GET",), "/train/", USER),
    (("GET",), "/batch/infer", USER),
    (("GET",), "/scoring/", USER),
    (("GET",), "/datastore/", USER),
    (("GET",), "/datastore/image", USER),
    (("GET",), "/datastore/image/info", USER),
    (("GET",), "/datastore/label", USER),
    (("GET",), "/datastore/label/info", USER),
    (("GET",), "/datastore/dataset", ADMIN),  # the whole datastore as one ZIP: a data export, not a read
    (("GET",), "/review/", USER),
    (("GET",), "/review/audit/verify", USER),      # whether the audit chain is intact
    (("GET",), "/review/audit/entries", ADMIN),    # the whole audit log: every user's actions, every input
    (("GET",), "/review/{image_id}", USER),
    (("GET",), "/versions/{model}", USER),
    (("GET",), "/ohif/{path:path}", USER),
    (("GET",), "/proxy/dicom/{path:path}", USER),
    # any POST through the proxy stores into the PACS (STOW-RS): MONAI Label's WADO / QIDO / STOW prefixes are empty
    # by default, so POST /proxy/dicom/wado/studies reaches the same {root}/studies as .../stow/studies
    (("POST",), "/proxy/dicom/{path:path}", ANNOTATOR),
    (("GET", "DELETE"), "/session/{session_id}", USER),
    # inference: a session is the volume a user sends for inference
    (("PUT",), "/session/", USER),
    (("POST",), "/infer/{model}", USER),
    # POST /infer/wsi/{model} and /infer/wsi_v2/{model} are not listed (admin only): the guards refuse them for all
    # saving corrections and images
    (("PUT",), "/datastore/", ANNOTATOR),
    (("PUT",), "/datastore/image", ANNOTATOR),
    (("PUT",), "/datastore/image/info", ANNOTATOR),
    (("PUT",), "/datastore/label", ANNOTATOR),
    (("PUT",), "/datastore/label/info", ANNOTATOR),
    (("PUT",), "/datastore/updatelabelinfo", ANNOTATOR),
    (("POST",), "/scoring/", ANNOTATOR),
    (("POST",), "/scoring/{method}", ANNOTATOR),
    (("DELETE",), "/scoring/", ANNOTATOR),
    # verdicts and the review queue
    (("POST",), "/review/{image_id}", REVIEWER),
    (("POST",), "/activelearning/{strategy}", REVIEWER),
    # training, stopping, rollback, deletion, model files, logs
    (("POST",), "/train/", ADMIN),
    (("POST",), "/train/{model}", ADMIN),
    (("DELETE",), "/train/", ADMIN),
    (("POST",), "/versions/{model}/restore", ADMIN),
    (("POST",), "/batch/infer/{model}", ADMIN),
    (("DELETE",), "/batch/infer", ADMIN),
    (("DELETE",), "/datastore/", ADMIN),
    (("DELETE",), "/datastore/image", ADMIN),
    (("DELETE",), "/datastore/label", ADMIN),
    (("GET", "PUT", "DELETE"), "/model/{model}", ADMIN),
    (("GET",), "/model/info/{model}", ADMIN),
    (("GET",), "/logs/", ADMIN),
    (("GET",), "/logs/gpu", ADMIN),
)
# routes MONAI Label adds outside MONAI_LABEL_API_STR: the API pages, static files and the app reload
ROOT_ROUTES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("GET",), "/", USER),
    (("GET",), "/docs", USER),
    (("GET",), "/openapi.json", USER),
    (("GET",), "/favicon.ico", USER),
    (("GET",), "/static/{path:path}", USER),
    (("POST",), "/reload", ADMIN),  # rebuilds the app (all its tasks)
)


# ------------------------------------------------------------------------------------------------ settings
def _settings():
    from monailabel.config import settings

    return settings


def auth_enabled() -> bool:
    """Whether MONAI Label's authentication is on (``MONAI_LABEL_AUTH_ENABLE``, read once at its start)."""
    return bool(_settings().MONAI_LABEL_AUTH_ENABLE)


def role_name(level: str) -> str:
    """MONAI Label's name of a role level (``user`` -> ``monailabel-user`` unless the site renamed it)."""
    s = _settings()
    return {USER: s.MONAI_LABEL_AUTH_ROLE_USER, ANNOTATOR: s.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
            REVIEWER: s.MONAI_LABEL_AUTH_ROLE_REVIEWER, ADMIN: s.MONAI_LABEL_AUTH_ROLE_ADMIN}[level]


def effective_roles(roles: Iterable[str]) -> List[str]:
    """A token's roles plus every role they imply (admin > reviewer > annotator > user), in the token's order
    first; roles this server does not know are kept (MONAI Label may check them) but imply nothing."""
    names = [role_name(level) for level in ROLE_ORDER]
    result: List[str] = []
    for role in roles:
        if role not in result:
            result.append(role)
        if role in names:
            for implied in names[: names.index(role)]:
                if implied not in result:
                    result.append(implied)
    return result


# ------------------------------------------------------------------------------------------------ route table
@dataclass(frozen=True)
class _Rule:
    methods: frozenset
    template: str
    level: str
    pattern: re.Pattern


def _compile(prefix: str, table: Sequence[tuple[tuple[str, ...], str, str]]) -> List[_Rule]:
    from starlette.routing import compile_path

    rules = []
    for methods, template, level in table:
        path = prefix + template
        regex, _, _ = compile_path(path)  # the same matching as Starlette's routes
        rules.append(_Rule(frozenset(methods), path, level, regex))
    return rules


_rules_cache: dict = {}


def _rules() -> List[_Rule]:
    prefix = _settings().MONAI_LABEL_API_STR or ""
    if prefix not in _rules_cache:
        _rules_cache[prefix] = _compile(prefix, ROUTE_ROLES) + _compile("", ROOT_ROUTES)
    return _rules_cache[prefix]


def required_role(method: str, path: str) -> tuple[str, Optional[str]]:
    """The level (:data:`PUBLIC`, :data:`AUTHENTICATED` or one of :data:`ROLE_ORDER`) that ``method path``
    needs, and the template it matched (None: not in the table, so :data:`ADMIN`). HEAD is checked as GET; a path
    that only differs by its trailing slash from a template matches it (the router redirects it there)."""
    method = method.upper()
    methods = (method, "GET") if method == "HEAD" else (method,)
    candidates = [path]
    if path != "/":
        candidates.append(path[:-1] if path.endswith("/") else path + "/")
    for candidate in candidates:
        for m in methods:
            for rule in _rules():
                if m in rule.methods and rule.pattern.match(candidate):
                    return rule.level, rule.template
    return ADMIN, None


# ------------------------------------------------------------------------------------------------ tokens
class AccessDenied(Exception):
    """A refused request: HTTP ``status`` (401, 403 or 503) and the reason given to the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _claim(payload: dict, path: str) -> Any:
    """A claim by MONAI Label's path syntax (``realm_access#roles``: nested keys separated by ``#``)."""
    value: Any = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def expected_issuer() -> str:
    """The ``iss`` a token must carry: ``ADL_AUTH_TOKEN_ISSUER`` when set (a realm that this server reaches at
    another address than the one its tokens name, e.g. an internal host name behind a proxy), else
    ``MONAI_LABEL_AUTH_REALM_URI`` (Keycloak's issuer is the realm's URL), without a trailing slash."""
    issuer = os.environ.get(ISSUER_ENV, "").strip() or str(_settings().MONAI_LABEL_AUTH_REALM_URI or "")
    return issuer.rstrip("/")


def expected_audience() -> str | None:
    """The ``aud`` a token must carry (one of its audiences): ``ADL_AUTH_TOKEN_AUDIENCE`` when set, else None (not
    checked; the client a token was issued to, ``azp``, always is)."""
    return os.environ.get(AUDIENCE_ENV, "").strip() or None


def _decode(token: str, key: str) -> dict:
    """The claims of ``token`` checked against ``key`` (see :func:`verify_token`); :class:`AccessDenied` 401 for
    anything wrong but the signature, whose ``jwt.InvalidSignatureError`` is left to the caller (a rotated key)."""
    import jwt

    issuer, audience = expected_issuer(), expected_audience()
    try:
        return jwt.decode(token, key, algorithms=list(TOKEN_ALGORITHMS), leeway=CLOCK_LEEWAY_S,
                          issuer=[issuer, issuer + "/"], audience=audience,
                          options={"verify_signature": True, "verify_exp": True, "verify_aud": audience is not None,
                                   "verify_iss": True, "require": ["exp", "iss"] + (["aud"] if audience else [])})
    except jwt.InvalidSignatureError:
        raise
    except jwt.ExpiredSignatureError:
        raise AccessDenied(401, "the token has expired: log in again") from None
    except jwt.InvalidAlgorithmError:
        raise AccessDenied(401, f"the token is not signed with {', '.join(TOKEN_ALGORITHMS)}") from None
    except jwt.InvalidIssuerError:
        raise AccessDenied(401, f"the token was not issued by this server's realm ({issuer})") from None
    except jwt.InvalidAudienceError:
        raise AccessDenied(401, f"the token is not meant for this server: its audience (aud) does not name "
                                f"{audience!r} ({AUDIENCE_ENV})") from None
    except jwt.MissingRequiredClaimError as error:
        raise AccessDenied(401, f"the token has no {error.claim!r} claim") from None
    except jwt.InvalidTokenError as error:
        raise AccessDenied(401, f"invalid token ({type(error).__name__})") from None


def _refreshed_public_key(realm_uri: str) -> str | None:
    """The realm's public key fetched again and put in MONAI Label's cache (a key rotated in Keycloak works without
    a restart), or None when the last refetch was less than :data:`KEY_REFRESH_MIN_INTERVAL_S` ago (a flood of
    forged tokens must not become a flood of requests to the realm) or the realm cannot be reached (the cached
    key stays)."""
    from monailabel.endpoints.user.auth import get_public_key

    with _key_refresh_lock:
        now = time.monotonic()
        last = _key_refreshed_at.get(realm_uri)
        if last is not None and now - last < KEY_REFRESH_MIN_INTERVAL_S:
            return None
        _key_refreshed_at[realm_uri] = now
        try:
            key = get_public_key.__wrapped__(realm_uri)  # the fetch itself, past the cache
        except Exception as error:  # noqa: BLE001 - unreachable or malformed: keep the cached key
            log.warning("cannot fetch the public key of the realm %s again: %s", realm_uri, error)
            return None
        get_public_key.cache[get_public_key.cache_key(realm_uri)] = key
        log.info("public key of the realm %s fetched again after a signature mismatch", realm_uri)
        return key


def verify_token(token: str):
    """The user of a bearer token (MONAI Label's ``User``, roles expanded by :func:`effective_roles`), after
    checking its RS256 signature with the realm's public key (fetched again once when the signature does not match
    it: :func:`_refreshed_public_key`), its expiry (required), its issuer (the realm:
    :func:`expected_issuer`), the client it was issued to (``azp``: ``MONAI_LABEL_AUTH_CLIENT_ID``; a token the
    realm issued to another application of the site is not a token for this server), its audience where
    :func:`expected_audience` names one, and its user name;
    :class:`AccessDenied` 401 otherwise, 503 when the realm's key cannot be fetched."""
    import jwt
    from monailabel.endpoints.user.auth import User, get_public_key

    s = _settings()
    if not token:
        raise AccessDenied(401, "not authenticated: send 'Authorization: Bearer <token>' "
                                "(log in with POST /auth/token)")
    realm_uri = s.MONAI_LABEL_AUTH_REALM_URI
    try:
        key = get_public_key(realm_uri)  # fetched once, then cached by MONAI Label
    except Exception as error:  # noqa: BLE001 - any failure to reach the realm is the same answer
        log.error("cannot fetch the public key of the realm %s: %s", realm_uri, error)
        raise AccessDenied(503, "the sign-in service (realm) cannot be reached: tokens cannot be checked") from None
    try:
        payload = _decode(token, key)
    except jwt.InvalidSignatureError:
        fresh = _refreshed_public_key(realm_uri)  # the realm may have rotated its key
        if fresh is None or fresh == key:
            raise AccessDenied(401, "invalid token (InvalidSignatureError)") from None
        try:
            payload = _decode(token, fresh)
        except jwt.InvalidSignatureError:
            raise AccessDenied(401, "invalid token (InvalidSignatureError)") from None
    client = str(s.MONAI_LABEL_AUTH_CLIENT_ID or "")
    if payload.get("azp") != client:
        raise AccessDenied(401, f"the token was issued to client {payload.get('azp')!r}, not to this server's "
                                f"client {client!r} (MONAI_LABEL_AUTH_CLIENT_ID)")
    username = _claim(payload, s.MONAI_LABEL_AUTH_TOKEN_USERNAME)
    if not isinstance(username, str) or not username.strip():
        raise AccessDenied(401, f"the token names no user (claim {s.MONAI_LABEL_AUTH_TOKEN_USERNAME!r})")
    roles = _claim(payload, s.MONAI_LABEL_AUTH_TOKEN_ROLES)
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []
    email = _claim(payload, s.MONAI_LABEL_AUTH_TOKEN_EMAIL)
    name = _claim(payload, s.MONAI_LABEL_AUTH_TOKEN_NAME)
    return User(username=username, email=email if isinstance(email, str) else None,
                name=name if isinstance(name, str) else None, roles=effective_roles(roles))


def _bearer(headers: Sequence[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


# ------------------------------------------------------------------------------------------------ middleware
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class AccessControlMiddleware:
    """ASGI middleware in front of the router: every HTTP request passes :func:`required_role` and, unless the
    route is public, :func:`verify_token`; the verified user goes to ``scope["state"]`` (``request.state``).
    Websockets are closed (the server has none: fail closed)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.concurrency import run_in_threadpool
        from starlette.routing import get_route_path

        method, path = scope["method"], get_route_path(scope)
        level, template = required_role(method, path)
        if level != PUBLIC:
            try:
                # the first verification fetches the realm's key (blocking HTTP): not on the event loop
                user = await run_in_threadpool(verify_token, _bearer(scope.get("headers", [])))
                if level != AUTHENTICATED and role_name(level) not in user.roles:
                    route = f"{method} {template}" if template else f"{method} {path} (not in the role table)"
                    raise AccessDenied(403, f"role {role_name(level)!r} (or a higher one) is required for {route}; "
                                            f"{user.username!r} has {', '.join(user.roles) or 'no role'}")
            except AccessDenied as denied:
                await self._refuse(scope, receive, send, method, path, denied)
                return
            state = scope.setdefault("state", {})
            state.update(user=user, user_name=user.username, user_roles=list(user.roles))
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, method: str, path: str, denied: AccessDenied) -> None:
        from starlette.responses import JSONResponse

        log.warning("%d %s %s: %s", denied.status, method, path, denied.detail)
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"' if _bearer(scope.get("headers", []))
                   else "Bearer"} if denied.status == 401 else None
        await JSONResponse({"detail": denied.detail}, status_code=denied.status, headers=headers)(scope, receive, send)


# ------------------------------------------------------------------------------------------------ routes' side
def current_user(request: Request) -> Optional[str]:
    """The authenticated user's name when MONAI Label's authentication is on (from the verified token), else None
    (the single-user loopback demo: callers then name themselves). With auth on and no verified user on the
    request (a route the middleware let through without a token), HTTP 401: never a name from the request."""
    name = getattr(request.state, "user_name", None)
    if name is None and auth_enabled():
        raise HTTPException(status_code=401, detail="not authenticated", headers={"WWW-Authenticate": "Bearer"})
    return name


async def _verified_user(request: Request):
    """Replaces MONAI Label's ``get_current_user`` (through ``dependency_overrides``): the user the middleware
    verified, so its ``RBAC`` checks see the same user and the same expanded roles."""
    user = getattr(request.state, "user", None)
    if user is not None:
        return user
    try:
        return verify_token(_bearer(request.scope.get("headers", [])))
    except AccessDenied as denied:
        raise HTTPException(status_code=denied.status, detail=denied.detail,
                            headers={"WWW-Authenticate": "Bearer"} if denied.status == 401 else None) from None


login_router = APIRouter()


@login_router.post("/auth/token", include_in_schema=False)
def login(form_data: OAuth2PasswordRequestForm = Depends()) -> dict:
    """MONAI Label's login (password grant against the realm's token endpoint, with its client id), answering
    401 for a wrong user name or password and 502 when the realm cannot be reached (MONAI Label's answers 500)."""
    import requests
    from monailabel.endpoints.user.auth import token_uri

    s = _settings()
    try:
        url = token_uri()
        response = requests.post(url, timeout=max(float(s.MONAI_LABEL_AUTH_TIMEOUT), 1.0),
                                 data={"client_id": s.MONAI_LABEL_AUTH_CLIENT_ID, "username": form_data.username,
                                       "password": form_data.password, "grant_type": "password"})
    except Exception as error:  # noqa: BLE001 - realm unreachable or its configuration unreadable
        log.error("login: the realm's token endpoint cannot be reached: %s", error)
        raise HTTPException(status_code=502, detail="the sign-in service (realm) cannot be reached") from None
    if response.status_code in (400, 401, 403):
        raise HTTPException(status_code=401, detail="wrong user name or password (or the account is disabled)",
                            headers={"WWW-Authenticate": "Bearer"})
    if response.status_code != 200:
        raise HTTPException(status_code=502, detail=f"the sign-in service answered {response.status_code}")
    return response.json()


def install_access_control(fastapi_app) -> bool:
    """With auth on: the middleware in front of the router, MONAI Label's ``get_current_user`` replaced by the
    verified user, and the login route in front of MONAI Label's. With auth off: nothing (returns False).
    Raises RuntimeError when auth is on and the middleware cannot be placed (the server must not start open)."""
    if not auth_enabled():
        return False
    if getattr(fastapi_app.state, "adl_denoise_access_control", False):
        return True
    from fastapi.middleware import Middleware
    from monailabel.endpoints.user.auth import get_current_user

    # inside CORS (a browser client reads the 401/403), outside the router and its exception handling
    fastapi_app.user_middleware.append(Middleware(AccessControlMiddleware))
    if fastapi_app.middleware_stack is not None:
        # the app is built during the server's start-up (lifespan), when Starlette has already built its stack and
        # refuses add_middleware: rebuild it; requests are served only after start-up, so all see the new stack
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    if not _stack_has_access_control(fastapi_app.middleware_stack) and fastapi_app.middleware_stack is not None:
        raise RuntimeError("access control could not be installed in front of the routes: not starting open")
    fastapi_app.dependency_overrides[get_current_user] = _verified_user
    fastapi_app.state.adl_denoise_access_control = True
    log.info("access control on: realm %s, roles %s", _settings().MONAI_LABEL_AUTH_REALM_URI,
             " > ".join(role_name(level) for level in reversed(ROLE_ORDER)))
    return True


def _stack_has_access_control(app: Any, depth: int = 32) -> bool:
    while app is not None and depth > 0:
        if isinstance(app, AccessControlMiddleware):
            return True
        app, depth = getattr(app, "app", None), depth - 1
    return False

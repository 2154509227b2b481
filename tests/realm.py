"""A Keycloak-like realm on loopback for tests of the server's access control: a real HTTP server on 127.0.0.1 (in
a thread of the test process) that answers what MONAI Label asks a realm for.

* ``GET  <realm>``: the realm JSON, ``{"realm": ..., "public_key": <base64 DER SubjectPublicKeyInfo>, ...}``
  (the form of Keycloak's ``/realms/<name>``, from which MONAI Label builds its PEM key).
* ``GET  <realm>/.well-known/openid-configuration``: ``issuer``, ``token_endpoint``.
* ``POST <realm>/protocol/openid-connect/token`` (form: ``grant_type=password``, ``username``, ``password``,
  ``client_id``): an RS256 access token (``preferred_username``, ``realm_access.roles``, ``exp``, ``iat``,
  ``iss``, ``azp``) for a known user and password, ``401 {"error": "invalid_grant"}`` otherwise, as Keycloak.

:meth:`Realm.token` mints tokens directly (any claims, expired ones, another key, another algorithm) for the
tests of what the server must refuse.
"""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROLE_USER = "monailabel-user"
ROLE_ANNOTATOR = "monailabel-annotator"
ROLE_REVIEWER = "monailabel-reviewer"
ROLE_ADMIN = "monailabel-admin"
CLIENT_ID = "monailabel-app"

# test users: name -> (password, realm roles). Each holds one role (the server derives the lower ones); "nora"
# holds none, "mixed" holds a role the server does not know only.
USERS: dict[str, tuple[str, list[str]]] = {
    "uma": ("uma-pass", [ROLE_USER]),
    "anna": ("anna-pass", [ROLE_ANNOTATOR]),
    "rita": ("rita-pass", [ROLE_REVIEWER]),
    "adam": ("adam-pass", [ROLE_ADMIN]),
    "nora": ("nora-pass", []),
    "mixed": ("mixed-pass", ["offline_access", "uma_authorization"]),
}
# the user holding each level's role (the lowest user with a role at that level)
USER_OF_ROLE = {"user": "uma", "annotator": "anna", "reviewer": "rita", "admin": "adam"}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_key_b64(key: rsa.RSAPrivateKey) -> str:
    """The public key as Keycloak's realm JSON gives it: base64 of the DER SubjectPublicKeyInfo (no PEM armour)."""
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


@dataclass
class Realm:
    """A running loopback realm; ``url`` is what MONAI_LABEL_AUTH_REALM_URI points at. Stop with :meth:`stop`."""

    name: str = "adl-test"
    users: dict[str, tuple[str, list[str]]] = field(default_factory=lambda: dict(USERS))
    lifetime_s: float = 3600.0
    key: rsa.RSAPrivateKey = field(default_factory=new_key)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) served, for the tests

    def __post_init__(self) -> None:
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass  # quiet: the tests' output stays readable

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                realm.requests.append(("GET", self.path))
                if self.path.rstrip("/") == realm.path:
                    self._answer(200, {"realm": realm.name, "public_key": public_key_b64(realm.key),
                                       "token-service": f"{realm.url}/protocol/openid-connect",
                                       "account-service": f"{realm.url}/account", "tokens-not-before": 0})
                elif self.path == f"{realm.path}/.well-known/openid-configuration":
                    self._answer(200, {"issuer": realm.url, "token_endpoint": realm.token_endpoint,
                                       "grant_types_supported": ["password"],
                                       "id_token_signing_alg_values_supported": ["RS256"]})
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                realm.requests.append(("POST", self.path))
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                value = {key: values[0] for key, values in form.items()}
                if self.path != f"{realm.path}/protocol/openid-connect/token":
                    self._answer(404, {"error": "not found"})
                elif value.get("grant_type") != "password":
                    self._answer(400, {"error": "unsupported_grant_type"})
                elif value.get("client_id") != CLIENT_ID:
                    self._answer(401, {"error": "invalid_client"})
                elif realm.users.get(value.get("username", ""), ("", []))[0] != value.get("password") \
                        or not value.get("password"):
                    self._answer(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                else:
                    token = realm.token(value["username"])
                    self._answer(200, {"access_token": token, "token_type": "Bearer",
                                       "expires_in": int(realm.lifetime_s), "scope": "profile email"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-realm", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        return f"/realms/{self.name}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/protocol/openid-connect/token"

    def token(self, username: str | None, roles: list[str] | None = None, *, expires_in: float | None = None,
              key: rsa.RSAPrivateKey | None = None, algorithm: str = "RS256", claims: dict | None = None) -> str:
        """An access token for ``username`` (its realm roles unless ``roles`` is given; ``None``: no
        ``preferred_username`` claim), valid for ``expires_in`` seconds (negative: already expired), signed with
        ``key`` (default: the realm's) by ``algorithm`` (``"none"``: unsigned; ``"HS256"``: the realm's public key
        PEM as the HMAC secret, the classic algorithm-confusion forgery); ``claims`` added last."""
        now = int(time.time())
        if roles is None:
            roles = list(self.users.get(username or "", ("", []))[1])
        payload: dict[str, Any] = {"iat": now, "exp": now + int(self.lifetime_s if expires_in is None else expires_in),
                                   "iss": self.url, "azp": CLIENT_ID, "typ": "Bearer",
                                   "realm_access": {"roles": roles}, "email": f"{username}@hospital.test",
                                   "name": (username or "").title()}
        if username is not None:
            payload["preferred_username"] = username
        payload.update(claims or {})
        if algorithm == "none":
            return jwt.encode(payload, None, algorithm="none")
        if algorithm.startswith("HS"):
            secret = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
            return _hmac_token(payload, secret, algorithm)
        return jwt.encode(payload, key or self.key, algorithm=algorithm)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(30)


def _hmac_token(payload: dict, secret: bytes, algorithm: str) -> str:
    """An HMAC-signed JWT built by hand: PyJWT refuses a PEM key as an HMAC secret (the forgery it prevents)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    header = b64(json.dumps({"alg": algorithm, "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(payload, separators=(",", ":")).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[algorithm]
    signature = hmac.new(secret, f"{header}.{body}".encode(), digest).digest()
    return f"{header}.{body}.{b64(signature)}"

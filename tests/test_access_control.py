"""Access control of the server with MONAI Label's authentication on, against a realm stood up on loopback.

A real server process (``MONAI_LABEL_AUTH_ENABLE=true``, ``MONAI_LABEL_AUTH_REALM_URI`` = the loopback realm of
``realm.py``: an RSA key pair, the realm JSON with its public key, RS256 tokens with ``realm_access.roles``)
is asked every route of :data:`ROUTES`, which is this test's own statement of the role model (not a copy of the
server's table): without a token, with tokens the server must refuse (garbage, expired, another key, ``alg:
none``, HS256 signed with the public key, no user name), with a token of every role. The routes MONAI Label
publishes in ``/openapi.json`` must all be in :data:`ROUTES`; the hidden ones (the app's guards in front of the
stock routes, OHIF, the DICOM proxy, the API pages) are listed there explicitly.

Requests that a role may make are built to stop at validation (a missing query parameter, a body that is not
JSON, an unknown model or image): the check is that access control lets them through (anything but 401 / 403),
without training, deleting or publishing anything on the server.
"""
from __future__ import annotations

import json
import time

import pytest
import requests

from conftest import APP_DIR, SAMPLE_STUDIES
from mlserver import copy_weights, shared_studies, start_server, stop_server
from realm import ROLE_ADMIN, ROLE_ANNOTATOR, ROLE_REVIEWER, ROLE_USER, USERS, Realm, new_key

pytestmark = [pytest.mark.server, pytest.mark.slow]

LEVELS = ("user", "annotator", "reviewer", "admin")  # lowest first: each implies those before it
PUBLIC, AUTHENTICATED = "public", "authenticated"
NOT_JSON = b"{not json"

# (method, path sent, role level, template as the server names it). Paths sent stop at validation (see above).
ROUTES: list[tuple[str, str, str, str]] = [
    # login
    ("GET", "/auth/", PUBLIC, "/auth/"),
    ("POST", "/auth/token", PUBLIC, "/auth/token"),
    ("GET", "/auth/token/valid", AUTHENTICATED, "/auth/token/valid"),
    # reads
    ("GET", "/info/", "user", "/info/"),
    ("HEAD", "/info/", "user", "/info/"),
    ("GET", "/train/", "user", "/train/"),
    ("GET", "/batch/infer", "user", "/batch/infer"),
    ("GET", "/scoring/", "user", "/scoring/"),
    ("GET", "/datastore/", "user", "/datastore/"),
    ("GET", "/datastore/image", "user", "/datastore/image"),
    ("HEAD", "/datastore/image", "user", "/datastore/image"),
    ("GET", "/datastore/image/info", "user", "/datastore/image/info"),
    ("GET", "/datastore/label", "user", "/datastore/label"),
    ("HEAD", "/datastore/label", "user", "/datastore/label"),
    ("GET", "/datastore/label/info", "user", "/datastore/label/info"),
    ("GET", "/datastore/dataset", "admin", "/datastore/dataset"),
    ("GET", "/review/", "user", "/review/"),
    ("GET", "/review/audit/verify", "user", "/review/audit/verify"),
    ("GET", "/review/audit/entries?limit=0", "admin", "/review/audit/entries"),
    ("GET", "/review/ct_slice_a", "user", "/review/{image_id}"),
    ("GET", "/versions/adl", "user", "/versions/{model}"),
    ("GET", "/ohif/index.html", "user", "/ohif/{path}"),
    ("GET", "/proxy/dicom/studies", "user", "/proxy/dicom/{path}"),
    ("GET", "/proxy/dicom/wado/x", "user", "/proxy/dicom/wado/{path}"),
    ("GET", "/proxy/dicom/qido/studies", "user", "/proxy/dicom/qido/{path}"),
    ("GET", "/proxy/dicom/stow/x", "user", "/proxy/dicom/stow/{path}"),
    # every POST through the proxy stores into the PACS (STOW-RS; MONAI Label's prefixes are empty by default)
    ("POST", "/proxy/dicom/wado/studies", "annotator", "/proxy/dicom/wado/{path}"),
    ("POST", "/proxy/dicom/qido/studies", "annotator", "/proxy/dicom/qido/{path}"),
    ("POST", "/proxy/dicom/stow/studies", "annotator", "/proxy/dicom/stow/{path}"),
    ("POST", "/proxy/dicom/studies", "annotator", "/proxy/dicom/{path}"),
    ("GET", "/session/no_such_session", "user", "/session/{session_id}"),
    ("DELETE", "/session/no_such_session", "user", "/session/{session_id}"),
    ("GET", "/", "user", "/"),
    ("GET", "/docs", "user", "/docs"),
    ("GET", "/openapi.json", "user", "/openapi.json"),
    ("GET", "/favicon.ico", "user", "/favicon.ico"),
    ("GET", "/static/favicon.ico", "user", "/static/{path}"),
    # inference
    ("PUT", "/session/", "user", "/session/"),
    ("POST", "/infer/no_such_model", "user", "/infer/{model}"),
    # whole-slide infer: refused (404) for everyone by the guards, and closed to all but admin before that
    ("POST", "/infer/wsi/adl", "admin", "/infer/wsi/{model}"),
    ("POST", "/infer/wsi_v2/adl", "admin", "/infer/wsi_v2/{model}"),
    # corrections and images
    ("PUT", "/datastore/", "annotator", "/datastore/"),
    ("PUT", "/datastore/image", "annotator", "/datastore/image"),
    ("PUT", "/datastore/image/info", "annotator", "/datastore/image/info"),
    ("PUT", "/datastore/label", "annotator", "/datastore/label"),
    ("PUT", "/datastore/label/info", "annotator", "/datastore/label/info"),
    ("PUT", "/datastore/updatelabelinfo", "annotator", "/datastore/updatelabelinfo"),
    ("POST", "/scoring/", "annotator", "/scoring/"),
    ("POST", "/scoring/no_such_method", "annotator", "/scoring/{method}"),
    ("DELETE", "/scoring/", "annotator", "/scoring/"),
    # verdicts and the queue
    ("POST", "/review/ct_slice_a", "reviewer", "/review/{image_id}"),
    ("POST", "/activelearning/next_unreviewed", "reviewer", "/activelearning/{strategy}"),
    # training, stop, rollback, deletion, model files, logs, reload
    ("POST", "/train/", "admin", "/train/"),
    ("POST", "/train/no_such_model", "admin", "/train/{model}"),
    ("POST", "/train/adl", "admin", "/train/{model}"),
    ("DELETE", "/train/", "admin", "/train/"),
    ("POST", "/versions/adl/restore", "admin", "/versions/{model}/restore"),
    ("POST", "/batch/infer/no_such_model", "admin", "/batch/infer/{model}"),
    ("DELETE", "/batch/infer", "admin", "/batch/infer"),
    ("DELETE", "/datastore/", "admin", "/datastore/"),
    ("DELETE", "/datastore/image?id=no_such_image", "admin", "/datastore/image"),
    ("DELETE", "/datastore/image", "admin", "/datastore/image"),
    ("DELETE", "/datastore/label", "admin", "/datastore/label"),
    ("GET", "/model/no_such_model", "admin", "/model/{model}"),
    ("PUT", "/model/no_such_model", "admin", "/model/{model}"),
    ("DELETE", "/model/no_such_model", "admin", "/model/{model}"),
    ("GET", "/model/info/no_such_model", "admin", "/model/info/{model}"),
    ("GET", "/logs/", "admin", "/logs/"),
    ("GET", "/logs/gpu", "admin", "/logs/gpu"),
    ("POST", "/reload", "admin", "/reload"),
    # not a route: closed to all but admin (who gets the router's 404)
    ("GET", "/no/such/route", "admin", "(none)"),
    ("PATCH", "/info/", "admin", "(none)"),
]
# allowed requests not sent: they would act on the server however they are written (no parameter to invalidate)
NOT_SENT_ALLOWED = {("POST", "/reload"): "rebuilds the app (all its tasks)"}
ROUTE_IDS = [f"{m} {p}" for m, p, _, _ in ROUTES]

# tokens the server must refuse with 401, by what is wrong with them
BAD_TOKENS = ("garbage", "expired", "other_key", "alg_none", "hs256_with_public_key", "no_username",
              "no_exp", "tampered_roles", "other_issuer", "no_issuer", "other_client", "no_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, realm):
    root = tmp_path_factory.mktemp("access_control")
    srv = start_server(shared_studies(root / "studies"), copy_weights(tiny_weights, root / "model"), root / "work",
                       conf={"max_voxels": 3_000_000},
                       env={"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def tokens(realm) -> dict[str, str]:
    """A valid token of every test user (by user name)."""
    return {name: realm.token(name) for name in USERS}


def bad_token(realm: Realm, kind: str) -> str:
    if kind == "garbage":
        return "not-a-jwt"
    if kind == "expired":
        return realm.token("adam", expires_in=-3600)
    if kind == "other_key":
        return realm.token("adam", key=new_key())
    if kind == "alg_none":
        return realm.token("adam", algorithm="none")
    if kind == "hs256_with_public_key":
        return realm.token("adam", algorithm="HS256")
    if kind == "no_username":
        return realm.token(None, roles=[ROLE_ADMIN])
    if kind == "no_exp":
        import jwt

        payload = jwt.decode(realm.token("adam"), options={"verify_signature": False})
        del payload["exp"]
        return jwt.encode(payload, realm.key, algorithm="RS256")
    if kind == "other_issuer":  # signed by the realm's key, but naming another realm (a shared key)
        return realm.token("adam", claims={"iss": "http://127.0.0.1:1/realms/other"})
    if kind in ("no_issuer", "no_client"):
        import jwt

        payload = jwt.decode(realm.token("adam"), options={"verify_signature": False})
        del payload["iss" if kind == "no_issuer" else "azp"]
        return jwt.encode(payload, realm.key, algorithm="RS256")
    if kind == "other_client":  # the realm's token for another application of the site
        return realm.token("adam", claims={"azp": "radiology-dashboard"})
    if kind == "tampered_roles":  # uma's signed token with her roles replaced by admin: the signature breaks
        import base64
        import json

        header, body, signature = realm.token("uma").split(".")
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        payload["realm_access"]["roles"] = [ROLE_ADMIN]
        forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
        return f"{header}.{forged}.{signature}"
    raise ValueError(kind)


def call(server, method: str, path: str, token: str | None = None, scheme: str = "Bearer") -> requests.Response:
    """``method path`` with a body that is not JSON on POST / PUT (requests stop at validation)."""
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    data = None
    if method in ("POST", "PUT", "PATCH"):
        headers["Content-Type"] = "application/json"
        data = NOT_JSON
    return requests.request(method, server.url + path, headers=headers, data=data, timeout=300,
                            allow_redirects=False)


def rank(level: str) -> int:
    return LEVELS.index(level)


def user_level(name: str) -> int:
    """The highest level a test user holds (-1: no role of this server)."""
    names = {ROLE_USER: 0, ROLE_ANNOTATOR: 1, ROLE_REVIEWER: 2, ROLE_ADMIN: 3}
    return max((names[r] for r in USERS[name][1] if r in names), default=-1)


def detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") if isinstance(body, dict) else body)[:300]


# ------------------------------------------------------------------------------------------------ every route
def test_every_published_route_is_in_the_role_model(server, tokens):
    """The routes of /openapi.json (read as admin) are all in ROUTES: a route added to MONAI Label or the app
    is noticed here and given a role (until then the server closes it to all but admin)."""
    response = requests.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {tokens['adam']}"},
                            timeout=60)
    assert response.status_code == 200, detail(response)
    published = {(method.upper(), path) for path, ops in response.json()["paths"].items() for method in ops}
    known = {(m, t) for m, _, _, t in ROUTES}
    missing = sorted(published - known)
    assert not missing, f"routes with no role in this test's model: {missing}"
    assert ("POST", "/review/{image_id}") in published and ("POST", "/versions/{model}/restore") in published


@pytest.mark.parametrize("method,path,level,template", ROUTES, ids=ROUTE_IDS)
def test_no_token_or_a_bad_token_is_401(server, realm, method, path, level, template):
    if level == PUBLIC:
        assert call(server, method, path).status_code not in (401, 403)
        return
    response = call(server, method, path)
    assert response.status_code == 401, f"{method} {path} without a token: {response.status_code} {detail(response)}"
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    response = call(server, method, path, bad_token(realm, "expired"), scheme="Basic")
    assert response.status_code == 401, f"{method} {path} with a Basic scheme: {response.status_code}"
    for kind in BAD_TOKENS:
        response = call(server, method, path, bad_token(realm, kind))
        assert response.status_code == 401, f"{method} {path} with a {kind} token: {response.status_code} " \
                                             f"{detail(response)}"


@pytest.mark.parametrize("method,path,level,template", ROUTES, ids=ROUTE_IDS)
def test_every_role_gets_in_exactly_where_the_role_model_says(server, tokens, method, path, level, template):
    """403 for a token whose roles (expanded: admin > reviewer > annotator > user) do not reach the route's
    level, anything but 401 / 403 for one that does."""
    for name in USERS:
        held = user_level(name)
        if level == PUBLIC or level == AUTHENTICATED:
            allowed = True
        else:
            allowed = held >= rank(level)
        if allowed and (method, template) in NOT_SENT_ALLOWED:
            continue
        response = call(server, method, path, tokens[name])
        if allowed:
            assert response.status_code not in (401, 403), \
                f"{name} ({USERS[name][1]}) refused {method} {path}: {response.status_code} {detail(response)}"
        else:
            assert response.status_code == 403, \
                f"{name} ({USERS[name][1]}) on {method} {path}: {response.status_code} {detail(response)}"
            assert method == "HEAD" or "required" in detail(response)


def test_the_run_all_training_route_starts_nothing_even_for_an_admin(server, tokens):
    """MONAI Label's deprecated ``POST /train/`` started every model's fine-tune with none of the checks of
    ``POST /train/{model}`` (request data, one run at a time, the audit entry of who asked): refused with 422."""
    response = requests.post(f"{server.url}/train/", json={}, timeout=120,
                             headers={"Authorization": f"Bearer {tokens['adam']}"})
    assert response.status_code == 422 and "POST /train/{model}" in detail(response), detail(response)
    status = call(server, "GET", "/train/", tokens["adam"])
    assert status.status_code == 404 or status.json().get("status") not in ("SUBMITTED", "RUNNING"), status.text


def test_only_an_admin_sets_a_studys_modality(server, tokens):
    """The image info's ``modality`` decides which model a study's corrections fine-tune: an annotator's "MR" on a
    CT study made its correction train the MR model (and filed it under MR in the review queue). 403 below admin;
    other info keys stay the annotator's."""
    def put_info(who: str, info: dict) -> requests.Response:
        return requests.put(f"{server.url}/datastore/image/info", params={"image": "ct_slab_b"},
                            data={"info": json.dumps(info)}, headers={"Authorization": f"Bearer {tokens[who]}"},
                            timeout=120)

    def modality() -> object:
        return requests.get(f"{server.url}/datastore/image/info", params={"image": "ct_slab_b"}, timeout=120,
                            headers={"Authorization": f"Bearer {tokens['adam']}"}).json().get("modality")

    before = modality()
    for who in ("anna", "rita"):
        refused = put_info(who, {"modality": "MR", "note": "x"})
        assert refused.status_code == 403 and "admin only" in detail(refused), detail(refused)
    assert modality() == before
    assert put_info("anna", {"note": "x"}).status_code == 200
    upload = SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"
    with open(upload, "rb") as handle:
        refused = requests.put(f"{server.url}/datastore/image", params={"image": "modality_probe"},
                               data={"params": json.dumps({"modality": "MR"})},
                               files={"file": (upload.name, handle)}, timeout=120,
                               headers={"Authorization": f"Bearer {tokens['anna']}"})
    assert refused.status_code == 403 and "admin only" in detail(refused), detail(refused)
    assert put_info("adam", {"modality": "CT"}).status_code == 200 and modality() == "CT"


def test_a_route_missing_from_the_table_is_closed_to_all_but_admin(server, tokens):
    for name in ("uma", "anna", "rita"):
        assert call(server, "GET", "/no/such/route", tokens[name]).status_code == 403
    assert call(server, "GET", "/no/such/route", tokens["adam"]).status_code == 404


# ------------------------------------------------------------------------------------------------ login
def test_login_through_the_server_gives_a_working_token_of_that_user(server, realm):
    response = requests.get(server.url + "/auth/", timeout=60)
    assert response.status_code == 200 and response.json()["enabled"] is True
    response = requests.post(server.url + "/auth/token", data={"username": "anna", "password": "anna-pass"},
                             timeout=60)
    assert response.status_code == 200, detail(response)
    token = response.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    who = requests.get(server.url + "/auth/token/valid", headers=headers, timeout=60)
    assert who.status_code == 200 and who.json()["username"] == "anna"
    assert set(who.json()["roles"]) >= {ROLE_ANNOTATOR, ROLE_USER}  # the implied role is there too
    info = requests.get(server.url + "/info/", headers=headers, timeout=60)
    assert info.status_code == 200 and "adl" in info.json()["models"]
    assert requests.post(server.url + "/versions/adl/restore?version=x", headers=headers,
                         timeout=60).status_code == 403


def test_login_with_a_wrong_password_is_401_not_a_token(server):
    for username, password in (("anna", "wrong"), ("nobody", "anna-pass"), ("anna", "")):
        response = requests.post(server.url + "/auth/token", data={"username": username, "password": password},
                                 timeout=60)
        expected = (401, 422) if not password else (401,)  # an empty password is a missing form field
        assert response.status_code in expected, (username, response.status_code, detail(response))
        assert "access_token" not in response.text


def test_a_token_stops_working_when_it_expires(server, realm):
    from lib.endpoints.access import CLOCK_LEEWAY_S

    # past its exp by all but 4 s of the clock leeway: still valid now, expired in a few seconds
    token = realm.token("uma", expires_in=-(CLOCK_LEEWAY_S - 4))
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(server.url + "/info/", headers=headers, timeout=60).status_code == 200
    time.sleep(4 + 2)
    response = requests.get(server.url + "/info/", headers=headers, timeout=60)
    assert response.status_code == 401 and "expired" in detail(response)


def test_the_issuer_and_client_are_named_in_the_refusal_and_the_issuer_can_be_set(realm, monkeypatch):
    """A realm reached at another address than the one its tokens name (a proxy): ``ADL_AUTH_TOKEN_ISSUER``
    names the issuer; without it the realm URI is the issuer. Checked in-process against the loopback realm's key."""
    from monailabel.config import settings

    from lib.endpoints.access import ISSUER_ENV, AccessDenied, verify_token

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", realm.url + "/")  # a trailing slash is the same URI
    monkeypatch.delenv(ISSUER_ENV, raising=False)
    assert verify_token(realm.token("uma")).username == "uma"
    public = "https://keycloak.hospital.example/realms/monailabel"
    proxied = realm.token("uma", claims={"iss": public})
    with pytest.raises(AccessDenied, match=f"not issued by this server's realm \\({realm.url}\\)"):
        verify_token(proxied)
    monkeypatch.setenv(ISSUER_ENV, public)
    assert verify_token(proxied).username == "uma"
    with pytest.raises(AccessDenied, match="not issued by this server's realm"):
        verify_token(realm.token("uma"))
    with pytest.raises(AccessDenied, match="issued to client 'radiology-dashboard', not to this server's client "
                                           "'monailabel-app'"):
        verify_token(realm.token("uma", claims={"iss": public, "azp": "radiology-dashboard"}))


def test_the_audience_is_checked_when_one_is_set(realm, monkeypatch):
    """``ADL_AUTH_TOKEN_AUDIENCE`` (a realm with an audience mapper): a token must name it in ``aud`` (a string or
    one of a list); without the setting, ``aud`` is not checked (Keycloak's default tokens carry "account")."""
    from monailabel.config import settings

    from lib.endpoints.access import AUDIENCE_ENV, ISSUER_ENV, AccessDenied, verify_token

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", realm.url)
    monkeypatch.delenv(ISSUER_ENV, raising=False)
    monkeypatch.delenv(AUDIENCE_ENV, raising=False)
    account = realm.token("uma", claims={"aud": "account"})
    assert verify_token(account).username == "uma"
    monkeypatch.setenv(AUDIENCE_ENV, "monailabel-app")
    for refused, why in ((account, "does not name 'monailabel-app'"), (realm.token("uma"), "no 'aud' claim"),
                         (realm.token("uma", claims={"aud": ["account", "pacs"]}), "does not name")):
        with pytest.raises(AccessDenied, match=why) as denied:
            verify_token(refused)
        assert denied.value.status == 401
    assert verify_token(realm.token("uma", claims={"aud": "monailabel-app"})).username == "uma"
    assert verify_token(realm.token("uma", claims={"aud": ["account", "monailabel-app"]})).username == "uma"


def test_a_rotated_realm_key_works_without_a_restart_and_refetches_are_rate_limited(server, realm):
    """The realm rotates its signing key: a token of the new key works at once (a signature that fails against the
    cached key makes the server fetch the realm's key again), the old key's tokens stop working, and forged tokens
    cannot make the server fetch the key more than once per ``KEY_REFRESH_MIN_INTERVAL_S``."""
    from lib.endpoints.access import KEY_REFRESH_MIN_INTERVAL_S

    def status(token: str) -> int:
        return requests.get(server.url + "/info/", headers={"Authorization": f"Bearer {token}"},
                            timeout=60).status_code

    def key_fetches() -> int:
        return sum(1 for method, path in list(realm.requests) if method == "GET" and path.rstrip("/") == realm.path)

    original, old_token = realm.key, realm.token("uma")
    time.sleep(KEY_REFRESH_MIN_INTERVAL_S + 1)  # past any refetch that earlier tests' forged tokens caused
    realm.key = new_key()
    try:
        before = key_fetches()
        assert status(realm.token("uma")) == 200
        assert key_fetches() == before + 1
        assert [status(old_token) for _ in range(3)] == [401] * 3
        assert [status(realm.token("uma", key=new_key())) for _ in range(3)] == [401] * 3
        assert key_fetches() == before + 1  # no refetch per forged token within the interval
    finally:
        realm.key = original
        time.sleep(KEY_REFRESH_MIN_INTERVAL_S + 1)
    assert status(old_token) == 200  # rotated back: the next tests' tokens work again


# ------------------------------------------------------------------------------------------------ server internals
def _wait_for_training(server, headers: dict, done, what: str, timeout: float = 600.0) -> dict:
    """GET /train/ (as ``headers``) until ``done(status)``; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(server.url + "/train/", headers=headers, timeout=120)
        status = response.json() if response.status_code == 200 else {}
        if done(status):
            return status
        assert time.monotonic() < deadline, f"{what}: {response.status_code} {str(status)[:500]}"
        time.sleep(1)


def test_below_admin_no_answer_names_the_servers_files_or_logs(server, tokens):
    """Every role was shown the server's files and folders: ``served.path`` and each version's ``path`` in
    ``GET /versions/{model}``, the audit log's ``path`` in ``GET /review/audit/verify``, ``audit.dir`` and a
    training run's ``work_dir`` and ``pid`` in ``GET /info/``, and in ``GET /train/`` the training subprocess's log
    lines (the app folder, the studies and model folders, the conf; the logs are ``GET /logs/``, admin only).
    Below admin none of that; an admin still sees it all."""
    admin = {"Authorization": f"Bearer {tokens['adam']}"}
    started = requests.post(f"{server.url}/train/adl", headers=admin, timeout=300,
                            json={"mode": "adapt_noise", "modality": "ct", "steps": 3, "device": "cpu"})
    assert started.status_code == 200, detail(started)
    try:
        # the run has logged its start (the app and its folders) and written its status (its work_dir)
        _wait_for_training(server, admin, lambda status: any(str(server.studies) in line
                                                             for line in status.get("details") or ()), "no log")
        deadline = time.monotonic() + 600
        while "work_dir" not in requests.get(server.url + "/info/", headers=admin,
                                             timeout=120).json()["train_stats"]["adl"]:
            assert time.monotonic() < deadline, "the run wrote no status with its work_dir"
            time.sleep(1)
    finally:
        requests.delete(server.url + "/train/", headers=admin, timeout=300)  # stopped: the test needs its traces only
        _wait_for_training(server, admin, lambda status: status.get("status") not in ("SUBMITTED", "RUNNING"),
                           "the run did not stop")

    def answers(who: str) -> dict[str, object]:
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        out = {}
        for path in ("/info/", "/train/", "/train/?all=true", "/versions/adl", "/versions/adl?modality=mr",
                     "/review/audit/verify"):
            response = requests.get(server.url + path, headers=headers, timeout=120)
            assert response.status_code == 200, (who, path, detail(response))
            out[path] = response.json()
        return out

    seen = answers("adam")
    assert str(server.model_dir) in seen["/versions/adl"]["served"]["path"]
    assert all(str(server.model_dir) in v["path"] for v in seen["/versions/adl"]["versions"])
    assert str(server.studies) in seen["/review/audit/verify"]["path"]
    assert str(server.studies) in seen["/info/"]["audit"]["dir"]
    stats = seen["/info/"]["train_stats"]["adl"]
    assert str(server.model_dir) in stats["work_dir"] and stats["pid"]
    assert any(str(server.studies) in line for line in seen["/train/"]["details"])
    folders = (str(server.studies.parent), str(APP_DIR))  # the test's folder (studies, model, work) and the app's
    for who in ("uma", "anna", "rita"):
        seen = answers(who)
        for path, answer in seen.items():
            text = json.dumps(answer)
            assert not any(folder in text for folder in folders), f"{who} is shown a server folder by {path}: {text}"
        assert "path" not in seen["/versions/adl"]["served"] and seen["/versions/adl"]["served"]["version"]
        assert all("path" not in v and v["sha256"] for v in seen["/versions/adl"]["versions"])
        assert "path" not in seen["/review/audit/verify"] and seen["/review/audit/verify"]["ok"] is True
        assert "path" not in seen["/review/audit/verify"]["at_start_up"]
        assert "dir" not in seen["/info/"]["audit"] and seen["/info/"]["audit"]["ok_at_start"] is True
        stats = seen["/info/"]["train_stats"]["adl"]
        assert "work_dir" not in stats and "pid" not in stats and stats["run_id"], stats  # the run's status, all but those
        assert "details" not in seen["/train/"] and seen["/train/"]["status"] == "STOPPED", seen["/train/"]
        assert all("details" not in task for task in seen["/train/?all=true"])


def test_below_admin_the_training_list_names_files_not_the_servers_paths(server, tokens):
    """``GET /datastore/?output=train`` (MONAI Label's training list, a user's read) gave every role the absolute
    path on the server of each corrected image and its label: below admin, their file names; an admin, the paths."""
    annotator = {"Authorization": f"Bearer {tokens['anna']}"}
    admin = {"Authorization": f"Bearer {tokens['adam']}"}
    study = server.studies / "ct_slab_c.nii.gz"  # the study itself is a correction holding its values
    saved = requests.put(f"{server.url}/datastore/label", params={"image": "ct_slab_c", "tag": "final"},
                         files={"label": ("ct_slab_c_corrected.nii.gz", study.read_bytes())}, headers=annotator,
                         timeout=300)
    assert saved.status_code == 200, detail(saved)
    try:
        listed = requests.get(f"{server.url}/datastore/", params={"output": "train"}, headers=admin, timeout=120)
        assert listed.status_code == 200, detail(listed)
        entry = next(e for e in listed.json() if "ct_slab_c" in e["image"])
        assert entry["image"].startswith(str(server.studies)) and entry["label"].startswith(str(server.studies))
        for who in ("uma", "anna", "rita"):
            listed = requests.get(f"{server.url}/datastore/", params={"output": "train"}, timeout=120,
                                  headers={"Authorization": f"Bearer {tokens[who]}"})
            assert listed.status_code == 200, (who, detail(listed))
            assert str(server.studies.parent) not in listed.text, f"{who} is shown the server's paths: {listed.text}"
            assert {"image": "ct_slab_c.nii.gz", "label": "ct_slab_c.nii.gz"} in listed.json(), listed.text
        stats = requests.get(f"{server.url}/datastore/", headers=annotator, timeout=120)
        assert stats.status_code == 200 and stats.json()["completed"] >= 1, detail(stats)
        refused = requests.get(f"{server.url}/datastore/", params={"output": "paths"}, headers=annotator, timeout=120)
        assert refused.status_code == 422 and "output" in detail(refused), detail(refused)
    finally:
        requests.delete(f"{server.url}/datastore/label", params={"id": "ct_slab_c", "tag": "final"}, headers=admin,
                        timeout=120)


# ------------------------------------------------------------------------------------------------ identity
def test_a_verdict_is_recorded_under_the_tokens_user_not_the_name_in_the_body(server, tokens):
    headers = {"Authorization": f"Bearer {tokens['rita']}"}
    denoised = requests.post(server.url + "/infer/nlm", params={"image": "ct_slab_b", "output": "json"},
                             data={"params": "{}"}, headers=headers, timeout=600)  # a verdict judges a result
    assert denoised.status_code == 200, detail(denoised)
    response = requests.post(server.url + "/review/ct_slab_b", headers=headers, timeout=60,
                             json={"verdict": "accepted", "reviewer": "mallory"})
    assert response.status_code == 200, detail(response)
    trail = requests.get(server.url + "/review/ct_slab_b", headers=headers, timeout=60).json()
    recorded = trail["review"]["reviewer"]
    assert recorded == "rita", f"the verdict was recorded under {recorded!r}, not the token's user 'rita'"
    assert "mallory" not in str(trail.get("review_history"))


def test_below_admin_the_review_trail_does_not_show_who_asked_from_where(server, tokens):
    """``GET /review/{id}`` and ``GET /review/`` showed every role the network address (``client``) of whoever
    denoised a study or gave a verdict: below admin the trail keeps who and what, not where from."""
    denoised = requests.post(server.url + "/infer/nlm", params={"image": "ct_slice_a", "output": "json"},
                             data={"params": "{}"}, headers={"Authorization": f"Bearer {tokens['rita']}"},
                             timeout=600)
    assert denoised.status_code == 200, detail(denoised)
    for who in ("uma", "anna", "rita", "adam"):
        headers = {"Authorization": f"Bearer {tokens[who]}"}
        one = requests.get(server.url + "/review/ct_slice_a", headers=headers, timeout=60)
        every = requests.get(server.url + "/review/", headers=headers, timeout=60)
        assert one.status_code == 200 and every.status_code == 200, (who, detail(one), detail(every))
        trail = next(t for t in every.json() if t["image"] == "ct_slice_a")
        for answer in (one.json(), trail):
            result = answer["denoise_results"][-1]
            assert result["user"] == "rita" and result["model"] == "nlm", result
            if who == "adam":
                assert result["client"] == "127.0.0.1", result
            else:
                assert "client" not in result, f"{who} is shown the client address: {result}"
        if who != "adam":
            assert "127.0.0.1" not in one.text + every.text, who


# ------------------------------------------------------------------------------------------------ auth off
def test_with_auth_off_the_demo_stays_open(shared_server):
    """The default (``./run.sh``): no token needed, a stray Authorization header ignored, no login route."""
    for path in ("/info/", "/datastore/?output=all", "/versions/adl", "/review/"):
        assert requests.get(shared_server.url + path, timeout=120).status_code == 200, path
        assert requests.get(shared_server.url + path, headers={"Authorization": "Bearer not-a-jwt"},
                            timeout=120).status_code == 200, path
    assert requests.get(shared_server.url + "/auth/token/valid", timeout=60).status_code == 404
    # its one user runs the server: the answers still name the server's files, as before
    versions = requests.get(shared_server.url + "/versions/adl", timeout=120).json()
    assert str(shared_server.model_dir) in versions["served"]["path"]
    assert str(shared_server.studies) in requests.get(shared_server.url + "/info/", timeout=120).json()["audit"]["dir"]
    assert "path" in requests.get(shared_server.url + "/review/audit/verify", timeout=120).json()

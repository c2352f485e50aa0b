"""Tests for main.py: the HTTP contract, the attacks it must survive, scopes, and real multi-process servers.

Every test gets its own empty database: SQLite always, and PostgreSQL as well when TEST_DATABASE_URL is
set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test). Run: python -m pytest
"""

import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

# Set before main is imported: tests must never touch the developer's app.db or create .secret_key.
os.environ["SECRET_KEY"] = "test-secret-key-that-is-long-enough-0123456789"
os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.gettempdir()}/auth-starter-unused.db"

import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session, SQLModel, select

import main

HERE = Path(__file__).resolve().parent
PASSWORD = "correct horse battery"
DATABASES = ["sqlite"] + (["postgresql"] if os.environ.get("TEST_DATABASE_URL") else [])


# --- Fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return os.environ["TEST_DATABASE_URL"]


@pytest.fixture
def engine(database_url: str, monkeypatch: pytest.MonkeyPatch):
    engine = main.create_db_engine(database_url)
    SQLModel.metadata.drop_all(engine)  # PostgreSQL is shared between tests: start from nothing
    monkeypatch.setattr(main, "engine", engine)
    yield engine
    engine.dispose()


@pytest.fixture
def client(engine) -> TestClient:
    with TestClient(main.app) as client:
        yield client


def register(client, email: str = "ann@example.com", password: str = PASSWORD):
    return client.post("/auth/register", json={"email": email, "password": password})


def login(client, email: str = "ann@example.com", password: str = PASSWORD, scope: str | None = None):
    form = {"username": email, "password": password}
    if scope is not None:
        form["scope"] = scope
    return client.post("/auth/login", data=form)


def signed_up(client, email: str = "ann@example.com", scope: str | None = None) -> dict:
    """Register `email` and log in: the token response."""
    assert register(client, email).status_code == 201
    response = login(client, email, scope=scope)
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def refresh(client, refresh_token: str):
    return client.post("/auth/refresh", json={"refresh_token": refresh_token})


def make_admin_in_db(engine, email: str) -> None:
    with Session(engine) as session:
        user = session.exec(select(main.User).where(main.User.email == email)).one()
        user.role = "admin"
        session.add(user)
        session.commit()


def run_sql(engine, sql: str, **params) -> None:
    with engine.begin() as connection:
        connection.execute(text(sql), params)


def assert_bearer_401(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


# --- The HTTP contract ---------------------------------------------------------------------------


def test_root_points_to_docs(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "/docs" in response.json()["message"]


def test_register_returns_the_public_user_only(client):
    response = register(client)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "email", "is_active"}
    assert body["email"] == "ann@example.com" and body["is_active"] is True
    assert "argon2" not in response.text and PASSWORD not in response.text


def test_register_ignores_fields_a_user_must_not_set(client):
    body = {"email": "ann@example.com", "password": PASSWORD, "role": "admin", "is_active": False, "id": 99,
            "hashed_password": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"}
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201
    assert response.json() == {"id": 1, "email": "ann@example.com", "is_active": True}
    tokens = login(client).json()  # the real password works, and only the user's scope is granted
    assert tokens["scope"] == "me"


def test_register_trims_and_lowercases_email_so_duplicates_conflict(client):
    assert register(client, " Ann@Example.COM ").json()["email"] == "ann@example.com"
    response = register(client, "ann@example.com ")
    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]


def test_an_email_matches_however_its_unicode_was_composed(client):
    decomposed = unicodedata.normalize("NFD", "Änne@exämple.com")
    composed = unicodedata.normalize("NFC", "änne@exämple.com")
    assert register(client, decomposed).json()["email"] == composed
    assert login(client, decomposed).status_code == 200
    assert login(client, composed).status_code == 200
    assert register(client, composed).status_code == 409


@pytest.mark.parametrize("email", ["not-an-email", "ann@", "@example.com", "ann example@x.com", "", "a" * 300 + "@x.com"])
def test_register_rejects_invalid_email(client, email):
    response = register(client, email)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "email"]


@pytest.mark.parametrize(("password", "why"), [("1234567", "at least 8"), ("x" * 129, "at most 128")])
def test_register_rejects_password_outside_length_limits(client, password, why):
    response = register(client, password=password)
    assert response.status_code == 422
    assert why in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("password", ["aaaaaaaa", "x" * 128, "пароль-секрет", "密码密码密码密码", "🔑🔑🔑🔑🔑🔑🔑🔑", "with spaces  ok"])
def test_register_and_login_accept_any_password_of_allowed_length(client, password):
    assert register(client, password=password).status_code == 201
    assert login(client, password=password).status_code == 200


def test_password_is_unicode_normalized_so_it_matches_however_it_was_typed(client):
    password = "Crème brûlée!"
    decomposed, composed = unicodedata.normalize("NFD", password), unicodedata.normalize("NFC", password)
    assert decomposed != composed
    assert register(client, password=decomposed).status_code == 201
    assert login(client, password=composed).status_code == 200
    assert login(client, password=decomposed).status_code == 200


def test_validation_errors_never_echo_the_password(client):
    response = register(client, password="secret7")
    assert response.status_code == 422
    assert "secret7" not in response.text


def test_login_returns_tokens_and_forbids_caching(client):
    register(client)
    response = login(client)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert response.headers["cache-control"] == "no-store"


def test_login_email_is_case_and_space_insensitive(client):
    register(client, "ann@example.com")
    assert login(client, "  ANN@example.com ").status_code == 200


def test_unknown_email_and_wrong_password_get_the_same_401(client):
    register(client)
    unknown = login(client, "nobody@example.com")
    wrong = login(client, password="wrong password")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.headers["www-authenticate"] == wrong.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("username", ["ann@exa%00mple.com", "a" * 100_000 + "%40example.com", "not+an+email", "%ED%A0%80", "%FF%FE"])
def test_login_with_an_impossible_username_is_the_same_401(client, username):
    register(client)
    body = f"username={username}&password=correct+horse+battery"  # raw: NUL, surrogates, invalid UTF-8
    response = client.post("/auth/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Incorrect email or password"}


@pytest.mark.parametrize("form", [{}, {"username": "ann@example.com"}, {"password": PASSWORD}])
def test_login_with_missing_fields_is_422(client, form):
    assert client.post("/auth/login", data=form).status_code == 422


def test_login_json_instead_of_form_is_422(client):
    register(client)
    assert client.post("/auth/login", json={"username": "ann@example.com", "password": PASSWORD}).status_code == 422


def test_users_me_returns_the_user(client):
    tokens = signed_up(client)
    response = client.get("/users/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200
    assert response.json() == {"id": 1, "email": "ann@example.com", "is_active": True}


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer not-a-jwt", "Basic YW5uOnB3", "Bearer a.b.c"])
def test_users_me_without_a_usable_token_is_401(client, header):
    headers = {"Authorization": header} if header is not None else {}
    assert_bearer_401(client.get("/users/me", headers=headers))


def test_refresh_returns_new_tokens_and_uses_up_the_old_one(client):
    tokens = signed_up(client)
    response = refresh(client, tokens["refresh_token"])
    assert response.status_code == 200
    new = response.json()
    assert response.headers["cache-control"] == "no-store"
    assert new["refresh_token"] != tokens["refresh_token"]
    assert new["access_token"] != tokens["access_token"]
    assert client.get("/users/me", headers=bearer(new["access_token"])).status_code == 200
    assert_bearer_401(refresh(client, tokens["refresh_token"]))


@pytest.mark.parametrize("body", [{}, {"refresh_token": ""}, {"refresh_token": "x" * 1000}, {"refresh_token": 5}])
def test_refresh_with_malformed_body_is_422(client, body):
    assert client.post("/auth/refresh", json=body).status_code == 422


def test_refresh_with_unknown_token_is_401(client):
    assert_bearer_401(refresh(client, "made-up-token"))


def test_logout_ends_that_session_only(client):
    first = signed_up(client)
    second = login(client).json()
    assert client.post("/auth/logout", json={"refresh_token": first["refresh_token"]}).status_code == 204
    assert_bearer_401(refresh(client, first["refresh_token"]))
    assert refresh(client, second["refresh_token"]).status_code == 200


def test_logout_is_idempotent_and_accepts_unknown_tokens(client):
    tokens = signed_up(client)
    for token in (tokens["refresh_token"], tokens["refresh_token"], "unknown-token"):
        assert client.post("/auth/logout", json={"refresh_token": token}).status_code == 204


def test_logout_after_rotation_ends_the_whole_session(client):
    tokens = signed_up(client)
    rotated = refresh(client, tokens["refresh_token"]).json()
    client.post("/auth/logout", json={"refresh_token": rotated["refresh_token"]})
    assert_bearer_401(refresh(client, rotated["refresh_token"]))


def test_openapi_shows_the_password_flow_with_scopes(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    flow = schemes["OAuth2PasswordBearer"]["flows"]["password"]
    assert flow["tokenUrl"] == "auth/login"
    assert set(flow["scopes"]) == {"me", "admin"}
    assert client.get("/docs").status_code == 200


def test_no_response_contains_a_password_hash(client, engine):
    tokens = signed_up(client)
    make_admin_in_db(engine, "ann@example.com")
    admin = login(client).json()
    responses = [
        client.get("/users/me", headers=bearer(tokens["access_token"])),
        client.get("/users", headers=bearer(admin["access_token"])),
        register(client, "bob@example.com"),
    ]
    for response in responses:
        assert response.status_code in (200, 201)
        assert "hashed_password" not in response.text and "$argon2" not in response.text


# --- Attacks: refresh tokens -------------------------------------------------------------------


def test_refresh_tokens_are_stored_only_as_sha256_hashes(client, engine):
    tokens = signed_up(client)
    with Session(engine) as session:
        rows = session.exec(select(main.RefreshToken)).all()
    assert len(rows) == 1
    stored = rows[0].model_dump()
    assert tokens["refresh_token"] not in json.dumps(stored, default=str)
    assert rows[0].token_hash == main.hashlib.sha256(tokens["refresh_token"].encode()).hexdigest()


def test_reusing_a_rotated_refresh_token_revokes_the_whole_family(client):
    stolen = signed_up(client)
    other_session = login(client).json()
    rotated = refresh(client, stolen["refresh_token"]).json()  # the legitimate client rotates
    assert_bearer_401(refresh(client, stolen["refresh_token"]))  # the thief replays the old one
    assert_bearer_401(refresh(client, rotated["refresh_token"]))  # so the fresh token dies too
    assert refresh(client, other_session["refresh_token"]).status_code == 200  # other logins untouched


def test_a_session_ends_at_its_absolute_lifetime_however_often_it_is_refreshed(client, engine):
    tokens = signed_up(client)
    with Session(engine) as session:
        first_expiry = session.exec(select(main.LoginSession.expires_at)).one()
    for _ in range(3):
        tokens = refresh(client, tokens["refresh_token"]).json()
    with Session(engine) as session:
        assert session.exec(select(main.LoginSession.expires_at)).all() == [first_expiry]  # one session, same end
        assert len(set(session.exec(select(main.RefreshToken.session_id)).all())) == 1
    run_sql(engine, "UPDATE loginsession SET expires_at = :past", past=main.utc_now() - main.timedelta(seconds=1))
    assert_bearer_401(refresh(client, tokens["refresh_token"]))


def test_finished_sessions_are_forgotten_at_the_next_login(client, engine):
    tokens = signed_up(client)
    refresh(client, tokens["refresh_token"])
    run_sql(engine, "UPDATE loginsession SET expires_at = :past", past=main.utc_now() - main.timedelta(seconds=1))
    login(client)
    with Session(engine) as session:
        assert len(session.exec(select(main.LoginSession)).all()) == 1
        assert len(session.exec(select(main.RefreshToken)).all()) == 1  # the old session's two tokens are gone


def test_session_lifetime_follows_the_setting(client, engine):
    before = main.utc_now()
    signed_up(client)
    with Session(engine) as session:
        expires_at = session.exec(select(main.LoginSession.expires_at)).one()
    expires_at = expires_at.replace(tzinfo=main.timezone.utc)  # SQLite hands datetimes back without a zone
    assert before + main.timedelta(days=14) <= expires_at <= main.utc_now() + main.timedelta(days=14)


def test_deactivating_a_user_stops_refresh_and_access_at_once(client, engine):
    tokens = signed_up(client)
    run_sql(engine, 'UPDATE "user" SET is_active = :no', no=False)
    assert_bearer_401(client.get("/users/me", headers=bearer(tokens["access_token"])))
    assert_bearer_401(refresh(client, tokens["refresh_token"]))
    response = login(client)
    assert response.status_code == 403 and "access_token" not in response.text


def test_deleted_users_tokens_are_rejected(client, engine):
    tokens = signed_up(client)
    run_sql(engine, 'DELETE FROM "user"')
    assert_bearer_401(client.get("/users/me", headers=bearer(tokens["access_token"])))
    assert_bearer_401(refresh(client, tokens["refresh_token"]))


def test_an_access_token_is_not_a_refresh_token(client):
    tokens = signed_up(client)
    assert_bearer_401(refresh(client, tokens["access_token"]))


def test_a_refresh_token_is_not_an_access_token(client):
    tokens = signed_up(client)
    assert_bearer_401(client.get("/users/me", headers=bearer(tokens["refresh_token"])))


# --- Attacks: forged access tokens ------------------------------------------------------------


def claims(**changes) -> dict:
    """Valid access-token claims for user 1, with `changes` applied (a value of None drops the claim)."""
    now = int(time.time())
    result = {"sub": "1", "type": "access", "scope": "me", "iat": now, "exp": now + 600}
    result.update(changes)
    return {key: value for key, value in result.items() if value is not None}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


FORGERIES = {
    "alg none": lambda: f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.",
    "alg none with signature": lambda: jwt.encode(claims(), None, algorithm="none") + "c2ln",
    "HS512 with our key": lambda: jwt.encode(claims(), main.SECRET_KEY, algorithm="HS512"),
    "another key": lambda: jwt.encode(claims(), "another-key-that-is-also-long-enough-000000", algorithm="HS256"),
    "tampered payload": lambda: (lambda good: ".".join([good.split(".")[0], b64(claims(sub="2")), good.split(".")[2]]))(
        jwt.encode(claims(), main.SECRET_KEY, algorithm="HS256")),
    "expired": lambda: jwt.encode(claims(exp=int(time.time()) - 5), main.SECRET_KEY, algorithm="HS256"),
    "no exp": lambda: jwt.encode(claims(exp=None), main.SECRET_KEY, algorithm="HS256"),
    "no iat": lambda: jwt.encode(claims(iat=None), main.SECRET_KEY, algorithm="HS256"),
    "iat in the future": lambda: jwt.encode(claims(iat=int(time.time()) + 3600), main.SECRET_KEY, algorithm="HS256"),
    "no sub": lambda: jwt.encode(claims(sub=None), main.SECRET_KEY, algorithm="HS256"),
    "no type": lambda: jwt.encode(claims(type=None), main.SECRET_KEY, algorithm="HS256"),
    "type refresh": lambda: jwt.encode(claims(type="refresh"), main.SECRET_KEY, algorithm="HS256"),
    "no scope": lambda: jwt.encode(claims(scope=None), main.SECRET_KEY, algorithm="HS256"),
    "sub not numeric": lambda: jwt.encode(claims(sub="ann@example.com"), main.SECRET_KEY, algorithm="HS256"),
    "sub a number, not a string": lambda: jwt.encode(claims(sub=1), main.SECRET_KEY, algorithm="HS256"),
    "sub zero": lambda: jwt.encode(claims(sub="0"), main.SECRET_KEY, algorithm="HS256"),
    "sub negative": lambda: jwt.encode(claims(sub="-1"), main.SECRET_KEY, algorithm="HS256"),
    "sub huge": lambda: jwt.encode(claims(sub="9" * 30), main.SECRET_KEY, algorithm="HS256"),
    "sub beyond a 32-bit id": lambda: jwt.encode(claims(sub=str(2**31)), main.SECRET_KEY, algorithm="HS256"),
    "sub unknown user": lambda: jwt.encode(claims(sub="999"), main.SECRET_KEY, algorithm="HS256"),
    "exp not a number": lambda: jwt.encode(claims(exp="tomorrow"), main.SECRET_KEY, algorithm="HS256"),
    "payload not json": lambda: f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.bm90IGpzb24.c2ln",
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_access_tokens_are_401(client, forgery):
    signed_up(client)  # user 1 exists, so only the forgery can be at fault
    token = FORGERIES[forgery]()
    assert_bearer_401(client.get("/users/me", headers=bearer(token)))


def test_a_correctly_signed_token_is_accepted(client):
    """The control for the forgeries above: the same claims, properly signed, work."""
    signed_up(client)
    token = jwt.encode(claims(), main.SECRET_KEY, algorithm="HS256")
    assert client.get("/users/me", headers=bearer(token)).status_code == 200


def test_no_exception_instance_is_shared_between_requests():
    """Re-raising one shared exception grows its traceback on every request and keeps each request's
    frames (and the passwords in them) alive: every 401 must be a new exception."""
    shared = [name for name, value in vars(main).items() if isinstance(value, Exception)]
    assert shared == []
    assert main.unauthorized("x") is not main.unauthorized("x")


# --- Attacks: passwords -------------------------------------------------------------------------


def test_passwords_are_hashed_with_argon2id_at_least_at_owasp_minimum(client, engine):
    register(client)
    with Session(engine) as session:
        stored = session.exec(select(main.User.hashed_password)).one()
    variant, version, params, *_ = stored.split("$")[1:]
    params = dict(item.split("=") for item in params.split(","))
    assert variant == "argon2id"
    assert int(params["m"]) >= 19 * 1024 and int(params["t"]) >= 2 and int(params["p"]) >= 1


def test_login_upgrades_a_hash_with_outdated_parameters(client, engine):
    register(client)
    weak = PasswordHasher(memory_cost=8 * 1024, time_cost=1, parallelism=1).hash(PASSWORD)
    run_sql(engine, 'UPDATE "user" SET hashed_password = :weak', weak=weak)
    assert login(client).status_code == 200
    with Session(engine) as session:
        stored = session.exec(select(main.User.hashed_password)).one()
    assert stored != weak and not main.password_hasher.check_needs_rehash(stored)
    assert login(client).status_code == 200  # the new hash still matches the password


def test_unknown_email_is_checked_against_a_hash_like_a_wrong_password(client, monkeypatch):
    register(client)
    checked = []
    real_verify = main._verify
    monkeypatch.setattr(main, "_verify", lambda password, hashed: checked.append(hashed) or real_verify(password, hashed))
    login(client, "nobody@example.com")
    login(client, password="wrong password")
    assert len(checked) == 2
    assert checked[0] == main.DUMMY_HASH and checked[0].startswith("$argon2id$")


def test_unknown_email_takes_as_long_as_a_wrong_password(client):
    register(client)
    unknown, wrong = [], []
    for _ in range(9):  # interleaved, so a busy machine slows both alike
        for email, password, times in (("nobody@example.com", PASSWORD, unknown), ("ann@example.com", "wrong pw!", wrong)):
            started = time.perf_counter()
            assert login(client, email, password).status_code == 401
            times.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.7 <= ratio <= 1.3, ratio


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
def test_a_huge_password_is_refused_before_any_hashing(client, monkeypatch, path):
    register(client)
    monkeypatch.setattr(main, "_hash", lambda *args: pytest.fail("hashed a huge password"))
    monkeypatch.setattr(main, "_verify", lambda *args: pytest.fail("verified a huge password"))
    huge = "x" * 1_000_000
    if path == "/auth/register":
        response = client.post(path, json={"email": "big@example.com", "password": huge})
    else:
        response = client.post(path, data={"username": "ann@example.com", "password": huge})
    assert response.status_code == 422
    assert "128" in response.text and len(response.content) < 1000  # says why, doesn't echo it back


def test_hashing_runs_on_the_bounded_hash_pool_with_no_database_connection_held(client, monkeypatch):
    seen = []
    real_hash, real_verify = main._hash, main._verify

    def record(real):
        def wrapper(*args):
            seen.append((threading.current_thread().name, main.engine.pool.checkedout()))
            return real(*args)
        return wrapper

    monkeypatch.setattr(main, "_hash", record(real_hash))
    monkeypatch.setattr(main, "_verify", record(real_verify))
    signed_up(client)
    assert len(seen) == 2
    for thread_name, connections_in_use in seen:
        assert thread_name.startswith("argon2")  # off the event loop, on the pool of its own
        assert connections_in_use == 0
    assert main.hash_pool._max_workers == (os.cpu_count() or 1)


# --- Scopes and admin routes -----------------------------------------------------------------


def admin_and_user(client, engine) -> tuple[dict, dict]:
    """An admin (logged in after promotion) and a plain user: their token responses."""
    signed_up(client, "admin@example.com")
    make_admin_in_db(engine, "admin@example.com")
    admin = login(client, "admin@example.com").json()
    user = signed_up(client, "user@example.com")
    return admin, user


def test_scopes_come_from_the_role(client, engine):
    admin, user = admin_and_user(client, engine)
    assert user["scope"] == "me"
    assert set(admin["scope"].split()) == {"me", "admin"}


def test_asking_for_a_scope_you_dont_hold_does_not_grant_it(client, engine):
    signed_up(client)
    response = login(client, scope="me admin")
    assert response.status_code == 200 and response.json()["scope"] == "me"
    only_admin = login(client, scope="admin").json()
    assert only_admin["scope"] == ""
    denied = client.get("/users", headers=bearer(only_admin["access_token"]))
    assert denied.status_code == 403


def test_a_narrower_scope_can_be_requested_and_refresh_keeps_it(client, engine):
    admin, _ = admin_and_user(client, engine)
    narrow = login(client, "admin@example.com", scope="me").json()
    assert narrow["scope"] == "me"
    refreshed = refresh(client, narrow["refresh_token"]).json()
    assert refreshed["scope"] == "me"
    response = client.get("/users", headers=bearer(refreshed["access_token"]))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="admin"'


def test_users_me_needs_the_me_scope(client, engine):
    signed_up(client)
    token = login(client, scope="admin").json()["access_token"]  # granted nothing
    response = client.get("/users/me", headers=bearer(token))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="me"'


def test_admin_routes_refuse_users_and_anonymous(client, engine):
    _, user = admin_and_user(client, engine)
    assert client.get("/users", headers=bearer(user["access_token"])).status_code == 403
    assert client.patch("/users/1", json={"is_active": False}, headers=bearer(user["access_token"])).status_code == 403
    assert client.delete("/users/1", headers=bearer(user["access_token"])).status_code == 403
    assert_bearer_401(client.get("/users"))


def test_demotion_takes_effect_on_an_existing_token(client, engine):
    admin, _ = admin_and_user(client, engine)
    assert client.get("/users", headers=bearer(admin["access_token"])).status_code == 200
    run_sql(engine, "UPDATE \"user\" SET role = 'user' WHERE email = 'admin@example.com'")
    assert client.get("/users", headers=bearer(admin["access_token"])).status_code == 403
    assert client.get("/users/me", headers=bearer(admin["access_token"])).status_code == 200


def test_promotion_needs_a_new_login(client, engine):
    user = signed_up(client)
    make_admin_in_db(engine, "ann@example.com")
    assert client.get("/users", headers=bearer(user["access_token"])).status_code == 403
    assert client.get("/users", headers=bearer(login(client).json()["access_token"])).status_code == 200


def test_admin_lists_users_a_page_at_a_time(client, engine):
    admin, _ = admin_and_user(client, engine)
    for n in range(3):
        register(client, f"extra{n}@example.com")
    headers = bearer(admin["access_token"])
    everyone = client.get("/users", headers=headers).json()
    assert [u["email"] for u in everyone] == ["admin@example.com", "user@example.com"] + [f"extra{n}@example.com" for n in range(3)]
    assert set(everyone[0]) == {"id", "email", "is_active", "role"}
    page = client.get("/users?offset=1&limit=2", headers=headers).json()
    assert [u["email"] for u in page] == ["user@example.com", "extra0@example.com"]
    assert client.get("/users?limit=0", headers=headers).status_code == 422
    assert client.get("/users?offset=-1", headers=headers).status_code == 422
    assert client.get("/users?offset=99999999999999999999999", headers=headers).status_code == 422
    assert client.get(f"/users?offset={2**31 - 1}", headers=headers).json() == []


def test_user_list_limit_is_capped(client, engine, monkeypatch):
    admin, _ = admin_and_user(client, engine)
    monkeypatch.setattr(main, "MAX_PAGE_SIZE", 1)
    response = client.get("/users?limit=1000", headers=bearer(admin["access_token"]))
    assert response.status_code == 200 and len(response.json()) == 1


def test_admin_deactivates_and_reactivates_a_user(client, engine):
    admin, user = admin_and_user(client, engine)
    user_id = client.get("/users/me", headers=bearer(user["access_token"])).json()["id"]
    response = client.patch(f"/users/{user_id}", json={"is_active": False}, headers=bearer(admin["access_token"]))
    assert response.status_code == 200 and response.json()["is_active"] is False
    assert_bearer_401(client.get("/users/me", headers=bearer(user["access_token"])))
    assert_bearer_401(refresh(client, user["refresh_token"]))
    assert login(client, "user@example.com").status_code == 403
    response = client.patch(f"/users/{user_id}", json={"is_active": True}, headers=bearer(admin["access_token"]))
    assert response.status_code == 200 and response.json()["is_active"] is True
    assert login(client, "user@example.com").status_code == 200
    assert_bearer_401(refresh(client, user["refresh_token"]))  # the sessions revoked on deactivation stay ended


def test_deactivation_revokes_refresh_sessions_in_the_database(client, engine):
    admin, user = admin_and_user(client, engine)
    client.patch("/users/2", json={"is_active": False}, headers=bearer(admin["access_token"]))
    with Session(engine) as session:
        revoked = session.exec(select(main.LoginSession.revoked).where(main.LoginSession.user_id == 2)).all()
    assert revoked == [True]


def test_admin_changes_a_role(client, engine):
    admin, user = admin_and_user(client, engine)
    response = client.patch("/users/2", json={"role": "admin"}, headers=bearer(admin["access_token"]))
    assert response.status_code == 200 and response.json()["role"] == "admin"
    assert "admin" in login(client, "user@example.com").json()["scope"].split()


@pytest.mark.parametrize("body", [{"is_active": "maybe"}, {"role": "superuser"}, {"is_admin": True}, {"email": "x@y.com"}])
def test_admin_update_rejects_bad_fields(client, engine, body):
    admin, _ = admin_and_user(client, engine)
    assert client.patch("/users/2", json=body, headers=bearer(admin["access_token"])).status_code == 422


@pytest.mark.parametrize("user_id", ["999", "0", "-1", str(2**31), str(2**63), "99999999999999999999999"])
def test_admin_routes_404_for_unknown_users(client, engine, user_id):
    admin, _ = admin_and_user(client, engine)
    headers = bearer(admin["access_token"])
    assert client.patch(f"/users/{user_id}", json={"is_active": False}, headers=headers).status_code == 404
    assert client.delete(f"/users/{user_id}", headers=headers).status_code == 404


def test_admin_route_with_non_numeric_id_is_422(client, engine):
    admin, _ = admin_and_user(client, engine)
    assert client.delete("/users/abc", headers=bearer(admin["access_token"])).status_code == 422


def test_admin_cannot_change_or_delete_themselves(client, engine):
    admin, _ = admin_and_user(client, engine)
    headers = bearer(admin["access_token"])
    assert client.patch("/users/1", json={"is_active": False}, headers=headers).status_code == 400
    assert client.delete("/users/1", headers=headers).status_code == 400
    assert client.get("/users", headers=headers).status_code == 200


def test_admin_deletes_a_user_and_their_tokens_stop_working(client, engine):
    admin, user = admin_and_user(client, engine)
    assert client.delete("/users/2", headers=bearer(admin["access_token"])).status_code == 204
    assert_bearer_401(client.get("/users/me", headers=bearer(user["access_token"])))
    assert_bearer_401(refresh(client, user["refresh_token"]))
    assert register(client, "user@example.com").status_code == 201  # the email is free again


# --- Command line: make-admin -----------------------------------------------------------------


def run_main(*args: str, cwd: Path = HERE, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "main.py", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60)


def test_make_admin_gives_the_admin_role(client, engine, database_url):
    signed_up(client)
    result = run_main("make-admin", " Ann@Example.com", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "ann@example.com is now an admin" in result.stdout
    assert set(login(client).json()["scope"].split()) == {"me", "admin"}


def test_make_admin_with_unknown_email_fails_clearly(engine, database_url):
    result = run_main("make-admin", "nobody@example.com", DATABASE_URL=database_url)
    assert result.returncode == 1
    assert "No account with the email 'nobody@example.com'" in result.stderr


def test_main_without_a_command_prints_usage():
    result = run_main()
    assert result.returncode == 2 and "make-admin" in result.stderr


# --- Secret key ----------------------------------------------------------------------------------


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    """A copy of main.py in a fresh folder, so a generated .secret_key lands there."""
    shutil.copy(HERE / "main.py", tmp_path / "main.py")
    return tmp_path


def env_without_secret(app_dir: Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "SECRET_KEY"}
    env["DATABASE_URL"] = f"sqlite:///{app_dir / 'app.db'}"
    env.update(extra)
    return env


IMPORT_AND_PRINT_KEY = "import main; print(main.SECRET_KEY)"


def test_a_short_secret_key_stops_startup_naming_it(app_copy):
    result = subprocess.run([sys.executable, "-c", "import main"], cwd=app_copy, capture_output=True, text=True,
                            env=env_without_secret(app_copy, SECRET_KEY="x" * 31))
    assert result.returncode != 0
    assert "SECRET_KEY must be at least 32 bytes" in result.stderr


def test_a_secret_key_from_a_dotenv_file_is_used(app_copy):
    (app_copy / ".env").write_text("SECRET_KEY=" + "k" * 40 + "\n")
    result = subprocess.run([sys.executable, "-c", IMPORT_AND_PRINT_KEY], cwd=app_copy, capture_output=True,
                            text=True, env=env_without_secret(app_copy))
    assert result.stdout.strip() == "k" * 40
    assert not (app_copy / ".secret_key").exists()


def test_without_secret_key_one_is_generated_once_kept_private_and_reused(app_copy):
    keys = []
    for _ in range(2):  # two starts
        result = subprocess.run([sys.executable, "-c", IMPORT_AND_PRINT_KEY], cwd=app_copy, capture_output=True,
                                text=True, env=env_without_secret(app_copy))
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("SECRET_KEY is not set") == 1
        keys.append(result.stdout.strip())
    key_file = app_copy / ".secret_key"
    assert keys[0] == keys[1] == key_file.read_text().strip()
    assert len(keys[0]) >= 64
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in app_copy.iterdir() if p.name.startswith(".secret_key")] == [".secret_key"]


def test_without_secret_key_and_nowhere_to_save_one_startup_says_to_set_it(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main.load_or_create_secret_key(tmp_path / "missing-folder" / ".secret_key")
    assert "set SECRET_KEY" in str(stopped.value)


def test_processes_starting_together_agree_on_one_generated_key(app_copy):
    processes = [subprocess.Popen([sys.executable, "-c", IMPORT_AND_PRINT_KEY], cwd=app_copy, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_without_secret(app_copy))
                 for _ in range(8)]
    keys = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert len(keys) == 1 and keys != {""}


def test_workers_starting_together_on_an_empty_database_all_get_the_tables(engine, database_url):
    """What `uvicorn --workers N` does on its first start: every worker creates the tables at once."""
    start_at = time.time() + 3  # all processes import first, then create the tables at the same moment
    create = f"import time, main; time.sleep(max(0, {start_at} - time.time())); main.create_tables()"
    env = {**os.environ, "DATABASE_URL": database_url}
    processes = [subprocess.Popen([sys.executable, "-c", create], cwd=HERE, env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors
    with Session(engine) as session:
        assert session.exec(select(main.User)).all() == []


CORS_PREFLIGHT = """
import main
from fastapi.testclient import TestClient
client = TestClient(main.app)
for origin in ("http://localhost:5173", "https://evil.example"):
    r = client.options("/users/me", headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                             "Access-Control-Request-Headers": "authorization"})
    print(origin, r.headers.get("access-control-allow-origin"))
"""


@pytest.mark.parametrize("cors_origins", [None, "http://localhost:5173, https://app.example.com"])
def test_only_configured_origins_may_call_the_api_from_a_browser(app_copy, cors_origins):
    env = {key: value for key, value in os.environ.items() if key != "CORS_ORIGINS"}
    if cors_origins:
        env["CORS_ORIGINS"] = cors_origins
    result = subprocess.run([sys.executable, "-c", CORS_PREFLIGHT], cwd=app_copy, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    allowed = "http://localhost:5173" if cors_origins else "None"
    assert result.stdout.split("\n")[:2] == [f"http://localhost:5173 {allowed}", "https://evil.example None"]


def test_secret_files_are_git_ignored():
    ignored = (HERE / ".gitignore").read_text().split()
    assert {".secret_key", ".env", "*.db"} <= set(ignored)
    assert "SECRET_KEY=" not in (HERE / ".env.example").read_text().replace("# SECRET_KEY=", "")


# --- Real servers: several processes on one database ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(engine, database_url, tmp_path):
    """Two `uvicorn --workers 2` servers (four processes) sharing one database, with no SECRET_KEY set:
    all four must agree on the generated key. Yields the two servers."""
    shutil.copy(HERE / "main.py", tmp_path / "main.py")
    env = env_without_secret(tmp_path, DATABASE_URL=database_url)
    servers, urls = [], []
    for _ in range(2):
        port = free_port()
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--workers", "2", "--log-level", "warning"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"server-{port}.log", "w"),
            start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            for _ in range(300):
                try:
                    httpx.get(url + "/", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        yield [Server(url) for url in urls]
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            server.wait(30)
    logs = "".join(log.read_text() for log in tmp_path.glob("server-*.log"))
    assert "Traceback" not in logs and "database is locked" not in logs, logs


def in_parallel(calls) -> list:
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


class Server:
    """A real server for the helpers above (register, login, refresh). Each request opens a fresh
    connection, so requests spread over the server's worker processes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)


def test_cluster_a_token_from_one_server_works_on_every_process(cluster):
    a, b = cluster
    assert register(a).status_code == 201
    tokens = login(b).json()
    for server in (a, b) * 10:  # enough requests to reach every worker process
        response = server.get("/users/me", headers=bearer(tokens["access_token"]))
        assert response.status_code == 200, response.text
    assert refresh(a, tokens["refresh_token"]).status_code == 200


def test_cluster_concurrent_refreshes_of_one_token_let_exactly_one_through(cluster):
    a, b = cluster
    register(a)
    for _ in range(3):
        token = login(a).json()["refresh_token"]
        calls = [lambda server=server: refresh(server, token) for server in (a, b) * 4]
        codes = sorted(response.status_code for response in in_parallel(calls))
        assert codes == [200] + [401] * 7, codes


def test_cluster_concurrent_registrations(cluster):
    a, b = cluster
    distinct = [lambda n=n: register((a, b)[n % 2], f"user{n}@example.com") for n in range(40)]
    responses = in_parallel(distinct)
    assert [r.status_code for r in responses] == [201] * 40, [r.text for r in responses if r.status_code != 201]
    same = [lambda n=n: register((a, b)[n % 2], "same@example.com") for n in range(12)]
    codes = sorted(response.status_code for response in in_parallel(same))
    assert codes == [201] + [409] * 11, codes


def test_cluster_a_flood_of_logins_all_succeed(cluster):
    a, b = cluster
    register(a)
    calls = [lambda n=n: login((a, b)[n % 2]) for n in range(48)]
    assert [response.status_code for response in in_parallel(calls)] == [200] * 48


def test_cluster_a_refresh_racing_logout_or_replay_cannot_outlive_the_session(cluster):
    """Logout (or a replayed token) ending a session while a refresh of it is in flight: whichever wins,
    no token of that session may work afterwards."""
    a, b = cluster
    register(a)

    def assert_session_dead(responses):
        for response in responses:
            if response.status_code == 200:  # the refresh won the race: its new token must be dead anyway
                assert refresh(a, response.json()["refresh_token"]).status_code == 401

    for _ in range(8):
        token = login(a).json()["refresh_token"]
        logout = lambda: b.post("/auth/logout", json={"refresh_token": token})
        assert_session_dead(in_parallel([lambda: refresh(a, token), logout]))

        first = login(a).json()["refresh_token"]
        second = refresh(a, first).json()["refresh_token"]
        # the thief replays the first token while the client refreshes the second
        assert_session_dead(in_parallel([lambda: refresh(b, first), lambda: refresh(a, second)]))

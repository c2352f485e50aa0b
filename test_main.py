"""Tests for main.py. Run: python -m pytest

This file follows main.py's chapters and marks what serves a later chapter as main.py does
(`# ch. N`): trim a chapter from both files, and the suite still passes. First the fixtures and
helpers: `client` (in-process, FastAPI's TestClient), `server` and `cluster` (real uvicorn), and
the checks of main.py itself (chapters you can trim, read forward, within budget). Then chapters
1 and 3 to 8, and last chapter 2 (keep): its final test reads what every test before it saw.

Every test gets its own empty database: SQLite always, and PostgreSQL as well when
TEST_DATABASE_URL is set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test).
"""

import ast
import asyncio
import base64
import concurrent.futures
import contextlib
import email
import email.policy
import glob
import html
import http.cookiejar
import http.server
import inspect
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Set before main is imported: tests must never touch the developer's app.db or create .secret_key.
os.environ["SECRET_KEY"] = "test-secret-key-that-is-long-enough-for-hs512-0123456789abcdefghij"
os.environ["DATABASE_URL"] = f"sqlite:///{tempfile.gettempdir()}/auth-starter-unused.db"

import httpx2 as httpx
import jwt
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from argon2 import PasswordHasher, Type
from authlib.integrations.httpx_client import OAuth2Client, OAuthError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from joserfc.jwk import RSAKey
from playwright.sync_api import sync_playwright
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, select
from starlette.middleware.sessions import SessionMiddleware

import main

HERE = Path(__file__).resolve().parent


PASSWORD = "correct horse battery"


DATABASES = ["sqlite"] + (["postgresql"] if os.environ.get("TEST_DATABASE_URL") else [])


# (method, route, status) of every answer a test got.
SEEN_STATUSES: set[tuple[str, str, int]] = set()


def record_status(response: httpx.Response) -> None:
    for (
        route
    ) in main.app.routes:  # the first that matches is the one that answered, as in Starlette
        if (
            isinstance(route, APIRoute)
            and response.request.method in route.methods
            and route.path_regex.match(response.request.url.path)
        ):
            SEEN_STATUSES.add((response.request.method, route.path, response.status_code))
            return


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return os.environ["TEST_DATABASE_URL"]


@pytest.fixture
def engine(database_url: str, monkeypatch: pytest.MonkeyPatch):
    engine = main.create_db_engine(database_url)
    cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
    # PostgreSQL is shared between tests: start from nothing, old tables included.
    with engine.begin() as connection:
        for table in ["refreshtoken", "loginsession", *reversed(SQLModel.metadata.sorted_tables)]:
            connection.execute(text(f'DROP TABLE IF EXISTS "{table}"{cascade}'))
    monkeypatch.setattr(main, "engine", engine)
    # ch. 6: no developer's .env sends our test emails
    monkeypatch.setattr(main.email_settings, "smtp_host", "")
    yield engine
    engine.dispose()


def test_client(address: str = "testclient") -> TestClient:
    """An in-process client whose requests come from `address` (login throttling counts per
    address)."""
    client = TestClient(main.app, client=(address, 50000))
    client.event_hooks = {"request": [], "response": [record_status]}
    return client


test_client.__test__ = False  # a helper, not a test


@pytest.fixture
def client(engine) -> TestClient:
    with test_client() as client:
        yield client


def post_json(client, path: str, body: dict):
    """POST `body` as JSON with every non-ASCII character escaped, so even a lone surrogate can be
    sent."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def register(client, email: str = "ann@example.com", password: str = PASSWORD):
    return post_json(client, "/auth/register", {"email": email, "password": password})


def login(
    client,
    email: str = "ann@example.com",
    password: str = PASSWORD,
    scope: str | None = None,
    **headers,
):
    form = {"username": email, "password": password}
    if scope is not None:
        form["scope"] = scope
    return client.post("/auth/login", data=form, headers=headers)


def signed_up(client, email: str = "ann@example.com", scope: str | None = None) -> dict:
    """Register `email` and log in: the token response."""
    assert register(client, email).status_code == 201
    response = login(client, email, scope=scope)
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def me(client, tokens: dict):
    return client.get("/users/me", headers=bearer(tokens["access_token"]))


def run_sql(engine, sql: str, **params) -> None:
    with engine.begin() as connection:
        connection.execute(text(sql), params)


def rows(engine, table: type[SQLModel]) -> list:
    with Session(engine) as session:
        return list(session.exec(select(table)).all())


def assert_bearer_401(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768 and up), so that no outgoing connection
    takes it before the server the test starts binds it."""
    while True:
        port = 20000 + secrets.randbelow(12768)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port


class Server:
    """A real uvicorn server for the helpers above (register, login, refresh, ...). Each request
    opens a fresh connection from `address` (any 127.0.0.N), so requests spread over the server's
    worker processes."""

    def __init__(
        self,
        url: str,
        log: Path,
        address: str = "127.0.0.1",
        process: subprocess.Popen | None = None,
        uds: Path | None = None,
    ) -> None:
        self.url, self.log, self.address, self.process, self.uds = url, log, address, process, uds

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        if self.uds:  # a Unix socket: the server knows no client address
            transport = httpx.HTTPTransport(uds=str(self.uds))
        else:
            transport = httpx.HTTPTransport(local_address=self.address)
        with httpx.Client(
            transport=transport, timeout=60, verify=False, event_hooks={"response": [record_status]}
        ) as c:
            return c.request(method, self.url + path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def patch(self, path: str, **kwargs) -> httpx.Response:
        return self.request("PATCH", path, **kwargs)

    def from_address(self, address: str) -> "Server":
        return Server(self.url, self.log, address, self.process, self.uds)


@contextmanager
def running_servers(
    app_dir: Path,
    database_url: str,
    count: int = 1,
    workers: int = 1,
    app: str = "main:app",
    uds: bool = False,
    ports: list[int] | None = None,
    **env: str,
) -> Iterator[list[Server]]:
    """`count` real `uvicorn main:app --workers N` servers on one database, from a copy of main.py
    in app_dir, each on a port of 127.0.0.1 (free ones, or `ports`) or, with `uds`, on a Unix
    socket."""
    shutil.copy(HERE / "main.py", app_dir / "main.py")
    environment = {**os.environ, "DATABASE_URL": database_url, "SMTP_HOST": "", **env}
    processes, servers = [], []
    for n in range(count):
        port = ports[n] if ports else free_port()
        log = app_dir / f"server-{port}.log"
        socket_path = app_dir / f"server-{port}.sock" if uds else None
        listen = ["--uds", str(socket_path)] if uds else ["--port", str(port)]
        with open(
            log, "w"
        ) as log_file:  # the server writes to it; this process needs no handle on it
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", app, *listen, "--workers", str(workers)],
                    cwd=app_dir,
                    env=environment,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        servers.append(
            Server(f"http://127.0.0.1:{port}", log, process=processes[-1], uds=socket_path)
        )
    try:
        for server in servers:
            deadline = time.monotonic() + 90  # a loaded machine may take a while to start Python
            while True:
                try:
                    # Httpx leaks the socket of a refused Unix connection: probe first.
                    if server.uds:
                        with socket.socket(socket.AF_UNIX) as probe:
                            probe.connect(str(server.uds))
                    server.get("/", timeout=1)
                    break
                except (OSError, httpx.HTTPError):
                    assert time.monotonic() < deadline, server.log.read_text()
                    assert server.process.poll() is None, server.log.read_text()
                    time.sleep(0.1)
        yield servers
    finally:
        for process in processes:
            if process.poll() is None:  # not already stopped by the test
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:  # wedged: don't let it outlive the test
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
    logs = "".join(server.log.read_text() for server in servers)
    assert "Traceback" not in logs and "database is locked" not in logs, logs


@pytest.fixture
def server(engine, database_url, tmp_path) -> Iterator[Server]:
    """One real `uvicorn main:app` process on the test database."""
    with running_servers(tmp_path, database_url) as servers:
        yield servers[0]


@pytest.fixture
def cluster(engine, database_url, tmp_path) -> Iterator[list[Server]]:
    """Two `uvicorn --workers 2` servers (four processes) sharing one database, with no SECRET_KEY
    set: all four must agree on the generated key."""
    environment = {key: value for key, value in os.environ.items() if key != "SECRET_KEY"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", environment)
        with running_servers(tmp_path, database_url, count=2, workers=2) as servers:
            patch.undo()
            yield servers


def in_parallel(calls: list[Callable]) -> list:
    """Run the calls in threads, released at the same moment; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def access_claims(tokens: dict) -> dict:
    return jwt.decode(tokens["access_token"], options={"verify_signature": False})


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


def start_main(app_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    """Import the copy of main.py in `app_dir` in a new process, with no SECRET_KEY but `extra`: the
    key it uses."""
    command = [sys.executable, "-c", "import main; print(main.SECRET_KEY)"]
    environment = env_without_secret(app_dir, **extra)
    return subprocess.run(
        command, cwd=app_dir, capture_output=True, text=True, env=environment, timeout=60
    )


class RecordingHasher:
    """Stands in for main.password_hasher: records each hash and verify (its arguments, the thread
    it ran on, the pooled connections checked out meanwhile), then does the real work."""

    def __init__(self) -> None:
        self.real, self.calls = main.password_hasher, []

    def __getattr__(self, name: str):
        method = getattr(self.real, name)
        if name not in ("hash", "verify"):
            return method

        def record(*args):
            self.calls.append(
                (name, args, threading.current_thread().name, main.engine.pool.checkedout())
            )
            return method(*args)

        return record


@pytest.fixture
def hasher(monkeypatch) -> RecordingHasher:
    recording = RecordingHasher()
    monkeypatch.setattr(main, "password_hasher", recording)
    return recording


def hammer(
    calls: list[tuple[str, float, Callable[[httpx.Client], httpx.Response]]],
) -> list[tuple[str, int | str, float]]:
    """Make every call (name, seconds to wait first, function) from its own thread and connection,
    all released at the same moment: (name, status or error, seconds taken) of each."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    with httpx.Client(
        timeout=60, limits=limits, verify=False, event_hooks={"response": [record_status]}
    ) as http:

        def timed(name: str, wait: float, call: Callable) -> tuple[str, int | str, float]:
            time.sleep(wait)
            started = time.perf_counter()
            try:
                status = call(http).status_code
            except httpx.HTTPError as error:
                status = type(error).__name__
            return name, status, time.perf_counter() - started

        return in_parallel([lambda args=args: timed(*args) for args in calls])


def assert_never_wedged(results: list[tuple[str, int | str, float]]) -> None:
    """No 5xx or dropped request, and none slower than 2 s but at the token endpoint, where the
    refresh grant waits its turn with the logins that hash."""
    assert [r for r in results if not isinstance(r[1], int) or r[1] >= 500] == []
    assert [r for r in results if r[0] not in ("login", "grant") and r[2] > 2] == []


# --- main.py itself: chapters you can trim (the README's "Trim it"), read forward, within budget
CHAPTER = re.compile(r"^# === (\d+)\. (.*)$", re.MULTILINE)


def chapters(source: str) -> dict[int, tuple[int, int, str]]:
    """Each chapter's first and last line (from 1) and its title, by number."""
    lines = source.splitlines()
    heads = [(n + 1, CHAPTER.match(line)) for n, line in enumerate(lines) if CHAPTER.match(line)]
    ends = [first - 1 for first, _ in heads[1:]] + [len(lines)]
    return {
        int(head[1]): (first, end, head[2]) for (first, head), end in zip(heads, ends, strict=True)
    }


def removable(source: str) -> dict[int, set[int]]:
    """Each chapter but 1 and the (keep) ones, with those that go with it: itself and all that
    need it, directly or not."""
    needs = {}
    for number, (_, _, title) in chapters(source).items():
        needed = re.search(r"\(needs ([\d, ]+)\)", title)
        needs[number] = {int(n) for n in re.findall(r"\d+", needed[1])} if needed else set()
    going = {}
    for number, (_, _, title) in chapters(source).items():
        if number == 1 or "(keep)" in title:
            continue
        going[number] = {number}
        for _ in needs:  # enough rounds for the longest chain of needs
            going[number] |= {n for n in needs if needs[n] & going[number]}
    return going


def marked(source: str, number: int) -> tuple[set[int], list[ast.Try]]:
    """The lines marked for chapter `number`: a statement with `# ch. N` on its first line, or
    atop the comment block right above it; an except clause with it on its line. And the try
    statements that lose every handler."""
    lines = source.splitlines()
    marks = {
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT and re.match(rf"#\s*ch\.\s*{number}\b", token.string)
    }
    gone, bare = set(), []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.stmt, ast.ExceptHandler)):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        above = first
        while above > 1 and lines[above - 2].lstrip().startswith("#"):
            above -= 1
        if first in marks:
            gone |= set(range(first, node.end_lineno + 1))
        elif above < first and above in marks:
            gone |= set(range(above, node.end_lineno + 1))
        handlers_gone = all(handler.lineno in marks for handler in getattr(node, "handlers", []))
        if isinstance(node, ast.Try) and handlers_gone and not node.finalbody and not node.orelse:
            bare.append(node)
    return gone, bare


def trim(source: str, number: int) -> str:
    """The source without chapter `number` and what is marked for it."""
    first, last, _ = chapters(source)[number]
    gone, bare = marked(source, number)
    gone |= set(range(first, last + 1))
    lines, dedent = source.splitlines(), {}
    for node in bare:  # `try:` goes, and its body moves out a level
        gone.add(node.lineno)
        inner, outer = lines[node.body[0].lineno - 1], lines[node.lineno - 1]
        step = (len(inner) - len(inner.lstrip())) - (len(outer) - len(outer.lstrip()))
        dedent |= dict.fromkeys(range(node.body[0].lineno, node.body[-1].end_lineno + 1), step)
    kept = [line[dedent.get(n, 0) :] for n, line in enumerate(lines, 1) if n not in gone]
    return "\n".join(kept) + "\n"


def trimmed(source: str, numbers: set[int]) -> str:
    for number in sorted(numbers, reverse=True):
        source = trim(source, number)
    return source


def undefined_names(path: Path) -> str:
    """What ruff finds undefined in the file (F821): nothing, when it's whole."""
    check = [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F821", str(path)]
    return subprocess.run(check, capture_output=True, text=True).stdout.strip()


TRIM_SMOKE = """
import sys
from fastapi.testclient import TestClient
import main

present = {int(n) for n in sys.argv[1:]}
form = {"username": "ann@example.com", "password": "correct horse battery"}
with TestClient(main.app) as client:
    account = {"email": form["username"], "password": form["password"]}
    assert client.post("/auth/register", json=account).status_code == 201
    tokens = client.post("/auth/login", data=form).json()
    signed_in = {"Authorization": "Bearer " + tokens["access_token"]}
    assert client.get("/users/me", headers=signed_in).json()["email"] == "ann@example.com"
    refreshed = client.post("/auth/refresh", json={"refresh_token": tokens.get("refresh_token")})
    assert refreshed.status_code == (200 if 3 in present else 404), refreshed.text
    listed = client.get("/auth/sessions", headers=signed_in)
    assert listed.status_code == (200 if 4 in present else 404)
    wrong = {"username": "bob@example.com", "password": "not the password"}
    statuses = [client.post("/auth/login", data=wrong).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429 if 5 in present else 401], statuses
    forgot = client.post("/auth/forgot-password", json={"email": "ann@example.com"})
    assert forgot.status_code == (202 if 6 in present else 404)
    assert client.get("/auth/oidc/google/login").status_code == 404
    assert client.get("/users", headers=signed_in).status_code == (403 if 8 in present else 404)
print("ok")
"""


@pytest.mark.parametrize("chapter", [*removable((HERE / "main.py").read_text()), "all"])
def test_any_chapter_trims_away_and_what_is_left_works(chapter, tmp_path):
    """Deleting a chapter, those that need it, and the lines marked for them leaves a file with
    no undefined name, whose app registers, logs in, answers /users/me, and does the rest."""
    source = (HERE / "main.py").read_text()
    going = removable(source)
    gone = set().union(*going.values()) if chapter == "all" else going[chapter]
    (tmp_path / "main.py").write_text(trimmed(source, gone))
    assert undefined_names(tmp_path / "main.py") == "All checks passed!"
    present = [str(n) for n in chapters(source) if n not in gone]
    environment = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"}
    smoke = [sys.executable, "-c", TRIM_SMOKE, *present]
    result = subprocess.run(smoke, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
    if chapter == "all":  # chapter 1 and what no deployment should lose: nothing else is left
        assert set(chapters(trimmed(source, gone))) == {1, 2}


@pytest.mark.parametrize("path", ["main.py", "test_main.py"])
def test_every_mark_marks_a_statement_or_an_except_clause(path):
    """A `# ch. N` that ruff moved to a statement's last line would mark nothing."""
    source = (HERE / path).read_text()
    for number in {int(n) for n in re.findall(r"#\s*ch\.\s*(\d+)", source)}:
        comments = tokenize.generate_tokens(io.StringIO(source).readline)
        mark = re.compile(rf"#\s*ch\.\s*{number}\b")
        lines = {
            t.start[0] for t in comments if t.type == tokenize.COMMENT and mark.match(t.string)
        }
        assert lines - marked(source, number)[0] == set(), number


def test_this_file_trims_with_main_py_leaving_no_undefined_name(tmp_path):
    """A user who trims a chapter from main.py trims it from here too, and still has a suite."""
    source, tests = (HERE / "main.py").read_text(), (HERE / "test_main.py").read_text()
    assert set(chapters(tests)) == set(chapters(source))
    for gone in removable(source).values():
        (tmp_path / "main.py").write_text(trimmed(source, gone))
        (tmp_path / "test_main.py").write_text(trimmed(tests, gone))
        assert undefined_names(tmp_path / "test_main.py") == "All checks passed!", gone


def global_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each name read as a global, that is, not as a local of its function."""
    found = []

    def visit(node: ast.AST, local: frozenset) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            body = node.body if isinstance(node.body, list) else [node.body]
            stored = [n for part in body for n in ast.walk(part) if isinstance(n, ast.Name)]
            stored = [n.id for n in stored if isinstance(n.ctx, ast.Store)]
            local = local | {a.arg for a in arguments} | set(stored)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            targets = [n for g in node.generators for n in ast.walk(g.target)]
            local = local | {n.id for n in targets if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            found.append((node.lineno, node.id))
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, frozenset())
    return found


def test_main_reads_forward_no_name_is_used_above_its_definition():
    """Outside the lines marked for a later chapter, helpers come before what uses them."""
    source = (HERE / "main.py").read_text()
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue  # the command line's own names
        names = [getattr(node, "name", None)]
        names += [(a.asname or a.name).split(".")[0] for a in getattr(node, "names", [])]
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stored = [n for n in ast.walk(node) if isinstance(n, ast.Name)]
            names += [n.id for n in stored if isinstance(n.ctx, ast.Store)]
        for name in names:
            defined.setdefault(name, node.lineno)
    marks = {int(n) for n in re.findall(r"#\s*ch\.\s*(\d+)", source)}
    pointers = set().union(*(marked(source, n)[0] for n in marks))
    early = [
        (line, name)
        for line, name in global_reads(tree)
        if defined.get(name, 0) > line and line not in pointers
    ]
    assert early == []
    assert len(defined) > 50  # not vacuous


def test_main_stays_within_its_reading_budget():
    """Chapter 1 in 400 lines, what no deployment should lose in 120, 2,000 words of comments and
    docstrings and 7,700 code tokens in all, as `ruff format` writes it (100 columns)."""
    source = (HERE / "main.py").read_text()
    sizes = {n: last - first + 1 for n, (first, last, _) in chapters(source).items()}
    keep = [n for n, (_, _, title) in chapters(source).items() if "(keep)" in title]
    assert sizes[1] <= 400 and sum(sizes[n] for n in keep) <= 120, sizes
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    docstrings = {
        node.body[0].lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and ast.get_docstring(node) is not None
    }
    words = sum(len(t.string.lstrip("#").split()) for t in tokens if t.type == tokenize.COMMENT)
    words += sum(
        len(ast.literal_eval(t.string).split())
        for t in tokens
        if t.type == tokenize.STRING and t.start[0] in docstrings
    )
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    layout.add(tokenize.ENDMARKER)
    code = [
        t
        for t in tokens
        if t.type not in layout and not (t.type == tokenize.STRING and t.start[0] in docstrings)
    ]
    assert words <= 2000 and len(code) <= 7700, (words, len(code))
    assert max(len(line) for line in source.splitlines()) <= 100


# === 1. A working JWT app: users, passwords, log in, the access token, GET /users/me


def test_root_points_to_docs(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "/docs" in response.json()["message"]


def test_register_returns_the_public_user_only(client):
    response = register(client)
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "id": body["id"],
        "email": "ann@example.com",
        "is_active": True,
        "is_verified": False,
    }
    assert "argon2" not in response.text and PASSWORD not in response.text


def test_register_ignores_fields_a_user_must_not_set(client):
    body = {
        "email": "ann@example.com",
        "password": PASSWORD,
        "role": "admin",
        "is_active": False,
        "id": 99,
        "is_verified": True,
        "hashed_password": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
    }
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201
    assert response.json() == {
        "id": 1,
        "email": "ann@example.com",
        "is_active": True,
        "is_verified": False,
    }
    # The real password works, and only the user's scope.
    assert login(client).json()["scope"] == "me"


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


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "ann@",
        "@example.com",
        "ann example@x.com",
        "",
        "a" * 300 + "@x.com",
        "\ud800@example.com",
        "ann\x00@example.com",
    ],
)
def test_register_rejects_invalid_email(client, email):
    response = register(client, email)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "email"]


@pytest.mark.parametrize(
    ("password", "why"), [("1234567", "at least 8"), ("x" * 129, "at most 128")]
)
def test_register_rejects_password_outside_length_limits(client, password, why):
    response = register(client, password=password)
    assert response.status_code == 422
    assert why in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "password",
    [
        "aaaaaaaa",
        "x" * 128,
        "пароль-секрет",
        "密码密码密码密码",
        "🔑🔑🔑🔑🔑🔑🔑🔑",
        "with spaces  ok",
    ],
)
def test_register_and_login_accept_any_password_of_allowed_length(client, password):
    assert register(client, password=password).status_code == 201
    assert login(client, password=password).status_code == 200


def test_password_is_unicode_normalized_so_it_matches_however_it_was_typed(client):
    password = "Crème brûlée!"
    decomposed, composed = (
        unicodedata.normalize("NFD", password),
        unicodedata.normalize("NFC", password),
    )
    assert decomposed != composed
    assert register(client, password=decomposed).status_code == 201
    assert login(client, password=composed).status_code == 200
    assert login(client, password=decomposed).status_code == 200


def test_login_returns_tokens_and_forbids_caching(client):
    register(client)
    response = login(client)
    assert response.status_code == 200
    body = response.json()
    assert {"access_token", "token_type", "expires_in", "scope"} <= set(body)
    assert "refresh_token" in body  # ch. 3
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert response.headers["cache-control"] == "no-store"


def test_a_form_in_an_odd_charset_is_the_same_401_never_500(client):
    """Starlette decodes form fields in the charset the client names: unicode_escape can make a
    lone surrogate, which no email can hold."""
    register(client)
    boundary = "b0undary"
    parts = [("username", "x\\ud800@example.com"), ("password", PASSWORD)]
    body = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in parts
    )
    kind = f"multipart/form-data; charset=unicode_escape; boundary={boundary}"
    response = client.post(
        "/auth/login", content=f"{body}--{boundary}--\r\n", headers={"Content-Type": kind}
    )
    assert response.status_code == 401 and response.json()["error"] == "invalid_grant"


def test_login_email_is_case_and_space_insensitive(client):
    register(client, "ann@example.com")
    assert login(client, "  ANN@example.com ").status_code == 200


def test_unknown_email_and_wrong_password_get_the_same_401(client):
    register(client)
    unknown = login(client, "nobody@example.com")
    wrong = login(client, password="wrong password")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.json()["error"] == "invalid_grant"
    assert unknown.headers["www-authenticate"] == wrong.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "username",
    ["ann@exa%00mple.com", "a" * 100_000 + "%40example.com", "not+an+email", "%ED%A0%80", "%FF%FE"],
)
def test_login_with_an_impossible_username_is_the_same_401(client, username):
    register(client)
    body = (
        f"username={username}&password=correct+horse+battery"  # raw: NUL, surrogates, invalid UTF-8
    )
    response = client.post(
        "/auth/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 401
    assert response.json()["detail"] == "Incorrect email or password"


@pytest.mark.parametrize("form", [{}, {"username": "ann@example.com"}, {"password": PASSWORD}])
def test_login_with_missing_fields_is_422(client, form):
    response = client.post("/auth/login", data=form)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"


def test_login_json_instead_of_form_is_422(client):
    register(client)
    assert (
        client.post(
            "/auth/login", json={"username": "ann@example.com", "password": PASSWORD}
        ).status_code
        == 422
    )


JSON_ROUTES = ["/auth/register"]
JSON_ROUTES += ["/auth/refresh", "/auth/logout"]  # ch. 3
JSON_ROUTES += ["/auth/forgot-password", "/auth/verify-email/resend"]  # ch. 6
JSON_ROUTES += ["/auth/reset-password", "/auth/verify-email"]  # ch. 6


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_body_that_is_not_utf8_is_a_clear_400(client, path):
    response = client.post(
        path, content=b"\xff\xfe{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["detail"]


def test_the_token_endpoint_takes_what_swaggers_authorize_button_sends(client):
    register(client)
    form = {
        "grant_type": "password",
        "username": "ann@example.com",
        "password": PASSWORD,
        "scope": "me",
        "client_id": "",
        "client_secret": "",
    }
    response = client.post("/auth/login", data=form)
    assert response.status_code == 200 and response.json()["scope"] == "me"


TOKEN_ENDPOINT_ERRORS = [
    ({"username": "ann@example.com", "password": "wrong password"}, 401, "invalid_grant"),
    (
        {"grant_type": "password", "username": "nobody@example.com", "password": PASSWORD},
        401,
        "invalid_grant",
    ),
    ({"grant_type": "password", "username": "ann@example.com"}, 422, "invalid_request"),
    ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
    ({"grant_type": "authorization_code", "code": "abc"}, 400, "unsupported_grant_type"),
    (
        {"grant_type": "PASSWORD", "username": "ann@example.com", "password": PASSWORD},
        400,
        "unsupported_grant_type",
    ),
]
TOKEN_ENDPOINT_ERRORS += [  # ch. 3
    ({"grant_type": "refresh_token", "refresh_token": "made-up"}, 401, "invalid_grant"),
    ({"grant_type": "refresh_token"}, 422, "invalid_request"),
    ({"grant_type": "refresh_token", "refresh_token": "x" * 1000}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("form", "status", "error"), TOKEN_ENDPOINT_ERRORS)
def test_token_endpoint_errors_carry_rfc_6749_fields(client, form, status, error):
    register(client)
    response = client.post("/auth/login", data=form)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["error_description"] and body["detail"]
    assert PASSWORD not in response.text


def test_a_deactivated_account_gets_invalid_grant_with_403(client, engine):
    signed_up(client)
    run_sql(engine, 'UPDATE "user" SET is_active = :no', no=False)
    response = login(client)
    assert response.status_code == 403 and response.json()["error"] == "invalid_grant"


def set_password_elsewhere(engine, hashed_password: str = "set meanwhile") -> None:
    """What a reset, a change or a sign-in's link does, in a transaction of its own."""
    with Session(engine) as other:
        main.set_password(other, rows(engine, main.User)[0].id, hashed_password)
        other.commit()


@pytest.mark.parametrize("meanwhile", ["a new password", "the account deleted"])
def test_a_login_whose_password_changes_while_it_is_checked_is_a_401_and_starts_nothing(
    client, engine, monkeypatch, meanwhile
):
    """A new password (or a deleted account) overtakes a login still checking the old one."""
    register(client)
    check = main.verify_password

    def check_while_it_changes(password: str, hashed_password: str) -> bool:
        if meanwhile == "a new password":
            set_password_elsewhere(engine)
        else:
            run_sql(engine, 'DELETE FROM "user"')
        return check(password, hashed_password)

    monkeypatch.setattr(main, "verify_password", check_while_it_changes)
    assert_bearer_401(login(client))
    assert rows(engine, main.Login) == []


def test_a_new_password_waits_for_a_login_being_stored_and_then_ends_it(
    client, engine, monkeypatch
):
    """The other order: the login checked the password first, so its row is locked until the
    login is stored; the new password's revocation then finds it."""
    register(client)
    start = main.start_login
    changes = []

    def start_while_the_password_changes(session, user, asked, request):
        def change() -> None:
            with Session(engine) as other:
                main.set_password(other, user.id, "set meanwhile")
                other.commit()

        changes.append(threading.Thread(target=change))
        changes[0].start()
        time.sleep(0.5)  # the change is under way, waiting for this login's transaction
        return start(session, user, asked, request)

    monkeypatch.setattr(main, "start_login", start_while_the_password_changes)
    tokens = login(client).json()
    changes[0].join()
    assert_bearer_401(me(client, tokens))


def test_users_me_returns_the_user(client):
    tokens = signed_up(client)
    response = me(client, tokens)
    assert response.status_code == 200
    assert response.json() == {
        "id": 1,
        "email": "ann@example.com",
        "is_active": True,
        "is_verified": False,
    }


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Bearer not-a-jwt", "Basic YW5uOnB3", "Bearer a.b.c"]
)
def test_users_me_without_a_usable_token_is_401(client, header):
    headers = {"Authorization": header} if header is not None else {}
    assert_bearer_401(client.get("/users/me", headers=headers))


def test_openapi_shows_the_password_flow_with_scopes(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    flow = schemes["OAuth2PasswordBearer"]["flows"]["password"]
    assert flow["tokenUrl"] == "auth/login"
    assert "me" in flow["scopes"]
    assert "admin" in flow["scopes"]  # ch. 8
    assert client.get("/docs").status_code == 200


def test_no_response_contains_a_password_hash(client, engine):
    signed_up(client)
    make_admin_in_db(engine, "ann@example.com")  # ch. 8
    tokens = login(client).json()
    responses = [me(client, tokens), register(client, "bob@example.com")]
    responses.append(client.get("/auth/sessions", headers=bearer(tokens["access_token"])))  # ch. 4
    responses.append(client.get("/users", headers=bearer(tokens["access_token"])))  # ch. 8
    for response in responses:
        assert response.status_code in (200, 201)
        assert "hashed_password" not in response.text and "$argon2" not in response.text


def forge(base: dict, key: str = main.SECRET_KEY, algorithm: str = "HS256", **changes) -> str:
    """`base` claims with `changes` applied (a value of None drops the claim), signed."""
    claims = {key_: value for key_, value in {**base, **changes}.items() if value is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def tamper(token: str, **changes) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return ".".join([header, b64({**claims, **changes}), signature])


NOW = int(time.time())


FORGERIES = {
    "alg none": lambda c: f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(c)}.",
    "alg none with signature": lambda c: jwt.encode(c, None, algorithm="none") + "c2ln",
    "HS512 with our key": lambda c: forge(c, algorithm="HS512"),
    "another key": lambda c: forge(c, key="another-key-that-is-also-long-enough-000000"),
    "tampered payload": lambda c: tamper(forge(c), sub="2"),
    "expired": lambda c: forge(c, exp=int(time.time()) - 5),
    "no exp": lambda c: forge(c, exp=None),
    "no iat": lambda c: forge(c, iat=None),
    "iat in the future": lambda c: forge(c, iat=int(time.time()) + 3600),
    "no sub": lambda c: forge(c, sub=None),
    "no sid": lambda c: forge(c, sid=None),
    "unknown sid": lambda c: forge(c, sid="0" * 32),
    "sid not a string": lambda c: forge(c, sid=5),
    "another user's sub with this sid": lambda c: forge(c, sub="2"),
    "no type": lambda c: forge(c, type=None),
    "type refresh": lambda c: forge(c, type="refresh"),
    "no scope": lambda c: forge(c, scope=None),
    "sub not numeric": lambda c: forge(c, sub="ann@example.com"),
    "sub a number, not a string": lambda c: forge(c, sub=1),
    "sub zero": lambda c: forge(c, sub="0"),
    "sub negative": lambda c: forge(c, sub="-1"),
    "sub huge": lambda c: forge(c, sub="9" * 30),
    "sub beyond a 32-bit id": lambda c: forge(c, sub=str(2**31)),
    "exp not a number": lambda c: forge(c, exp="tomorrow"),
    "payload not json": lambda c: f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.bm90IGpzb24.c2ln",
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_access_tokens_are_401(client, forgery):
    # User 1 and their session exist: only the forgery can be at fault.
    claims = access_claims(signed_up(client))
    signed_up(client, "bob@example.com")  # user 2 exists too
    assert_bearer_401(client.get("/users/me", headers=bearer(FORGERIES[forgery](claims))))


def test_a_correctly_signed_token_is_accepted(client):
    """The control for the forgeries above: the same claims, properly signed, work."""
    claims = access_claims(signed_up(client))
    assert client.get("/users/me", headers=bearer(forge(claims, jti="another"))).status_code == 200


def test_no_exception_instance_is_shared_between_requests():
    """Re-raising one shared exception grows its traceback on every request and keeps each request's
    frames (and the passwords in them) alive: every 401 must be a new exception."""
    shared = [name for name, value in vars(main).items() if isinstance(value, Exception)]
    assert shared == []


def test_passwords_are_hashed_with_argon2id_at_least_at_owasp_minimum(client, engine):
    register(client)
    stored = rows(engine, main.User)[0].hashed_password
    variant, _version, params, *_ = stored.split("$")[1:]
    params = dict(item.split("=") for item in params.split(","))
    assert variant == "argon2id"
    assert int(params["m"]) >= 19 * 1024 and int(params["t"]) >= 2 and int(params["p"]) >= 1


def test_unknown_email_is_checked_against_a_hash_like_a_wrong_password(client, hasher):
    register(client)
    login(client, "nobody@example.com")
    login(client, password="wrong password")
    verified = [args[0] for name, args, *_ in hasher.calls if name == "verify"]
    assert len(verified) == 2
    assert verified[0] == main.DUMMY_HASH and verified[0].startswith("$argon2id$")


def test_unknown_email_takes_as_long_as_a_wrong_password(client):
    register(client)
    unknown, wrong = [], []
    # Interleaved, so a busy machine slows both alike; a fresh client address each time.
    for n in range(9):
        for address, password, times in (
            ("nobody@example.com", PASSWORD, unknown),
            ("ann@example.com", "wrong pw!", wrong),
        ):
            with test_client(f"10.0.{n}.{len(times)}") as other:
                started = time.perf_counter()
                assert login(other, address, password).status_code == 401
                times.append(time.perf_counter() - started)
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.7 <= ratio <= 1.3, ratio


HUGE_PASSWORD = "x" * 1_000_000


def assert_refused_before_any_hashing(response, hasher: "RecordingHasher") -> None:
    assert response.status_code == 422
    assert "128" in response.text and len(response.content) < 1000  # says why, doesn't echo it back
    assert hasher.calls == []


def test_a_huge_password_is_refused_before_any_hashing(client, hasher):
    register(client)
    hasher.calls.clear()
    huge = {"email": "big@example.com", "password": HUGE_PASSWORD}
    assert_refused_before_any_hashing(client.post("/auth/register", json=huge), hasher)
    assert_refused_before_any_hashing(login(client, password=HUGE_PASSWORD), hasher)


def test_hashing_runs_on_the_bounded_hash_pool_with_no_database_connection_held(client, hasher):
    signed_up(client)
    login(client, password="a wrong password")
    assert [name for name, *_ in hasher.calls] == ["hash", "verify", "verify"]
    for _name, _args, thread_name, connections_in_use in hasher.calls:
        assert thread_name.startswith("argon2")  # off the event loop, on the pool of its own
        assert connections_in_use == 0
    assert main.hash_pool._max_workers == (os.cpu_count() or 1)


def test_workers_starting_together_on_an_empty_database_all_get_the_tables(engine, database_url):
    """What `uvicorn --workers N` does on its first start: every worker creates the tables at
    once."""
    # All processes import first, then create the tables at the same moment.
    start_at = time.time() + 3
    create = (
        f"import time, main; time.sleep(max(0, {start_at} - time.time())); main.create_tables()"
    )
    env = {**os.environ, "DATABASE_URL": database_url}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", create], cwd=HERE, env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors
    assert rows(engine, main.User) == []


def test_cluster_a_token_from_one_server_works_on_every_process(cluster):
    a, b = cluster
    assert register(a).status_code == 201
    tokens = login(b).json()
    for server in (a, b) * 10:  # enough requests to reach every worker process
        response = server.get("/users/me", headers=bearer(tokens["access_token"]))
        assert response.status_code == 200, response.text
    assert refresh(a, tokens["refresh_token"]).status_code == 200  # ch. 3


def test_cluster_concurrent_registrations(cluster):
    a, b = cluster
    distinct = [lambda n=n: register((a, b)[n % 2], f"user{n}@example.com") for n in range(40)]
    responses = in_parallel(distinct)
    assert [r.status_code for r in responses] == [201] * 40, [
        r.text for r in responses if r.status_code != 201
    ]
    same = [lambda n=n: register((a, b)[n % 2], "same@example.com") for n in range(12)]
    codes = sorted(response.status_code for response in in_parallel(same))
    assert codes == [201] + [409] * 11, codes


def test_cluster_a_flood_of_logins_all_succeed(cluster):
    a, b = cluster
    register(a)
    calls = [lambda n=n: login((a, b)[n % 2]) for n in range(48)]
    assert [response.status_code for response in in_parallel(calls)] == [200] * 48


ANNS_FORM = {"username": "ann@example.com", "password": PASSWORD}
NOT_A_JWT = {"Authorization": "Bearer a.b.c"}


def wrong_form(n: int) -> dict:
    return {"username": f"x{n}@example.com", "password": "wrong password"}


def test_load_a_few_hundred_clients_mixing_every_route(server, engine):
    user = signed_up(server)
    url, as_user = server.url, bearer(user["access_token"])
    calls = [("me", lambda http: http.get(url + "/users/me", headers=as_user))] * 20
    calls += [("login", lambda http: http.post(url + "/auth/login", data=ANNS_FORM))] * 10
    calls += [
        ("login", lambda http, n=n: http.post(url + "/auth/login", data=wrong_form(n)))
        for n in range(5)
    ]
    calls += [("garbage", lambda http: http.get(url + "/users/me", headers=NOT_A_JWT))] * 5
    calls += refresh_calls(server)  # ch. 3
    calls += account_calls(server, user)  # ch. 4
    calls += email_calls(server)  # ch. 6
    calls += admin_calls(server, engine)  # ch. 8
    results = hammer([(name, 0, call) for name, call in calls * 2])
    assert len(results) == 2 * len(calls) >= 70
    assert_never_wedged(results)
    assert {status for name, status, _ in results if name == "me"} == {200}


def test_one_concurrency_idiom_no_async_function_touches_the_database():
    """Routes and dependencies that use the database are plain `def` (FastAPI runs them in its
    thread pool)."""
    using_the_database = []
    for route in main.app.routes:
        if isinstance(route, APIRoute):
            dependants = [route.dependant]
            while dependants:
                dependant = dependants.pop()
                dependants.extend(dependant.dependencies)
                if dependant.call is main.get_current_user or any(
                    sub.call is main.get_session for sub in dependant.dependencies
                ):
                    using_the_database.append(dependant.call)
    found = {call for call in using_the_database if call is not main.get_current_user}
    assert {main.register, main.log_in} <= found  # not vacuous
    assert [call.__name__ for call in using_the_database if inspect.iscoroutinefunction(call)] == []
    for name, function in vars(main).items():
        # Start-up runs before any request.
        if inspect.iscoroutinefunction(function) and name != "lifespan":
            assert not {"engine", "Session", "session"} & set(function.__code__.co_names), name


def connections_held_at_each_answer(requests: Callable[[TestClient], list]) -> tuple[list, list]:
    """The answers to requests(client), and the pooled connections checked out as each started."""
    held = []

    async def watching(scope, receive, send):
        async def send_watched(message):
            if message["type"] == "http.response.start":
                held.append(main.engine.pool.checkedout())
            await send(message)

        await main.app(scope, receive, send_watched)

    with TestClient(watching) as watched:
        answers = requests(watched)
    return answers, held


def assert_connections_given_back(requests: Callable[[TestClient], list], statuses: list) -> None:
    """So no transaction (or SQLite's write lock) waits on a client, failures included."""
    answers, held = connections_held_at_each_answer(requests)
    assert [answer.status_code for answer in answers] == statuses
    assert len(held) >= len(answers) and set(held) == {0}


def test_every_request_gives_its_connection_back_before_the_response_starts(client, engine):
    user = signed_up(client, "user@example.com")
    assert_connections_given_back(
        lambda watched: [
            register(watched, "user@example.com"),
            login(watched, "user@example.com", "wrong"),
            me(watched, user),
            login(watched, "user@example.com"),
        ],
        [409, 401, 200, 200],
    )


# === 3. Refresh and log out: tokens that rotate, one chain per login, a cookie for browsers


def refresh(client, refresh_token: str):
    return post_json(client, "/auth/refresh", {"refresh_token": refresh_token})


def age_refreshes(engine, seconds: float = main.REFRESH_GRACE_SECONDS + 1) -> None:
    """Move every login's refreshes `seconds` into the past: past the grace window, by default."""
    run_sql(engine, "UPDATE login SET last_used_at = last_used_at - :s", s=seconds)
    run_sql(engine, "UPDATE login SET previous_used_at = previous_used_at - :s", s=seconds)


def test_refresh_returns_new_tokens_and_uses_up_the_old_one(client, engine):
    tokens = signed_up(client)
    response = refresh(client, tokens["refresh_token"])
    assert response.status_code == 200
    new = response.json()
    assert response.headers["cache-control"] == "no-store"
    assert new["refresh_token"] != tokens["refresh_token"]
    assert new["access_token"] != tokens["access_token"]
    assert me(client, new).status_code == 200
    age_refreshes(engine)
    assert_bearer_401(refresh(client, tokens["refresh_token"]))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"refresh_token": ""},
        {"refresh_token": "x" * 1000},
        {"refresh_token": 5},
        {"refresh_token": "\ud800"},
    ],
)
def test_refresh_with_malformed_body_is_422(client, body):
    assert post_json(client, "/auth/refresh", body).status_code == 422


@pytest.mark.parametrize("token", ["made-up-token", "nul\x00byte", "ä" * 100])
def test_refresh_with_unknown_token_is_401(client, token):
    response = refresh(client, token)
    assert_bearer_401(response)
    assert response.json()["error"] == "invalid_grant"


def test_logout_ends_that_session_only(client):
    first = signed_up(client)
    second = login(client).json()
    assert (
        client.post("/auth/logout", json={"refresh_token": first["refresh_token"]}).status_code
        == 204
    )
    assert_bearer_401(refresh(client, first["refresh_token"]))
    assert refresh(client, second["refresh_token"]).status_code == 200


def test_logout_ends_the_sessions_access_token_at_once(client):
    tokens = signed_up(client)
    other = login(client).json()
    assert me(client, tokens).status_code == 200
    client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert_bearer_401(me(client, tokens))
    assert me(client, other).status_code == 200


def test_logout_is_idempotent_and_accepts_unknown_tokens(client):
    tokens = signed_up(client)
    for token in (tokens["refresh_token"], tokens["refresh_token"], "unknown-token"):
        assert client.post("/auth/logout", json={"refresh_token": token}).status_code == 204


def test_logout_after_rotation_ends_the_whole_session(client):
    tokens = signed_up(client)
    rotated = refresh(client, tokens["refresh_token"]).json()
    client.post("/auth/logout", json={"refresh_token": rotated["refresh_token"]})
    assert_bearer_401(refresh(client, rotated["refresh_token"]))
    assert_bearer_401(me(client, rotated))


def test_no_refresh_token_is_stored_and_a_login_is_one_row_however_often_it_refreshes(
    client, engine
):
    tokens = signed_up(client)
    first = tokens["refresh_token"]
    for _ in range(300):
        tokens = refresh(client, tokens["refresh_token"]).json()
    assert me(client, tokens).status_code == 200
    [stored] = rows(engine, main.Login)
    assert stored.refresh_count == 300
    for token in (first, tokens["refresh_token"]):
        assert token not in json.dumps(stored.model_dump(), default=str)
    with engine.connect() as connection:  # no other table holds anything of it
        others = [
            table
            for table in SQLModel.metadata.sorted_tables
            if table.name not in ("user", "login")
        ]
        tables = [
            table for table in others if table.name != "emaillink"
        ]  # sign-up's verification link
        assert [table.name for table in tables if connection.execute(table.select()).first()] == []
    age_refreshes(engine)
    # The very first token is still known for what it is: reuse.
    assert_bearer_401(refresh(client, first))
    assert_bearer_401(me(client, tokens))


def test_reusing_a_rotated_refresh_token_revokes_the_whole_family(client, engine):
    stolen = signed_up(client)
    other_session = login(client).json()
    rotated = refresh(client, stolen["refresh_token"]).json()  # the legitimate client rotates
    assert me(client, rotated).status_code == 200
    age_refreshes(engine)  # the grace window for retries is over
    assert_bearer_401(refresh(client, stolen["refresh_token"]))  # the thief replays the old one
    assert_bearer_401(refresh(client, rotated["refresh_token"]))  # so the fresh token dies too
    assert_bearer_401(me(client, rotated))  # and the victim's access token with it, at once
    # Other logins untouched.
    assert refresh(client, other_session["refresh_token"]).status_code == 200


def test_a_retry_within_the_grace_window_gets_the_same_successor_and_the_session_lives(
    client, engine
):
    """The answer to a refresh was lost (or a second tab refreshed first): the client retries with
    the token it has, and gets the very token the first answer carried: the login still has one
    chain."""
    tokens = signed_up(client)
    first = refresh(client, tokens["refresh_token"])
    age_refreshes(engine, main.REFRESH_GRACE_SECONDS - 2)
    retry = refresh(client, tokens["refresh_token"])
    assert first.status_code == retry.status_code == 200
    assert (
        access_claims(first.json())["sid"]
        == access_claims(retry.json())["sid"]
        == access_claims(tokens)["sid"]
    )
    assert first.json()["refresh_token"] == retry.json()["refresh_token"]
    assert first.json()["access_token"] != retry.json()["access_token"]
    assert me(client, first.json()).status_code == me(client, retry.json()).status_code == 200
    assert refresh(client, retry.json()["refresh_token"]).status_code == 200
    assert rows(engine, main.Login)[0].refresh_count == 2  # the retry moved nothing on


def test_a_used_token_is_retried_even_after_its_successor_was_used(client, engine):
    """A slow second tab: the first tab refreshed twice while its request with the oldest token was
    on the way."""
    tokens = signed_up(client)
    second = refresh(client, tokens["refresh_token"]).json()
    third = refresh(client, second["refresh_token"]).json()
    late = refresh(client, tokens["refresh_token"])
    assert late.status_code == 200 and late.json()["refresh_token"] == third["refresh_token"]
    assert refresh(client, third["refresh_token"]).status_code == 200


def test_a_thief_replaying_inside_the_window_joins_the_one_chain_and_is_cut_off_after_it(
    client, engine
):
    """RFC 9700 §4.14.2: the thief's replay within the window gets the victim's own successor, not a
    chain of its own, so once the victim moves on and the window closes, the thief's copy is reuse
    and ends the login."""
    victim = signed_up(client)
    stolen = victim["refresh_token"]
    victim = refresh(client, stolen).json()
    thief = refresh(client, stolen).json()  # inside the window
    assert thief["refresh_token"] == victim["refresh_token"]
    age_refreshes(engine)
    victim = refresh(
        client, victim["refresh_token"]
    ).json()  # the victim moves on, after the window
    age_refreshes(engine)
    assert_bearer_401(refresh(client, thief["refresh_token"]))
    assert_bearer_401(me(client, victim))  # that reuse ended the login
    assert_bearer_401(refresh(client, victim["refresh_token"]))


def test_a_token_first_used_over_30_s_ago_is_reuse_even_right_after_a_refresh(client, engine):
    tokens = signed_up(client)
    stolen = tokens["refresh_token"]
    tokens = refresh(client, stolen).json()
    age_refreshes(engine)
    tokens = refresh(client, tokens["refresh_token"]).json()  # a new run of refreshes starts here
    # A second after that refresh, but from before it: a copy.
    assert_bearer_401(refresh(client, stolen))
    assert_bearer_401(me(client, tokens))


def test_a_thief_who_keeps_refreshing_cannot_keep_an_old_token_alive(client, engine):
    """The thief replays the stolen token inside the window, then refreshes every 29 s, never
    letting the window close: the stolen token, first used long ago, is still reuse."""
    victim = signed_up(client)
    stolen = victim["refresh_token"]
    victim = refresh(client, stolen).json()
    thief = refresh(client, stolen).json()  # inside the window: the victim's own successor
    for _ in range(3):
        age_refreshes(engine, main.REFRESH_GRACE_SECONDS - 1)
        thief = refresh(client, thief["refresh_token"]).json()
        assert me(client, thief).status_code == 200
    assert_bearer_401(refresh(client, stolen))  # reuse: the login ends
    assert_bearer_401(me(client, thief))
    assert_bearer_401(refresh(client, victim["refresh_token"]))


@pytest.mark.parametrize(
    "changes",
    [{"n": 2**40}, {"n": -1}, {"n": "zero"}, {"sid": "x" * 100}, {"type": "access"}, {"exp": 1}],
)
def test_a_refresh_token_signed_with_odd_claims_is_401_never_500(client, changes):
    """Even with the key, odd claims make no statement fail: 401, and the login lives."""
    tokens = signed_up(client)
    claims = jwt.decode(tokens["refresh_token"], options={"verify_signature": False}) | changes
    odd = jwt.encode(claims, main.SECRET_KEY, algorithm="HS256")
    assert_bearer_401(refresh(client, odd))
    assert client.post("/auth/logout", json={"refresh_token": odd}).status_code == 204
    assert refresh(client, tokens["refresh_token"]).status_code == 200


def test_two_chains_never_grow_from_one_login_however_retries_interleave(client, engine):
    tokens = signed_up(client)
    held = [tokens["refresh_token"]] * 4  # four holders of one token
    for _ in range(5):
        answers = [refresh(client, token) for token in held]
        assert [answer.status_code for answer in answers] == [200] * 4
        held = [answer.json()["refresh_token"] for answer in answers]
        assert len(set(held)) == 1
    assert rows(engine, main.Login)[0].refresh_count == 5


def test_the_grace_window_runs_from_a_tokens_first_use_and_a_retry_never_stretches_it(
    client, engine
):
    tokens = signed_up(client)
    successor = refresh(client, tokens["refresh_token"]).json()
    age_refreshes(engine, 20)
    assert refresh(client, tokens["refresh_token"]).status_code == 200  # 20 s after its first use
    age_refreshes(engine, main.REFRESH_GRACE_SECONDS - 20 + 1)
    assert_bearer_401(refresh(client, tokens["refresh_token"]))  # 31 s after its first use: reuse
    assert_bearer_401(refresh(client, successor["refresh_token"]))  # and the session is over
    assert_bearer_401(me(client, successor))


def test_the_refresh_grant_has_the_same_grace_window(client, engine):
    tokens = signed_up(client)
    grant = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert client.post("/auth/login", data=grant).status_code == 200
    retry = client.post("/auth/login", data=grant)
    assert retry.status_code == 200 and me(client, retry.json()).status_code == 200
    age_refreshes(engine)
    assert client.post("/auth/login", data=grant).status_code == 401
    assert_bearer_401(me(client, retry.json()))


def test_a_session_ends_at_its_absolute_lifetime_however_often_it_is_refreshed(client, engine):
    tokens = signed_up(client)
    first_expiry = rows(engine, main.Login)[0].expires_at
    for _ in range(3):
        tokens = refresh(client, tokens["refresh_token"]).json()
    assert [row.expires_at for row in rows(engine, main.Login)] == [
        first_expiry
    ]  # one session, same end
    run_sql(engine, "UPDATE login SET expires_at = :past", past=time.time() - 1)
    assert_bearer_401(refresh(client, tokens["refresh_token"]))
    assert_bearer_401(me(client, tokens))


def test_finished_sessions_are_forgotten_at_the_next_login(client, engine):
    tokens = signed_up(client)
    refresh(client, tokens["refresh_token"])
    run_sql(engine, "UPDATE login SET expires_at = :past", past=time.time() - 1)
    login(client)
    assert len(rows(engine, main.Login)) == 1


def test_session_lifetime_follows_the_setting(client, engine):
    before = time.time()
    signed_up(client)
    expires_at = rows(engine, main.Login)[0].expires_at
    assert before + 14 * 86400 <= expires_at <= time.time() + 14 * 86400


def test_deactivating_a_user_stops_refresh_and_access_at_once(client, engine):
    tokens = signed_up(client)
    run_sql(engine, 'UPDATE "user" SET is_active = :no', no=False)
    assert_bearer_401(me(client, tokens))
    assert_bearer_401(refresh(client, tokens["refresh_token"]))
    response = login(client)
    assert response.status_code == 403 and "access_token" not in response.text


def test_deleted_users_tokens_are_rejected(client, engine):
    tokens = signed_up(client)
    run_sql(engine, 'DELETE FROM "user"')
    assert_bearer_401(me(client, tokens))
    assert_bearer_401(refresh(client, tokens["refresh_token"]))


def test_an_access_token_is_not_a_refresh_token(client):
    tokens = signed_up(client)
    assert_bearer_401(refresh(client, tokens["access_token"]))


def test_a_refresh_token_is_not_an_access_token(client):
    tokens = signed_up(client)
    assert_bearer_401(client.get("/users/me", headers=bearer(tokens["refresh_token"])))


def test_a_thiefs_copy_of_a_rotated_refresh_token_ends_the_victims_session(client, engine):
    victim = signed_up(client)
    stolen = victim["refresh_token"]
    victim = refresh(client, stolen).json()
    age_refreshes(engine)
    assert_bearer_401(refresh(client, stolen))  # the thief tries the copy
    assert_bearer_401(me(client, victim))  # the victim's current access token stops at once
    # ch. 4: only a new login is left
    assert [item["current"] for item in sessions(client, login(client).json()).json()] == [True]


def test_the_token_endpoint_takes_the_refresh_grant(client, engine):
    tokens = signed_up(client)
    response = client.post(
        "/auth/login",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    new = response.json()
    assert new["refresh_token"] != tokens["refresh_token"] and me(client, new).status_code == 200
    age_refreshes(engine)
    replayed = client.post(
        "/auth/login",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_grant"
    assert_bearer_401(me(client, new))  # reuse detection ends the session, as on /auth/refresh


def test_the_refresh_grant_respects_the_sessions_end_and_the_users_state(client, engine):
    tokens = signed_up(client)
    run_sql(engine, "UPDATE login SET expires_at = :past", past=time.time() - 1)
    expired = client.post(
        "/auth/login",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert expired.status_code == 401 and expired.json()["error"] == "invalid_grant"


def test_authlib_logs_in_refreshes_on_its_own_and_fails_cleanly(server, engine):
    """Authlib's OAuth2Client, the usual Python OAuth2 client, against a real server."""
    register(server)
    saved = []
    oauth = OAuth2Client(
        token_endpoint=server.url + "/auth/login",
        update_token=lambda token, **_: saved.append(token),
    )
    first = oauth.fetch_token(username="ann@example.com", password=PASSWORD)
    assert oauth.get(server.url + "/users/me").json()["email"] == "ann@example.com"
    oauth.token["expires_at"] = int(time.time()) - 60  # as if the access token had expired
    response = oauth.get(server.url + "/users/me")  # the client refreshes on its own first
    assert response.status_code == 200
    # Rotated, and stored.
    assert len(saved) == 1 and saved[0]["refresh_token"] != first["refresh_token"]
    assert oauth.token["access_token"] == saved[0]["access_token"] != first["access_token"]
    age_refreshes(engine)
    with pytest.raises(OAuthError) as raised:  # a replayed refresh token fails cleanly
        oauth.refresh_token(server.url + "/auth/login", refresh_token=first["refresh_token"])
    assert raised.value.error == "invalid_grant"
    with (
        OAuth2Client(token_endpoint=server.url + "/auth/login") as stranger,
        pytest.raises(OAuthError) as raised,
    ):
        stranger.fetch_token(username="ann@example.com", password="wrong!!!")
    assert raised.value.error == "invalid_grant"
    oauth.close()


def test_cluster_logout_on_one_server_ends_access_on_all(cluster):
    a, b = cluster
    register(a)
    tokens = login(a).json()
    b.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert [
        server.get("/users/me", headers=bearer(tokens["access_token"])).status_code
        for server in (a, b) * 4
    ] == [401] * 8


def test_cluster_clients_racing_with_one_refresh_token_all_keep_the_session(cluster):
    """Two tabs (or a client and its retry) refreshing at once, on every process: each gets new
    tokens of the same session, all with the one successor, which works."""
    a, b = cluster
    register(a)
    for _ in range(3):
        token = login(a).json()["refresh_token"]
        responses = in_parallel(
            [lambda server=server, token=token: refresh(server, token) for server in (a, b) * 4]
        )
        assert [response.status_code for response in responses] == [200] * 8, [
            r.text for r in responses
        ]
        [successor] = {response.json()["refresh_token"] for response in responses}
        assert {access_claims(response.json())["sid"] for response in responses} == {
            access_claims(responses[0].json())["sid"]
        }
        assert [
            me((a, b)[n % 2], response.json()).status_code for n, response in enumerate(responses)
        ] == [200] * 8
        assert refresh(b, successor).status_code == 200


def test_cluster_a_refresh_racing_logout_or_replay_cannot_outlive_the_session(cluster, engine):
    """Logout (or a replayed token) ending a session while a refresh of it is in flight: whichever
    wins, no token of that session may work afterwards."""
    a, b = cluster
    register(a)

    def assert_session_dead(responses):
        for response in responses:
            # The refresh won the race: its new tokens must be dead anyway.
            if response.status_code == 200:
                assert refresh(a, response.json()["refresh_token"]).status_code == 401
                assert (
                    a.get("/users/me", headers=bearer(response.json()["access_token"])).status_code
                    == 401
                )

    for _ in range(8):
        token = login(a).json()["refresh_token"]
        racing = [
            lambda token=token: refresh(a, token),
            lambda token=token: b.post("/auth/logout", json={"refresh_token": token}),
        ]
        assert_session_dead(in_parallel(racing))

        first = login(a).json()["refresh_token"]
        second = refresh(a, first).json()["refresh_token"]
        age_refreshes(engine)  # past the grace window: a replay of `first` is theft
        # the thief replays the first token while the client refreshes the second
        assert_session_dead(
            in_parallel(
                [lambda first=first: refresh(b, first), lambda second=second: refresh(a, second)]
            )
        )


def test_load_sixty_bad_refreshes_while_another_client_reads_its_account(server):
    tokens = signed_up(server)
    calls = [
        (
            "refresh",
            0,
            lambda http, n=n: http.post(
                server.url + "/auth/refresh", json={"refresh_token": f"bad-{n}"}
            ),
        )
        for n in range(60)
    ]
    calls += [
        (
            "me",
            n * 0.02,
            lambda http: http.get(server.url + "/users/me", headers=bearer(tokens["access_token"])),
        )
        for n in range(40)
    ]  # while the refreshes are in flight
    results = hammer(calls)
    assert_never_wedged(results)
    assert {status for name, status, _ in results if name == "refresh"} == {401}
    assert {status for name, status, _ in results if name == "me"} == {200}


# The in-process app's own origin, as a page that the API serves sends it.
API_ORIGIN = "https://testserver"


@pytest.fixture
def browser(engine) -> Iterator[TestClient]:
    """A browser-like client: HTTPS (the cookie is Secure), a cookie jar, and its page's Origin on
    every request."""
    with TestClient(main.app, base_url=API_ORIGIN, headers={"Origin": API_ORIGIN}) as browser:
        browser.event_hooks = {"request": [], "response": [record_status]}
        yield browser


def refresh_cookie(response) -> dict[str, str]:
    """The attributes of the refresh token cookie the response sets (names lower-cased), with its
    value as `value`."""
    prefix = f"{main.REFRESH_COOKIE}="
    [header] = [
        header for header in response.headers.get_list("set-cookie") if header.startswith(prefix)
    ]
    value, *attributes = header.split("; ")
    cookie = {"value": value.removeprefix(prefix)}
    for attribute in attributes:
        name, _, setting = attribute.partition("=")
        cookie[name.lower()] = setting
    return cookie


def assert_a_browser_answer(response) -> str:
    """The answer a browser gets from a token endpoint: tokens in the JSON but the refresh token,
    which is only in an HttpOnly, Secure, SameSite=Strict __Host- cookie for every path that lasts
    as long as the login. Returns it."""
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"access_token", "token_type", "expires_in", "scope"}
    cookie = refresh_cookie(response)
    assert (
        {"httponly", "secure"} <= set(cookie)
        and cookie["samesite"] == "Strict"
        and cookie["path"] == "/"
    )
    assert 14 * 86400 - 60 <= int(cookie["max-age"]) <= 14 * 86400
    assert cookie["value"] not in response.text and response.headers["cache-control"] == "no-store"
    return cookie["value"]


def test_a_browser_gets_its_refresh_token_only_in_a_cookie_from_every_token_endpoint(browser):
    register(browser)
    first = assert_a_browser_answer(login(browser))  # the password grant
    second = assert_a_browser_answer(browser.post("/auth/refresh"))  # the cookie alone
    third = assert_a_browser_answer(
        browser.post("/auth/login", data={"grant_type": "refresh_token"})
    )
    assert len({first, second, third}) == 3  # rotated each time
    assert browser.cookies[main.REFRESH_COOKIE] == third
    assert me(browser, browser.post("/auth/refresh").json()).status_code == 200


def test_without_an_origin_nothing_changes_the_refresh_token_is_in_the_body(client):
    tokens = signed_up(client)
    assert len(tokens["refresh_token"]) > 20
    response = refresh(client, tokens["refresh_token"])
    assert response.status_code == 200 and response.json()["refresh_token"]
    assert "set-cookie" not in response.headers


def test_a_browser_logs_out_with_the_cookie_alone_and_it_is_cleared(browser):
    register(browser)
    tokens = login(browser).json()
    cookie = browser.cookies[main.REFRESH_COOKIE]
    response = browser.post("/auth/logout")
    assert response.status_code == 204
    assert refresh_cookie(response)["max-age"] == "0" and refresh_cookie(response)["value"] == ""
    assert main.REFRESH_COOKIE not in browser.cookies
    assert_bearer_401(me(browser, tokens))
    assert_bearer_401(
        browser.post("/auth/refresh", headers={"Cookie": f"{main.REFRESH_COOKIE}={cookie}"})
    )
    # Told to forget its cookie, it sends none: still fine.
    assert browser.post("/auth/logout").status_code == 204


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://testserver:8443", "null", None]
)
def test_the_cookie_works_only_from_an_allowed_origin(browser, origin):
    """Another page can't refresh, nor log the user out, with the user's cookie: not even one on the
    same site."""
    register(browser)
    login(browser)
    headers = {"Origin": origin} if origin else {}
    with TestClient(
        main.app, base_url=API_ORIGIN, cookies=browser.cookies, headers=headers
    ) as elsewhere:
        for path in ("/auth/refresh", "/auth/logout"):
            response = elsewhere.post(path)
            record_status(response)
            assert response.status_code == 403, (path, response.text)
            assert "set-cookie" not in response.headers and "access_token" not in response.text
        grant = elsewhere.post("/auth/login", data={"grant_type": "refresh_token"})
        assert grant.status_code == 403 and "set-cookie" not in grant.headers
    assert_a_browser_answer(browser.post("/auth/refresh"))  # the session lives on


def test_a_foreign_origin_cannot_log_in_to_plant_its_cookie(browser, hasher):
    """Login CSRF: a page elsewhere posts a login form with the attacker's account into the victim's
    browser."""
    register(browser, "attacker@example.com")
    hasher.calls.clear()
    response = login(browser, "attacker@example.com", Origin="https://evil.example")
    assert response.status_code == 403 and response.json()["error"] == "access_denied"
    assert "set-cookie" not in response.headers and hasher.calls == []  # refused before any work


def test_origins_listed_in_cors_origins_may_use_the_cookie(browser, monkeypatch):
    monkeypatch.setattr(main, "CORS_ORIGINS", ["http://localhost:5173"])
    register(browser)
    front_end = {"Origin": "http://localhost:5173"}
    assert_a_browser_answer(login(browser, **front_end))
    assert_a_browser_answer(browser.post("/auth/refresh", headers=front_end))
    assert browser.post("/auth/logout", headers=front_end).status_code == 204
    assert main.REFRESH_COOKIE not in browser.cookies


def test_with_neither_a_body_token_nor_a_cookie(browser):
    for response in (
        browser.post("/auth/refresh"),
        browser.post("/auth/refresh", json={}),
        browser.post("/auth/login", data={"grant_type": "refresh_token"}),
    ):
        assert response.status_code == 422 and response.json()["error"] == "invalid_request"
        assert response.json()["detail"][0]["loc"] == ["body", "refresh_token"]
    assert browser.post("/auth/logout").status_code == 204  # RFC 7009: nothing to revoke is fine


def test_a_cookie_gets_the_same_grace_window_and_reuse_detection(browser, engine):
    register(browser)
    login(browser)
    old = browser.cookies[main.REFRESH_COOKIE]
    assert_a_browser_answer(browser.post("/auth/refresh"))
    # A second tab, same moment.
    retry = browser.post("/auth/refresh", headers={"Cookie": f"{main.REFRESH_COOKIE}={old}"})
    assert_a_browser_answer(retry)
    age_refreshes(engine)
    assert_bearer_401(
        browser.post("/auth/refresh", headers={"Cookie": f"{main.REFRESH_COOKIE}={old}"})
    )
    assert_bearer_401(me(browser, retry.json()))  # reuse ended the session


def test_two_refresh_cookies_in_one_request_are_refused_and_no_login_is_used_or_ended(
    browser, engine
):
    """A sibling host (evil.example.com beside api.example.com) can plant a cookie for the whole
    site, which the browser then sends beside ours. Neither may be used: one of them is someone
    else's login."""
    register(browser, "victim@example.com")
    login(browser, "victim@example.com")
    victims = browser.cookies[main.REFRESH_COOKIE]
    register(browser, "attacker@example.com")
    planted = assert_a_browser_answer(login(browser, "attacker@example.com"))
    both = {"Cookie": f"{main.REFRESH_COOKIE}={victims}; {main.REFRESH_COOKIE}={planted}"}
    browser.cookies.clear()
    for path, form in (
        ("/auth/refresh", None),
        ("/auth/logout", None),
        ("/auth/login", {"grant_type": "refresh_token"}),
    ):
        response = browser.post(path, data=form, headers=both)
        assert response.status_code == 400, (path, response.text)
        assert (
            response.json()["error"] == "invalid_request" and "set-cookie" not in response.headers
        )
    assert [login.refresh_count for login in rows(engine, main.Login)] == [0, 0]  # neither used
    assert not any(login.revoked for login in rows(engine, main.Login))  # nor ended
    for cookie in (victims, planted):
        assert_a_browser_answer(
            browser.post("/auth/refresh", headers={"Cookie": f"{main.REFRESH_COOKIE}={cookie}"})
        )


def test_a_cookie_of_the_old_name_is_ignored(browser):
    register(browser)
    cookie = login(browser).cookies[main.REFRESH_COOKIE]
    browser.cookies.clear()
    response = browser.post("/auth/refresh", headers={"Cookie": f"refresh_token={cookie}"})
    assert response.status_code == 422  # as if there were no cookie at all
    assert_a_browser_answer(
        browser.post("/auth/refresh", headers={"Cookie": f"{main.REFRESH_COOKIE}={cookie}"})
    )


def test_a_browser_that_sends_a_body_token_gets_its_successor_in_the_cookie(client, browser):
    tokens = signed_up(client)
    response = browser.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_a_browser_answer(response)


CORS_PREFLIGHT = """
import main
from fastapi.testclient import TestClient
client = TestClient(main.app)
asking = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
for origin in ("http://localhost:5173", "https://evil.example"):
    r = client.options("/users/me", headers={"Origin": origin, **asking})
    allowed = r.headers.get("access-control-allow-origin")
    print(origin, allowed, r.headers.get("access-control-allow-credentials"))
"""


@pytest.mark.parametrize("cors_origins", [None, "http://localhost:5173, https://app.example.com"])
def test_only_configured_origins_may_call_the_api_from_a_browser(app_copy, cors_origins):
    env = {key: value for key, value in os.environ.items() if key != "CORS_ORIGINS"}
    if cors_origins:
        env["CORS_ORIGINS"] = cors_origins
    result = subprocess.run(
        [sys.executable, "-c", CORS_PREFLIGHT],
        cwd=app_copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    listed, unlisted = result.stdout.split("\n")[:2]
    assert listed == (
        "http://localhost:5173 http://localhost:5173 true"
        if cors_origins  # with credentials: the cookie
        else "http://localhost:5173 None None"
    )
    # No Access-Control-Allow-Origin: the browser refuses.
    assert unlisted.startswith("https://evil.example None ")


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves an empty page: the front end's origin, in whose context the test runs its fetch()
    calls."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<!doctype html><title>front end</title>")

    def log_message(self, *args) -> None:
        pass


@contextmanager
def page_origin() -> Iterator[str]:
    """A web server of its own for a front end's page: its origin, http://localhost:PORT."""
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    yield f"http://localhost:{pages.server_port}"
    pages.shutdown()
    pages.server_close()


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    """Headless Chromium, Debian's (`apt-get install chromium`), driven by Playwright."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield browser
        browser.close()


FETCH = """async ([url, init]) => {
    const response = await fetch(url, {credentials: "include", ...init});
    return {status: response.status, text: await response.text()};
}"""


TRY_FETCH = """async ([url, init]) => {
    try { await fetch(url, {credentials: "include", ...init}); }
    catch (error) { return String(error); }
}"""


def test_a_front_end_on_another_origin_stays_logged_in_in_a_real_browser(
    chromium, engine, database_url, tmp_path
):
    """The README's browser recipe in Chromium: log in with fetch, reload, stay logged in through
    the cookie, which no script ever sees; a page on an unlisted origin can't use it; after logout a
    refresh fails."""
    with (
        page_origin() as front_end,
        page_origin() as foreign,
        running_servers(tmp_path, database_url, CORS_ORIGINS=front_end) as [server],
    ):
        api = server.url.replace("127.0.0.1", "localhost")
        context = chromium.new_context()
        page = context.new_page()
        page.goto(front_end + "/")
        texts = []

        def call(path: str, **init) -> dict:
            answer = page.evaluate(FETCH, [api + path, init])
            texts.append(answer["text"])
            return answer

        account = json.dumps({"email": "ann@example.com", "password": PASSWORD})
        assert (
            call(
                "/auth/register",
                method="POST",
                headers={"Content-Type": "application/json"},
                body=account,
            )["status"]
            == 201
        )
        form = "username=ann%40example.com&password=correct+horse+battery"
        logged_in = call(
            "/auth/login",
            method="POST",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert logged_in["status"] == 200 and "refresh_token" not in json.loads(logged_in["text"])
        access = json.loads(logged_in["text"])["access_token"]  # kept in a variable, in memory
        assert call("/users/me", headers={"Authorization": f"Bearer {access}"})["status"] == 200

        page.reload()  # the variable is gone; the cookie is not
        on_load = call("/auth/refresh", method="POST")
        assert on_load["status"] == 200
        access = json.loads(on_load["text"])["access_token"]
        account = call("/users/me", headers={"Authorization": f"Bearer {access}"})
        assert json.loads(account["text"])["email"] == "ann@example.com"

        [cookie] = [cookie for cookie in context.cookies() if cookie["name"] == main.REFRESH_COOKIE]
        assert (
            cookie["httpOnly"]
            and cookie["secure"]
            and cookie["sameSite"] == "Strict"
            and cookie["path"] == "/"
        )
        # Cookies have no port: the page's own host.
        assert "refresh_token" not in page.evaluate("document.cookie")
        assert page.evaluate("localStorage.length") == 0
        assert [text for text in texts if cookie["value"] in text] == []

        # A page on an origin not listed, on the same site (so the browser does send the cookie):
        elsewhere = context.new_page()
        elsewhere.goto(foreign + "/")
        for path in ("/auth/logout", "/auth/refresh"):  # simple requests: no preflight stops them
            assert "TypeError" in elsewhere.evaluate(TRY_FETCH, [api + path, {"method": "POST"}])
        attacker = {
            "method": "POST",
            "body": "username=mallory%40example.com&password=whatever1",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        }
        assert "TypeError" in elsewhere.evaluate(TRY_FETCH, [api + "/auth/login", attacker])
        # The server's access log: each request did reach it, with the cookie, and was refused.
        time.sleep(0.2)
        refused = re.findall(r'"POST (/auth/\w+) HTTP/1.1" 403', server.log.read_text())
        assert refused == ["/auth/logout", "/auth/refresh", "/auth/login"]
        assert [c["value"] for c in context.cookies() if c["name"] == main.REFRESH_COOKIE] == [
            cookie["value"]
        ]
        assert call("/auth/refresh", method="POST")["status"] == 200  # still logged in

        assert call("/auth/logout", method="POST")["status"] == 204
        assert [c for c in context.cookies() if c["name"] == main.REFRESH_COOKIE] == []
        assert call("/auth/refresh", method="POST")["status"] == 422  # nothing to refresh with
        context.close()


def refresh_calls(server: Server) -> list:
    """Refreshes good and bad, the refresh grant and logouts, for chapter 1's mixed load."""
    url = server.url
    good = [login(server).json()["refresh_token"] for _ in range(10)]
    calls = [
        ("refresh", lambda http, t=t: http.post(url + "/auth/refresh", json={"refresh_token": t}))
        for t in good
    ]
    calls += [
        (
            "refresh",
            lambda http, n=n: http.post(url + "/auth/refresh", json={"refresh_token": f"bad-{n}"}),
        )
        for n in range(15)
    ]
    calls += [
        (
            "grant",
            lambda http, n=n: http.post(
                url + "/auth/login",
                data={"grant_type": "refresh_token", "refresh_token": f"bad-{n}"},
            ),
        )
        for n in range(10)
    ]
    calls += [
        (
            "logout",
            lambda http, n=n: http.post(url + "/auth/logout", json={"refresh_token": f"bad-{n}"}),
        )
        for n in range(5)
    ]
    calls += [
        ("garbage", lambda http: http.post(url + "/auth/refresh", content=b"\xff{not json"))
    ] * 5
    return calls


def test_refresh_and_logout_give_their_connection_back_before_answering(client, engine):
    replayed = signed_up(client)["refresh_token"]
    refresh(client, replayed)
    age_refreshes(engine)
    unknown = {"refresh_token": "unknown"}
    assert_connections_given_back(
        lambda watched: [
            refresh(watched, replayed),
            refresh(watched, "unknown"),
            watched.post("/auth/logout", json=unknown),
        ],
        [401, 401, 204],
    )


# === 4. Your account: your logins (the API says sessions), a new password, deleting it


def sessions(client, tokens: dict) -> httpx.Response:
    return client.get("/auth/sessions", headers=bearer(tokens["access_token"]))


def test_sessions_lists_your_live_logins_newest_first(client, engine):
    laptop = signed_up(client)
    phone = login(client, **{"User-Agent": "Phone/1.0"}).json()
    ended = login(client).json()
    run_sql(
        engine,
        "UPDATE login SET revoked = :yes WHERE id = :id",
        yes=True,
        id=access_claims(ended)["sid"],
    )
    expired = login(client).json()
    run_sql(
        engine,
        "UPDATE login SET expires_at = :past WHERE id = :id",
        past=time.time() - 1,
        id=access_claims(expired)["sid"],
    )
    signed_up(client, "bob@example.com")  # someone else's login is never listed
    response = sessions(client, laptop)
    assert response.status_code == 200
    listed = response.json()
    assert [item["id"] for item in listed] == [
        access_claims(phone)["sid"],
        access_claims(laptop)["sid"],
    ]
    assert [item["current"] for item in listed] == [False, True]
    assert listed[0]["user_agent"] == "Phone/1.0"
    assert set(listed[0]) == {"id", "created_at", "last_used_at", "user_agent", "current"}
    for field in ("created_at", "last_used_at"):  # ISO 8601 with the time zone, on every database
        assert listed[0][field].endswith("Z")  # UTC, said so
        assert datetime.fromisoformat(listed[0][field]).utcoffset() == timedelta(0)
    tokens = [laptop[name] for name in ("access_token", "refresh_token") if name in laptop]
    assert [token for token in tokens if token in response.text] == []


def test_sessions_show_when_each_was_last_refreshed(client):  # ch. 3
    tokens = signed_up(client)
    before = sessions(client, tokens).json()[0]
    time.sleep(0.01)
    tokens = refresh(client, tokens["refresh_token"]).json()
    after = sessions(client, tokens).json()[0]
    assert after["id"] == before["id"] and after["created_at"] == before["created_at"]
    assert datetime.fromisoformat(after["last_used_at"]) > datetime.fromisoformat(
        before["last_used_at"]
    )


def test_a_sessions_user_agent_is_cut_to_a_sane_length(client):
    register(client)
    tokens = login(client, **{"User-Agent": "x" * 10_000}).json()
    assert len(sessions(client, tokens).json()[0]["user_agent"]) == 200


def test_ending_one_session_stops_its_tokens_at_once(client):
    phone, laptop = signed_up(client), login(client).json()
    sid = access_claims(phone)["sid"]
    assert (
        client.delete(f"/auth/sessions/{sid}", headers=bearer(laptop["access_token"])).status_code
        == 204
    )
    assert_bearer_401(me(client, phone))
    assert_bearer_401(refresh(client, phone["refresh_token"]))  # ch. 3
    assert me(client, laptop).status_code == 200
    assert (
        client.delete(f"/auth/sessions/{sid}", headers=bearer(laptop["access_token"])).status_code
        == 404
    )


@pytest.mark.parametrize("whose", ["someone else's", "unknown", "nonsense"])
def test_ending_a_session_that_isnt_yours_is_404(client, whose):
    ann, bob = signed_up(client), signed_up(client, "bob@example.com")
    sid = {
        "someone else's": access_claims(bob)["sid"],
        "unknown": "0" * 32,
        "nonsense": "%00" + "ä" * 500,
    }[whose]
    response = client.delete(f"/auth/sessions/{sid}", headers=bearer(ann["access_token"]))
    assert response.status_code == 404
    assert me(client, bob).status_code == 200


def test_logging_out_everywhere_ends_every_session_this_one_included(client):
    first, second = signed_up(client), login(client).json()
    other_user = signed_up(client, "bob@example.com")
    assert client.delete("/auth/sessions", headers=bearer(first["access_token"])).status_code == 204
    for tokens in (first, second):
        assert_bearer_401(me(client, tokens))
        assert_bearer_401(refresh(client, tokens["refresh_token"]))  # ch. 3
    assert me(client, other_user).status_code == 200
    assert login(client).status_code == 200


def change_password(
    client, tokens: dict, current: str = PASSWORD, new: str = "a brand new password"
):
    return client.post(
        "/auth/change-password",
        json={"current_password": current, "new_password": new},
        headers=bearer(tokens["access_token"]),
    )


def test_changing_the_password_ends_every_other_session_at_once(client):
    this_device, other_device = signed_up(client), login(client).json()
    assert change_password(client, this_device).status_code == 204
    assert_bearer_401(me(client, other_device))
    assert_bearer_401(refresh(client, other_device["refresh_token"]))  # ch. 3
    assert me(client, this_device).status_code == 200  # the caller's own session keeps working
    assert refresh(client, this_device["refresh_token"]).status_code == 200  # ch. 3
    assert login(client).status_code == 401
    assert login(client, password="a brand new password").status_code == 200


def test_changing_the_password_needs_the_current_one(client):
    tokens = signed_up(client)
    response = change_password(client, tokens, current="not my password")
    assert response.status_code == 400 and "not correct" in response.json()["detail"]
    assert login(client).status_code == 200
    assert me(client, tokens).status_code == 200


def test_a_password_set_while_the_current_one_is_checked_is_never_overwritten(
    client, engine, monkeypatch
):
    """A reset, or a sign-in that removed a squatter's password (chapter 7), wins over a change
    still checking the old one: the change is a 400."""
    tokens = signed_up(client)
    check = main.verify_password

    def check_while_it_changes(password: str, hashed_password: str) -> bool:
        set_password_elsewhere(engine)
        return check(password, hashed_password)

    monkeypatch.setattr(main, "verify_password", check_while_it_changes)
    assert change_password(client, tokens).status_code == 400
    assert rows(engine, main.User)[0].hashed_password == "set meanwhile"


def test_a_password_set_while_a_change_is_stored_waits_and_then_wins(client, engine, monkeypatch):
    """The other order: the change checked the password first, so the account's row is locked
    until the change is stored; the other setting waits, and ends the changer's login."""
    tokens = signed_up(client)
    store = main.set_password
    others = []

    def store_while_another_sets_it(session, user_id, hashed_password, keep=""):
        def set_meanwhile() -> None:
            with Session(engine) as other:
                store(other, user_id, "set meanwhile")
                other.commit()

        others.append(threading.Thread(target=set_meanwhile))
        others[0].start()
        time.sleep(0.5)  # the other is under way, waiting for this change's transaction
        store(session, user_id, hashed_password, keep)

    monkeypatch.setattr(main, "set_password", store_while_another_sets_it)
    assert change_password(client, tokens).status_code == 204
    others[0].join()
    assert rows(engine, main.User)[0].hashed_password == "set meanwhile"
    assert_bearer_401(me(client, tokens))


@pytest.mark.parametrize("new", ["short", "x" * 129])
def test_a_new_password_follows_the_sign_up_rules(client, new):
    tokens = signed_up(client)
    assert change_password(client, tokens, new=new).status_code == 422
    assert login(client).status_code == 200


def delete_account(client, tokens: dict, password: str = PASSWORD):
    return client.request(
        "DELETE", "/users/me", json={"password": password}, headers=bearer(tokens["access_token"])
    )


def test_deleting_your_account_removes_it_and_its_sessions(client, engine):
    tokens, other = signed_up(client), login(client).json()
    old_id = me(client, tokens).json()["id"]
    assert delete_account(client, tokens).status_code == 204
    for session_tokens in (tokens, other):
        assert_bearer_401(me(client, session_tokens))
        assert_bearer_401(refresh(client, session_tokens["refresh_token"]))  # ch. 3
    assert rows(engine, main.Login) == []
    assert login(client).status_code == 401
    again = register(client)
    assert again.status_code == 201 and again.json()["id"] != old_id


def test_deleting_your_account_needs_your_password(client):
    tokens = signed_up(client)
    assert delete_account(client, tokens, "not my password").status_code == 400
    assert me(client, tokens).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/auth/sessions"),
        ("DELETE", "/auth/sessions"),
        ("DELETE", "/auth/sessions/x"),
        ("POST", "/auth/change-password"),
        ("DELETE", "/users/me"),
    ],
)
def test_account_routes_need_the_me_scope(client, method, path):
    signed_up(client)
    nothing = login(client, scope="admin").json()  # a valid token, granted no scope
    body = {"current_password": PASSWORD, "new_password": "whatever123", "password": PASSWORD}
    assert (
        client.request(method, path, json=body, headers=bearer(nothing["access_token"])).status_code
        == 403
    )
    assert_bearer_401(client.request(method, path, json=body))
    assert login(client).status_code == 200  # nothing was changed or deleted


def account_calls(server: Server, user: dict) -> list:
    """Users listing their logins, for chapter 1's mixed load."""
    as_user = bearer(user["access_token"])
    return [
        ("sessions", lambda http: http.get(server.url + "/auth/sessions", headers=as_user))
    ] * 10


def test_account_routes_give_their_connection_back_before_answering(client):
    user = signed_up(client)
    assert_connections_given_back(
        lambda watched: [
            sessions(watched, user),
            watched.delete("/auth/sessions/unknown", headers=bearer(user["access_token"])),
            change_password(watched, user, current="wrong"),
            delete_account(watched, user, "wrong"),
        ],
        [200, 404, 400, 400],
    )


# === 5. Login throttling: failures are counted, to slow password guessing (OWASP ASVS 2.2.1)


def failed_logins(client, times: int, email: str = "ann@example.com", **headers) -> list[int]:
    return [login(client, email, "wrong password", **headers).status_code for _ in range(times)]


def test_five_failures_at_one_email_throttle_that_client_at_that_email(server):
    register(server)
    register(server, "bob@example.com")
    assert failed_logins(server, 5) == [401] * 5
    throttled = login(server)  # the right password is refused too
    assert throttled.status_code == 429
    assert 0 < int(throttled.headers["retry-after"]) <= 15 * 60
    assert (
        throttled.json()["error"] == "temporarily_unavailable"
        and "try again in" in throttled.json()["detail"]
    )
    assert login(server, password="wrong password").status_code == 429
    # Other accounts from this client: fine.
    assert login(server, "bob@example.com").status_code == 200
    # One attacker can't lock the user out.
    assert login(server.from_address("127.0.0.2")).status_code == 200


def test_throttling_answers_alike_whether_or_not_the_account_exists(server):
    register(server)
    failed_logins(server, 5)
    failed_logins(server, 5, "nobody@example.com")
    known, unknown = login(server), login(server, "nobody@example.com")
    assert known.status_code == unknown.status_code == 429
    assert known.json()["error"] == unknown.json()["error"]
    assert abs(int(known.headers["retry-after"]) - int(unknown.headers["retry-after"])) <= 2


def test_fifty_failures_from_one_client_throttle_all_its_logins(server):
    register(server)
    assert [login(server, f"guess{n}@example.com", "wrong").status_code for n in range(50)] == [
        401
    ] * 50
    # Even the right password at an email never tried from here.
    assert login(server).status_code == 429
    assert login(server.from_address("127.0.0.3")).status_code == 200


def test_parallel_guesses_get_no_more_answers_than_the_limit(server):
    """A burst of guesses all pass the first check before any has failed: they are checked again."""
    register(server)
    codes = [
        response.status_code
        for response in in_parallel(
            [lambda n=n: login(server, password=f"guess {n}") for n in range(24)]
        )
    ]
    assert set(codes) <= {401, 429}
    assert 5 <= codes.count(401) <= 5 + (os.cpu_count() or 1), codes
    assert login(server).status_code == 429


def test_a_forwarded_address_of_any_length_is_stored_bounded_and_throttled(server, engine):
    """uvicorn takes the client's address from X-Forwarded-For when 127.0.0.1 sends it (a proxy on
    this host): whatever that says, failures are counted, and no guess ever gets a 503 instead of
    its 401."""
    register(server)
    forwarded = {"X-Forwarded-For": secrets.token_hex(1600)}  # 3,200 random characters
    assert failed_logins(server, 5, **forwarded) == [401] * 5
    assert login(server, **forwarded).status_code == 429
    assert {len(failure.client_hash) for failure in rows(engine, main.LoginFailure)} == {64}
    assert login(server).status_code == 200  # the proxy's other clients are other clients


def test_on_a_unix_socket_no_stranger_can_lock_everyone_out(engine, database_url, tmp_path):
    """Behind nginx on a Unix socket, uvicorn knows no client address. One bucket for all such
    callers would let 50 failures from anyone lock everyone out: with no address only the per-email
    limit counts."""
    with running_servers(tmp_path, database_url, uds=True) as [server]:
        register(server)
        assert [login(server, f"guess{n}@example.com", "wrong").status_code for n in range(60)] == [
            401
        ] * 60
        assert login(server).status_code == 200
        assert failed_logins(server, 5) == [401] * 5
        assert login(server).status_code == 429  # an email still can't be guessed at without end


def test_the_count_survives_a_restart(engine, database_url, tmp_path):
    with running_servers(tmp_path, database_url) as [server]:
        register(server)
        failed_logins(server, 5)
    with running_servers(tmp_path, database_url) as [server]:
        assert login(server).status_code == 429


def test_a_throttled_attempt_is_refused_before_any_hashing(client, hasher):
    register(client)
    failed_logins(client, 5)
    hasher.calls.clear()
    assert login(client).status_code == 429
    assert login(client, "nobody@example.com").status_code == 401  # not throttled at another email
    assert [args[0] for name, args, *_ in hasher.calls] == [main.DUMMY_HASH]


@pytest.mark.parametrize("recheck", [change_password, delete_account])  # ch. 4
def test_password_rechecks_count_and_are_throttled_as_logins(client, hasher, recheck):
    """A stolen access token gives no more guesses at the password than the login form does."""
    tokens = signed_up(client)
    assert [recheck(client, tokens, "wrong password").status_code for _ in range(5)] == [400] * 5
    hasher.calls.clear()
    # The right password is refused too, before any hashing.
    throttled = recheck(client, tokens, PASSWORD)
    assert throttled.status_code == 429 and 0 < int(throttled.headers["retry-after"]) <= 15 * 60
    assert throttled.json()["error"] == "temporarily_unavailable"
    assert hasher.calls == []
    assert login(client).status_code == 429  # they counted as failed logins at this email
    with test_client("10.1.2.3") as elsewhere:  # the user, from another address, is not locked out
        assert recheck(elsewhere, tokens, PASSWORD).status_code == 204


def test_failed_logins_throttle_password_rechecks_from_that_client(client):  # ch. 4
    tokens = signed_up(client)
    failed_logins(client, 5)
    assert change_password(client, tokens).status_code == 429
    assert delete_account(client, tokens).status_code == 429
    assert me(client, tokens).status_code == 200


def test_a_successful_login_clears_the_count_at_that_email(client):
    register(client)
    assert failed_logins(client, 4) == [401] * 4
    assert login(client).status_code == 200
    assert failed_logins(client, 5) == [401] * 5
    assert login(client).status_code == 429


def test_failures_count_for_fifteen_minutes_and_retry_after_says_when(client, engine):
    register(client)
    failed_logins(client, 5)
    oldest = min(failure.id for failure in rows(engine, main.LoginFailure))
    run_sql(
        engine,
        "UPDATE loginfailure SET failed_at = :t WHERE id = :id",
        t=time.time() - 840,
        id=oldest,
    )
    response = login(client)
    assert response.status_code == 429 and 55 <= int(response.headers["retry-after"]) <= 61
    run_sql(
        engine,
        "UPDATE loginfailure SET failed_at = :t WHERE id = :id",
        t=time.time() - 901,
        id=oldest,
    )
    assert login(client).status_code == 200


def test_old_failures_are_deleted(client, engine):
    register(client)
    failed_logins(client, 3)
    run_sql(engine, "UPDATE loginfailure SET failed_at = :t", t=time.time() - 960)
    failed_logins(client, 1)
    assert len(rows(engine, main.LoginFailure)) == 1


def test_failures_store_no_email_in_clear(client, engine):
    register(client)
    failed_logins(client, 1, "secret.person@example.com")
    assert "secret.person" not in json.dumps(
        [row.model_dump() for row in rows(engine, main.LoginFailure)], default=str
    )


def test_cluster_the_count_holds_across_workers_and_servers(cluster):
    a, b = cluster
    register(a)
    assert [login((a, b)[n % 2], password="wrong").status_code for n in range(5)] == [401] * 5
    assert [login(server).status_code for server in (a, b, a, b)] == [429] * 4


# === 6. Email links: reset a forgotten password, verify an address; once, soon, stored hashed


class Inbox:
    """An aiosmtpd handler keeping every message it receives, after `delay` seconds (a slow mail
    server)."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.delay = 0.0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        await asyncio.sleep(self.delay)
        self.messages.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)
        )
        return "250 OK"

    def links(self, to: str, page: str) -> list[str]:
        """The tokens of the links to `page` in the messages sent to `to`, oldest first."""
        return [
            match
            for message in self.messages
            if message["To"] == to
            for match in re.findall(
                rf"http://app\.example/{page}\?token=([\w-]+)", message.get_content()
            )
        ]


@pytest.fixture
def inbox(monkeypatch) -> Iterator[Inbox]:
    """A real SMTP server on a free port, and the app's settings pointing at it."""
    inbox = Inbox()
    inbox.port = port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    for name, value in {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_tls": False,
        "emails_from": "auth@app.example",
        "frontend_url": "http://app.example",
    }.items():
        monkeypatch.setattr(main.email_settings, name, value)
    yield inbox
    controller.stop()


def forgot(client, email: str = "ann@example.com"):
    return client.post("/auth/forgot-password", json={"email": email})


def reset(client, token: str, new_password: str = "my new password"):
    return client.post("/auth/reset-password", json={"token": token, "new_password": new_password})


def test_forgot_password_emails_a_link_that_resets_the_password(client, engine, inbox):
    sessions_before = [signed_up(client), login(client).json()]
    response = forgot(client, " Ann@Example.com ")
    assert response.status_code == 202
    [message] = [m for m in inbox.messages if "Reset" in m["Subject"]]
    assert message["From"] == "auth@app.example" and message["To"] == "ann@example.com"
    [token] = inbox.links("ann@example.com", "reset-password")
    assert token not in json.dumps(
        [row.model_dump() for row in rows(engine, main.EmailLink)], default=str
    )
    assert reset(client, token).status_code == 204
    for tokens in sessions_before:  # every session ends, at once
        assert_bearer_401(me(client, tokens))
        assert_bearer_401(refresh(client, tokens["refresh_token"]))  # ch. 3
    assert login(client).status_code == 401
    assert login(client, password="my new password").status_code == 200


def test_a_reset_link_works_once(client, inbox):
    signed_up(client)
    forgot(client)
    [token] = inbox.links("ann@example.com", "reset-password")
    assert reset(client, token).status_code == 204
    response = reset(client, token, "yet another password")
    assert response.status_code == 400 and "invalid" in response.json()["detail"]
    assert login(client, password="my new password").status_code == 200


def test_a_reset_link_expires(client, engine, inbox):
    signed_up(client)
    forgot(client)
    [token] = inbox.links("ann@example.com", "reset-password")
    run_sql(engine, "UPDATE emaillink SET expires_at = :past", past=time.time() - 1)
    assert reset(client, token).status_code == 400
    assert login(client).status_code == 200


def test_a_reset_link_lives_as_long_as_the_setting(client, engine, inbox):
    signed_up(client)
    before = time.time()
    forgot(client)
    [link] = [row for row in rows(engine, main.EmailLink) if row.purpose == "reset"]
    assert before + 30 * 60 <= link.expires_at <= time.time() + 30 * 60


def test_a_reset_link_is_worthless_once_the_password_changed(client, inbox):  # ch. 4
    tokens = signed_up(client)
    forgot(client)
    [token] = inbox.links("ann@example.com", "reset-password")
    assert change_password(client, tokens).status_code == 204
    assert reset(client, token).status_code == 400
    assert login(client, password="a brand new password").status_code == 200


def test_a_newer_reset_link_supersedes_the_older_one(client, engine, inbox):
    signed_up(client)
    forgot(client)
    run_sql(engine, "UPDATE emaillink SET created_at = :past", past=time.time() - 120)
    forgot(client)
    old, new = inbox.links("ann@example.com", "reset-password")
    assert reset(client, old).status_code == 400
    assert reset(client, new).status_code == 204


@pytest.mark.parametrize("token", ["made-up", "", "x" * 1000])
def test_a_reset_with_a_bad_token_is_refused(client, inbox, token):
    signed_up(client)
    assert reset(client, token).status_code in (400, 422)
    assert login(client).status_code == 200


def test_a_reset_needs_a_password_by_the_sign_up_rules(client, inbox):
    signed_up(client)
    forgot(client)
    [token] = inbox.links("ann@example.com", "reset-password")
    assert reset(client, token, "short").status_code == 422
    # The link was not used up by the refused attempt.
    assert reset(client, token).status_code == 204


def test_forgot_password_gives_the_same_answer_for_unknown_or_inactive_accounts(
    client, engine, inbox
):
    signed_up(client)
    signed_up(client, "gone@example.com")
    run_sql(
        engine, "UPDATE \"user\" SET is_active = :no WHERE email = 'gone@example.com'", no=False
    )
    answers = [
        forgot(client, address)
        for address in ("ann@example.com", "nobody@example.com", "gone@example.com")
    ]
    assert {response.status_code for response in answers} == {202}
    assert len({response.text for response in answers}) == 1
    assert [m["To"] for m in inbox.messages if "Reset" in m["Subject"]] == ["ann@example.com"]


def test_at_most_one_reset_email_a_minute_per_address(client, engine, inbox):
    signed_up(client)
    signed_up(client, "bob@example.com")
    for _ in range(3):
        assert forgot(client).status_code == 202
    forgot(client, "bob@example.com")
    assert len(inbox.links("ann@example.com", "reset-password")) == 1
    assert len(inbox.links("bob@example.com", "reset-password")) == 1
    run_sql(engine, "UPDATE emaillink SET created_at = :past", past=time.time() - 61)
    forgot(client)
    assert len(inbox.links("ann@example.com", "reset-password")) == 2


def test_racing_reset_requests_send_one_email(engine, database_url, tmp_path, inbox):
    """Over real HTTP: a dozen requests for one address at the same moment, and one email."""
    smtp = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(inbox.port),
        "SMTP_TLS": "false",
        "FRONTEND_URL": "http://app.example",
    }
    with running_servers(tmp_path, database_url, **smtp) as [server]:
        register(server)
        in_parallel([lambda: forgot(server) for _ in range(12)])
        deadline = time.time() + 10
        while time.time() < deadline and not inbox.links("ann@example.com", "reset-password"):
            time.sleep(0.1)
        time.sleep(1)  # time for any second email to arrive
    assert len(inbox.links("ann@example.com", "reset-password")) == 1
    assert len(inbox.links("ann@example.com", "verify-email")) == 1


def test_registering_emails_a_link_that_verifies_the_address(client, engine, inbox):
    tokens = signed_up(client)
    assert me(client, tokens).json()["is_verified"] is False
    [token] = inbox.links("ann@example.com", "verify-email")
    assert client.post("/auth/verify-email", json={"token": token}).status_code == 204
    assert me(client, tokens).json()["is_verified"] is True
    assert client.post("/auth/verify-email", json={"token": token}).status_code == 400  # once only


def test_a_verification_link_expires(client, engine, inbox):
    tokens = signed_up(client)
    [token] = inbox.links("ann@example.com", "verify-email")
    run_sql(engine, "UPDATE emaillink SET expires_at = :past", past=time.time() - 1)
    assert client.post("/auth/verify-email", json={"token": token}).status_code == 400
    assert me(client, tokens).json()["is_verified"] is False


def test_a_reset_token_is_not_a_verification_token_and_vice_versa(client, inbox):
    tokens = signed_up(client)
    forgot(client)
    [verify_token], [reset_token] = (
        inbox.links("ann@example.com", "verify-email"),
        inbox.links("ann@example.com", "reset-password"),
    )
    assert client.post("/auth/verify-email", json={"token": reset_token}).status_code == 400
    assert reset(client, verify_token).status_code == 400
    assert me(client, tokens).json()["is_verified"] is False


def test_resending_verification_answers_202_always_and_emails_at_most_once_a_minute(
    client, engine, inbox
):
    signed_up(client)
    signed_up(client, "done@example.com")
    [token] = inbox.links("done@example.com", "verify-email")
    client.post("/auth/verify-email", json={"token": token})
    run_sql(engine, "UPDATE emaillink SET created_at = :past", past=time.time() - 61)
    answers = [
        client.post("/auth/verify-email/resend", json={"email": address})
        for address in (
            "ann@example.com",
            "ann@example.com",
            "nobody@example.com",
            "done@example.com",
        )
    ]
    assert {response.status_code for response in answers} == {202} and len(
        {r.text for r in answers}
    ) == 1
    assert len(inbox.links("ann@example.com", "verify-email")) == 2  # sign-up's, then one more
    assert len(inbox.links("done@example.com", "verify-email")) == 1  # already verified: none
    assert len(inbox.links("nobody@example.com", "verify-email")) == 0


def test_a_broken_mail_server_never_fails_the_request(client, monkeypatch, caplog):
    monkeypatch.setattr(main.email_settings, "smtp_host", "127.0.0.1")
    monkeypatch.setattr(main.email_settings, "smtp_port", free_port())  # nothing listens there
    assert register(client).status_code == 201
    assert forgot(client).status_code == 202
    assert "Could not send an email to ann@example.com" in caplog.text


def make_certificate(name: str, issuer: tuple | None = None, hosts: tuple[str, ...] = ()) -> tuple:
    """A key and an X.509 certificate for `name`: a CA's (issuer None, self-signed) or a server's
    for `hosts`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_certificate = issuer or (key, None)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .issuer_name(issuer_certificate.subject if issuer_certificate else subject)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if issuer is None:
        usage = {
            "key_cert_sign": True,
            "crl_sign": True,
            "digital_signature": True,
            "key_encipherment": False,
        }
    else:
        usage = {
            "key_cert_sign": False,
            "crl_sign": False,
            "digital_signature": True,
            "key_encipherment": True,
        }
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host) for host in hosts]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(
            content_commitment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
            **usage,
        ),
        critical=True,
    )
    return key, builder.sign(issuer_key, hashes.SHA256())


class MailAccounts:
    """aiosmtpd's authenticator: records every login a client attempts (what a mail server sees of
    the password)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.attempts.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password == b"mail password")


@pytest.fixture
def tls_inbox(tmp_path, monkeypatch) -> Iterator[Inbox]:
    """A real SMTP server at localhost that offers STARTTLS with a certificate for `localhost`,
    signed by a test CA (in `inbox.ca_file`) that the machine doesn't trust; it takes a password
    only over TLS."""
    ca = make_certificate("Test CA")
    server_key, server_certificate = make_certificate("localhost", issuer=ca, hosts=("localhost",))
    (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(
        server_certificate.public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    inbox, accounts = Inbox(), MailAccounts()
    inbox.accounts, inbox.ca_file, port = accounts, str(tmp_path / "ca.pem"), free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context,
        require_starttls=True,
        authenticator=accounts,
        auth_require_tls=True,
    )
    controller.start()
    for name, value in {
        "smtp_host": "localhost",
        "smtp_port": port,
        "smtp_tls": True,
        "smtp_user": "mailer",
        "smtp_password": SecretStr("mail password"),
        "frontend_url": "http://app.example",
    }.items():
        monkeypatch.setattr(main.email_settings, name, value)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    yield inbox
    controller.stop()


def test_starttls_delivers_when_the_servers_certificate_verifies(client, tls_inbox, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_inbox.ca_file)  # the machine now trusts the test CA
    assert register(client).status_code == 201
    assert len(tls_inbox.links("ann@example.com", "verify-email")) == 1
    assert tls_inbox.accounts.attempts == [("mailer", "mail password")]  # logged in, over TLS


@pytest.mark.parametrize("failure", ["an untrusted certificate", "a certificate for another name"])
def test_starttls_refuses_a_server_that_fails_verification(
    client, tls_inbox, monkeypatch, caplog, failure
):
    """Whoever sits between the app and its mail server gets neither the link nor the mail
    password."""
    if failure == "a certificate for another name":
        monkeypatch.setenv("SSL_CERT_FILE", tls_inbox.ca_file)
        # The same server, but the certificate names localhost.
        monkeypatch.setattr(main.email_settings, "smtp_host", "127.0.0.1")
    assert register(client).status_code == 201  # the request that caused the mail still succeeds
    assert forgot(client).status_code == 202
    assert tls_inbox.messages == [] and tls_inbox.accounts.attempts == []
    failures = [
        record
        for record in caplog.records
        if "Could not send an email to ann@example.com" in record.message
    ]
    assert len(failures) == 2 and "CERTIFICATE_VERIFY_FAILED" in failures[0].message
    assert all(record.exc_info is None for record in failures)  # one line each, no traceback


def test_without_smtp_host_the_email_and_its_link_go_to_the_server_log(server):
    """The development path, on a real server: copy the link from the log and follow it."""
    assert register(server).status_code == 201
    assert forgot(server).status_code == 202
    time.sleep(0.5)
    log = server.log.read_text()
    assert "SMTP_HOST is not set" in log
    [token] = re.findall(r"http://localhost:8000/reset-password\?token=([\w-]+)", log)
    assert reset(server, token).status_code == 204
    [token] = re.findall(r"http://localhost:8000/verify-email\?token=([\w-]+)", log)
    assert server.post("/auth/verify-email", json={"token": token}).status_code == 204


def test_racing_resets_with_one_link_let_exactly_one_through(server):
    register(server)
    forgot(server)
    time.sleep(0.5)
    [token] = re.findall(r"reset-password\?token=([\w-]+)", server.log.read_text())
    calls = [lambda n=n: reset(server, token, f"new password {n}") for n in range(8)]
    codes = [response.status_code for response in in_parallel(calls)]
    assert sorted(codes) == [204] + [400] * 7, codes
    winner = codes.index(204)
    assert login(server, password=f"new password {winner}").status_code == 200


def test_forgot_password_takes_the_same_time_whether_or_not_the_account_exists(
    engine, database_url, tmp_path, inbox
):
    """Over real HTTP, with a mail server that takes a second per message: all the work comes after
    the answer."""
    inbox.delay = 1.0
    smtp = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(inbox.port),
        "SMTP_TLS": "false",
        "FRONTEND_URL": "http://app.example",
    }
    with (
        running_servers(tmp_path, database_url, **smtp) as [server],
        httpx.Client(base_url=server.url) as http,
    ):
        register(server)
        known, unknown = [], []
        for _ in range(15):
            for address, times in (("ann@example.com", known), ("nobody@example.com", unknown)):
                time.sleep(0.05)  # the work after the last answer is done: it doesn't slow this one
                started = time.perf_counter()
                assert (
                    http.post("/auth/forgot-password", json={"email": address}).status_code == 202
                )
                times.append(time.perf_counter() - started)
        time.sleep(1.5)
    # It did go out, a second later.
    assert len(inbox.links("ann@example.com", "reset-password")) == 1
    assert max(known) < inbox.delay / 2, known  # never waited for
    ratio = statistics.median(known) / statistics.median(unknown)
    assert 0.6 <= ratio <= 1.6, ratio


def test_a_route_can_demand_a_verified_email(client, inbox):
    """The recipe from the README: VerifiedUser in place of CurrentUser."""
    demo = FastAPI()

    @demo.get("/reports")
    async def reports(user: main.VerifiedUser) -> dict[str, str]:
        return {"for": user.email}

    tokens = signed_up(client)
    with TestClient(demo) as demo_client:
        response = demo_client.get("/reports", headers=bearer(tokens["access_token"]))
        assert response.status_code == 403 and "Verify your email" in response.json()["detail"]
        [token] = inbox.links("ann@example.com", "verify-email")
        client.post("/auth/verify-email", json={"token": token})
        assert demo_client.get("/reports", headers=bearer(tokens["access_token"])).json() == {
            "for": "ann@example.com"
        }
        assert demo_client.get("/reports").status_code == 401


def email_calls(server: Server) -> list:
    """Forgot-password and bad verification links, for chapter 1's mixed load."""
    url = server.url
    forgot_it = {"email": "ann@example.com"}
    calls = [("forgot", lambda http: http.post(url + "/auth/forgot-password", json=forgot_it))] * 5
    calls += [
        (
            "verify",
            lambda http, n=n: http.post(url + "/auth/verify-email", json={"token": f"bad-{n}"}),
        )
        for n in range(5)
    ]
    return calls


def test_email_link_routes_give_their_connection_back_before_answering(client):
    assert_connections_given_back(
        lambda watched: [
            watched.post("/auth/verify-email", json={"token": "unknown"}),
            reset(watched, "unknown"),
        ],
        [400, 400],
    )


# === 7. Sign in with Google, Microsoft, GitLab or any OpenID Connect provider (needs 3)


# node-oidc-provider (npm `oidc-provider`, OpenID Certified) with its own login and consent pages.
# The test writes its config: the issuer, the client, the signing key (so a test can sign as the
# provider would), the accounts (read at every sign-in, so a test can change them) and a file that
# makes it tamper with the next ID token.
PROVIDER_MJS = r"""
import { readFileSync, rmSync } from 'node:fs';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const readJson = (path) => {
  try {
    const text = readFileSync(path, 'utf8');
    return text.trim() ? JSON.parse(text) : null;
  } catch (error) {
    if (error.code === 'ENOENT') return null;
    throw error;
  }
};

const provider = new Provider(config.issuer, {
  clients: config.clients.map((client) => ({
    grant_types: ['authorization_code'], response_types: ['code'], ...client,
  })),
  jwks: config.jwks,
  async findAccount(ctx, id) {  // the account id is the `sub`
    const account = (readJson(config.accounts_file) ?? {})[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...account }; } };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  conformIdTokenClaims: false,  // the scope's claims in the ID token itself
  pkce: { required: () => true },
  cookies: { keys: ['test-provider-cookie-key'] },
  features: { devInteractions: { enabled: true } },  // a login page (any password), then consent
  ttl: {
    AccessToken: 3600, AuthorizationCode: 60, IdToken: 3600, Interaction: 600, Session: 3600,
    Grant: 3600,
  },
  async renderError(ctx, out) {
    ctx.type = 'text';
    ctx.body = Object.entries(out).map(([key, value]) => `${key}: ${value}`).join('\n');
  },
});

// An unknown login ends the sign-in with access_denied (the provider would fail later on).
const interactionFinished = provider.interactionFinished.bind(provider);
provider.interactionFinished = async (req, res, result, options) => {
  const id = result?.login?.accountId;
  if (id !== undefined && !(readJson(config.accounts_file) ?? {})[id]) {
    const error = { error: 'access_denied', error_description: `no account ${id}` };
    return interactionFinished(req, res, error, { mergeWithLastSubmission: false });
  }
  return interactionFinished(req, res, result, options);
};

// {"claims": {...}, "key": "provider" | "other"} in tamper_file: the next token response's ID
// token gets those claims (null removes one), signed with the provider's key or a forger's under
// its kid. {"drop": true}: no ID token at all.
const signingJwk = config.jwks.keys[0];
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route !== 'token' || ctx.status !== 200 || !ctx.body?.id_token) return;
  const tamper = readJson(config.tamper_file);
  if (!tamper || tamper.garble) return;
  rmSync(config.tamper_file, { force: true });
  if (tamper.drop) {
    delete ctx.body.id_token;
    return;
  }
  const header = jose.decodeProtectedHeader(ctx.body.id_token);
  const payload = { ...jose.decodeJwt(ctx.body.id_token), ...(tamper.claims ?? {}) };
  for (const [name, value] of Object.entries(payload)) if (value === null) delete payload[name];
  const key = tamper.key === 'other'
    ? (await jose.generateKeyPair(header.alg)).privateKey
    : await jose.importJWK(signingJwk, header.alg);
  ctx.body.id_token = await new jose.SignJWT(payload).setProtectedHeader(header).sign(key);
});
// {"garble": "discovery" | "jwks" | "token"} in tamper_file: that route answers a web page once.
provider.use(async (ctx, next) => {
  await next();
  const tamper = readJson(config.tamper_file);
  if (!tamper?.garble || ctx.oidc?.route !== tamper.garble) return;
  rmSync(config.tamper_file, { force: true });
  ctx.status = 200;
  ctx.type = 'html';
  ctx.body = '<p>Down for maintenance</p>';
});
provider.on('server_error', (ctx, error) => console.error('server_error:', error));

const server = provider.listen(config.port, '127.0.0.1');
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
"""


# Git-ignored; .ci/run installs it, or the first test does.
OIDC_PROVIDER_FOLDER = HERE / ".oidc-provider"


FRONTEND = "http://127.0.0.1:5173/signed-in"


def oidc_provider_modules() -> Path:
    """node-oidc-provider from npm, installed once into OIDC_PROVIDER_FOLDER."""
    modules = OIDC_PROVIDER_FOLDER / "node_modules"
    if not (modules / "oidc-provider" / "package.json").exists():
        if shutil.which("npm") is None:
            pytest.skip("no npm on this machine: apt-get install nodejs npm")
        OIDC_PROVIDER_FOLDER.mkdir(exist_ok=True)
        (OIDC_PROVIDER_FOLDER / "package.json").write_text('{"private": true}\n')
        install = [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "oidc-provider@9",
        ]
        subprocess.run(
            install, cwd=OIDC_PROVIDER_FOLDER, check=True, capture_output=True, timeout=300
        )
    return modules


def write_json(path: Path, value) -> None:
    """Whole or not at all: the provider may read the file at any moment."""
    path.with_suffix(".tmp").write_text(json.dumps(value))
    os.replace(path.with_suffix(".tmp"), path)


class Provider:
    """A running node-oidc-provider: its issuer, our confidential client, and hooks for the test."""

    def __init__(self, folder: Path, redirect_uris: list[str], host: str) -> None:
        self.folder, self.port = folder, free_port()
        self.issuer = f"http://{host}:{self.port}"
        self.client_id, self.client_secret = "auth-starter", secrets.token_urlsafe(32)
        self.accounts: dict[str, dict] = {}
        key = RSAKey.generate_key(
            2048, {"kid": secrets.token_hex(8), "use": "sig", "alg": "RS256"}, True
        )
        client = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": redirect_uris,
        }
        config = {
            "port": self.port,
            "issuer": self.issuer,
            "clients": [client],
            "jwks": {"keys": [key.as_dict(private=True)]},
            "accounts_file": str(folder / "accounts.json"),
            "tamper_file": str(folder / "tamper.json"),
        }
        write_json(folder / "config.json", config)
        write_json(folder / "accounts.json", {})
        (folder / "provider.mjs").write_text(PROVIDER_MJS)
        (folder / "node_modules").symlink_to(oidc_provider_modules().resolve())
        self.process = None

    def start(self) -> None:
        with open(self.folder / "provider.log", "a") as log:
            self.process = subprocess.Popen(
                ["node", "provider.mjs", "config.json"], cwd=self.folder, stdout=log, stderr=log
            )
        for _ in range(300):
            try:
                httpx.get(
                    f"{self.issuer}/.well-known/openid-configuration", timeout=1
                ).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError((self.folder / "provider.log").read_text())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def set_account(self, sub: str, email: str, **claims) -> None:
        """An account at the provider: its `sub`, its email, and e.g. email_verified (absent: not
        sent at all)."""
        self.accounts[sub] = {"email": email, **claims}
        write_json(self.folder / "accounts.json", self.accounts)

    def tamper(self, claims: dict | None = None, key: str = "provider", drop: bool = False) -> None:
        write_json(self.folder / "tamper.json", {"claims": claims or {}, "key": key, "drop": drop})

    def garble(self, route: str) -> None:
        """The next answer of one of its routes (discovery, jwks, token) is a web page."""
        write_json(self.folder / "tamper.json", {"garble": route})

    def settings(self, **extra) -> dict:
        return {
            "issuer": self.issuer,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            **extra,
        }


def a_browser() -> httpx.Client:
    """An HTTP client with a browser's cookie jar, which (as Chromium does on localhost) keeps and
    sends Secure cookies over plain http."""
    browser = httpx.Client(timeout=30, event_hooks={"response": [record_status]})
    browser.cookies.jar.set_policy(
        http.cookiejar.DefaultCookiePolicy(secure_protocols=("https", "wss", "http"))
    )
    return browser


def at_the_provider(
    browser: httpx.Client, authorization_url: str, sub: str, deny: bool = False
) -> str:
    """Fill in the provider's login and consent pages, as a person would (or deny): the URL the
    provider redirects the browser back to, not followed. Pages the provider skips (consent given
    before) are not seen."""
    provider = urlsplit(authorization_url).netloc
    response = browser.get(authorization_url)
    for _ in range(10):
        if response.is_redirect:
            location = str(response.url.join(response.headers["location"]))
            if urlsplit(location).netloc != provider:
                return location
            response = browser.get(location)
            continue
        prompt = re.search(r'name="prompt" value="(\w+)"', response.text)
        action = re.search(r'<form[^>]* action="([^"]+)"', response.text)
        assert response.status_code == 200 and prompt and action, response.text
        submit = str(response.url.join(html.unescape(action[1])))
        if deny:
            response = browser.get(submit + "/abort")
        elif prompt[1] == "login":
            response = browser.post(
                submit, data={"prompt": "login", "login": sub, "password": "any"}
            )
        else:
            response = browser.post(submit, data={"prompt": prompt[1]})
    raise AssertionError("the provider kept sending pages")


class OidcSetup:
    def __init__(self, provider: Provider, servers: list[Server]) -> None:
        self.provider, self.servers, self.server = provider, servers, servers[0]

    def start(self, browser: httpx.Client, name: str = "test", server: Server | None = None) -> str:
        """Our /login: the provider's authorization URL it redirects the browser to."""
        response = browser.get(f"{(server or self.server).url}/auth/oidc/{name}/login")
        assert response.status_code == 302, response.text
        return response.headers["location"]

    def sign_in(self, browser: httpx.Client, sub: str, name: str = "test") -> httpx.Response:
        """The whole sign-in as a browser makes it: our /login, the provider's pages, our callback's
        answer."""
        return browser.get(at_the_provider(browser, self.start(browser, name), sub))

    def refresh(self, browser: httpx.Client) -> httpx.Response:
        """What the front end's page does next: POST /auth/refresh with the cookie."""
        return browser.post(f"{self.server.url}/auth/refresh", headers={"Origin": self.server.url})

    def failures_logged(self) -> list[str]:
        return re.findall(r"Sign-in with \w+ failed \((\w+)\)", self.server.log.read_text())


@contextmanager
def oidc_setup(
    tmp_path: Path, database_url: str, count: int = 1, host: str = "127.0.0.1", **env
) -> Iterator[OidcSetup]:
    """A provider and `count` servers of ours, which know it as "test" and as "trusting"
    (trust_email)."""
    ports = [free_port() for _ in range(count)]
    names = ("test", "trusting")
    callbacks = [
        f"http://127.0.0.1:{port}/auth/oidc/{name}/callback" for port in ports for name in names
    ]
    folder = tmp_path / "provider"
    folder.mkdir()
    provider = Provider(folder, callbacks, host)
    provider.start()
    providers = {"test": provider.settings(), "trusting": provider.settings(trust_email=True)}
    environment = {"OIDC_PROVIDERS": json.dumps(providers), "FRONTEND_URL": FRONTEND, **env}
    try:
        with running_servers(tmp_path, database_url, count, ports=ports, **environment) as servers:
            yield OidcSetup(provider, servers)
    finally:
        provider.stop()


@pytest.fixture
def oidc(engine, database_url, tmp_path) -> Iterator[OidcSetup]:
    with oidc_setup(tmp_path, database_url) as setup:
        yield setup


def assert_signed_in(response: httpx.Response) -> str:
    """Our callback's answer after a sign-in: to the front end, with the refresh token cookie a
    browser's password login sets, and no token in any URL. The cookie's value."""
    assert response.status_code == 303, response.text
    assert response.headers["location"] == FRONTEND
    cookie = refresh_cookie(response)
    assert (
        {"httponly", "secure"} <= set(cookie)
        and cookie["samesite"] == "Strict"
        and cookie["path"] == "/"
    )
    return cookie["value"]


def assert_refused(response: httpx.Response, code: str) -> None:
    """A sign-in that failed: back to the front end with ?error=, no cookie, no login."""
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"{FRONTEND}?error={code}"
    assert main.REFRESH_COOKIE not in response.headers.get("set-cookie", "")


def account_of(setup: OidcSetup, browser: httpx.Client) -> dict:
    """The account of the browser's login: refresh with its cookie, then GET /users/me."""
    refreshed = setup.refresh(browser)
    assert refreshed.status_code == 200, refreshed.text
    return me(setup.server, refreshed.json()).json()


def test_oidc_is_off_and_costs_nothing_unless_configured(client):
    assert main.OIDC_PROVIDERS == {}
    for path in ("/auth/oidc/google/login", "/auth/oidc/google/callback?code=x&state=y"):
        response = client.get(path)
        assert response.status_code == 404 and "set-cookie" not in response.headers
    assert not any(middleware.cls is SessionMiddleware for middleware in main.app.user_middleware)


def test_oidc_a_new_user_signs_in_and_has_no_usable_password(oidc, engine):
    oidc.provider.set_account("alice-sub", "Alice@Example.com", email_verified=True)
    with a_browser() as browser:
        start = urlsplit(oidc.start(browser))
        asked = dict(parse_qsl(start.query))
        assert start.netloc == urlsplit(oidc.provider.issuer).netloc
        assert asked["scope"] == "openid email" and asked["code_challenge_method"] == "S256"
        assert asked["state"] and asked["nonce"] and asked["code_challenge"]
        assert asked["redirect_uri"] == f"{oidc.server.url}/auth/oidc/test/callback"
        [flow] = [cookie for cookie in browser.cookies.jar if cookie.name == "__Host-oidc_flow"]
        assert flow.secure and flow.path == "/" and flow.has_nonstandard_attr("httponly")
        assert flow.get_nonstandard_attr("samesite") == "lax"
        assert flow.expires - time.time() <= 600
        callback = at_the_provider(browser, urlunsplit(start), "alice-sub")
        answer = browser.get(callback)
        refresh_token = assert_signed_in(answer)
        assert (
            "code=" not in answer.headers["location"]
            and refresh_token not in answer.headers["location"]
        )
        account = account_of(oidc, browser)
    assert account["email"] == "alice@example.com" and account["is_verified"] is True
    assert [(row.provider, row.subject) for row in rows(engine, main.ProviderAccount)] == [
        ("test", "alice-sub")
    ]
    # None works.
    assert login(oidc.server, "alice@example.com", "any password at all").status_code == 401


def test_oidc_the_same_subject_is_the_same_user_after_its_email_changed(oidc):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "alice-sub"))
        first = account_of(oidc, browser)
    oidc.provider.set_account("alice-sub", "alice@new-employer.example", email_verified=False)
    register(oidc.server, "alice@new-employer.example")  # someone else now has that address here
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "alice-sub"))
        assert account_of(oidc, browser) == first  # found by its subject, never by its email


def test_oidc_a_verified_local_account_is_linked_and_its_password_still_works(oidc, engine):
    tokens = signed_up(oidc.server, "bob@example.com")
    # Bob followed the link we emailed.
    run_sql(engine, 'UPDATE "user" SET is_verified = :yes', yes=True)
    oidc.provider.set_account("bob-sub", "bob@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "bob-sub"))
        assert account_of(oidc, browser)["id"] == me(oidc.server, tokens).json()["id"]
    assert login(oidc.server, "bob@example.com").status_code == 200
    assert me(oidc.server, tokens).status_code == 200  # and the logins he had go on


def test_oidc_pre_account_takeover_the_squatters_password_and_logins_end(oidc, engine):
    """Mallory registered carol's address before carol came: she never proved it. When carol signs
    in with a provider that verified it, mallory's password and logins end, and the account is
    carol's, verified."""
    squatter = signed_up(oidc.server, "carol@example.com")
    oidc.provider.set_account("carol-sub", "carol@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "carol-sub"))
        account = account_of(oidc, browser)
    assert account["id"] == 1 and account["is_verified"] is True
    # The squatter's password is gone.
    assert login(oidc.server, "carol@example.com").status_code == 401
    assert_bearer_401(me(oidc.server, squatter))
    assert_bearer_401(refresh(oidc.server, squatter["refresh_token"]))


@pytest.mark.parametrize(
    ("name", "claims", "outcome"),
    [
        ("test", {"email_verified": False}, "email_not_verified"),
        ("test", {}, "email_not_verified"),  # a provider that never says (Microsoft's)
        ("trusting", {}, None),  # unless the operator trusts its emails
        ("trusting", {"email_verified": False}, None),
    ],
)
def test_oidc_a_first_sign_in_needs_an_email_the_provider_verified(
    oidc, engine, name, claims, outcome
):
    oidc.provider.set_account("dave-sub", "dave@example.com", **claims)
    with a_browser() as browser:
        answer = oidc.sign_in(browser, "dave-sub", name)
    if outcome is None:
        assert_signed_in(answer)
        assert [user.email for user in rows(engine, main.User)] == ["dave@example.com"]
    else:
        assert_refused(answer, outcome)
        assert rows(engine, main.User) == [] and rows(engine, main.Login) == []
        assert oidc.failures_logged() == [outcome]


def test_oidc_a_recycled_address_takes_over_nothing(oidc, engine):
    """erin@ left the company that runs the provider; a newcomer got her address, and a new
    subject."""
    oidc.provider.set_account("erin-sub", "erin@example.com", email_verified=True)
    oidc.provider.set_account("newcomer-sub", "erin@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "erin-sub"))
    with a_browser() as browser:
        assert_refused(oidc.sign_in(browser, "newcomer-sub"), "email_linked_to_another_account")
    assert [row.subject for row in rows(engine, main.ProviderAccount)] == ["erin-sub"]
    assert len(rows(engine, main.Login)) == 1


def test_oidc_login_csrf_a_callback_opened_in_another_browser_logs_nobody_in(oidc, engine):
    """The attacker starts a sign-in with their own account and sends the victim the callback
    URL."""
    oidc.provider.set_account("attacker-sub", "attacker@example.com", email_verified=True)
    with a_browser() as attacker, a_browser() as victim:
        callback = at_the_provider(attacker, oidc.start(attacker), "attacker-sub")
        assert_refused(victim.get(callback), "sign_in_failed")
        assert rows(engine, main.Login) == []
        assert_signed_in(attacker.get(callback))  # in the browser that started it, it works


def test_oidc_a_callback_works_once(oidc, engine):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        callback = at_the_provider(browser, oidc.start(browser), "alice-sub")
        flow_cookie = {"Cookie": f"__Host-oidc_flow={browser.cookies['__Host-oidc_flow']}"}
        assert_signed_in(browser.get(callback))
        # Used up: the browser is told to forget it.
        assert "__Host-oidc_flow" not in browser.cookies
        assert_refused(browser.get(callback), "sign_in_failed")
    with a_browser() as replay:  # even with the flow's cookie, captured before it was used
        assert_refused(replay.get(callback, headers=flow_cookie), "sign_in_failed")
    assert len(rows(engine, main.Login)) == 1


def test_oidc_a_tampered_state_a_provider_error_or_a_missing_code_is_refused(oidc, engine):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        callback = urlsplit(at_the_provider(browser, oidc.start(browser), "alice-sub"))
        query = dict(parse_qsl(callback.query))
        for changed in ({"state": query["state"] + "x"}, {"code": None}, {"state": None}):
            forged = {key: value for key, value in (query | changed).items() if value is not None}
            assert_refused(
                browser.get(urlunsplit(callback._replace(query=urlencode(forged)))),
                "sign_in_failed",
            )
    with a_browser() as browser:  # the user declines at the provider
        back = at_the_provider(browser, oidc.start(browser), "alice-sub", deny=True)
        assert "error=access_denied" in back
        assert_refused(browser.get(back), "sign_in_failed")
    assert rows(engine, main.Login) == [] and rows(engine, main.User) == []
    assert oidc.failures_logged() == ["sign_in_failed"] * 4
    assert "Traceback" not in oidc.server.log.read_text()


@pytest.mark.parametrize(
    ("claims", "key"),
    [
        ({}, "other"),  # forged: signed with a key that isn't the provider's
        ({"aud": "another-client"}, "provider"),  # issued to another client
        ({"aud": "another-client", "azp": "auth-starter"}, "provider"),
        ({"nonce": "from-another-sign-in"}, "provider"),
        ({"iss": "http://127.0.0.1:1"}, "provider"),
        ({"exp": 1000}, "provider"),  # long expired
        ({"sub": None}, "provider"),
        ({"sub": "nul\u0000byte"}, "provider"),  # PostgreSQL can't store a NUL
        ({"email": "not an email"}, "provider"),
        (None, "drop"),  # no ID token at all
    ],
)
def test_oidc_a_forged_or_mismatched_id_token_is_refused(oidc, engine, claims, key):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    if key == "drop":
        oidc.provider.tamper(drop=True)
    else:
        oidc.provider.tamper(claims, key)
    with a_browser() as browser:
        assert_refused(oidc.sign_in(browser, "alice-sub"), "sign_in_failed")
    assert rows(engine, main.User) == [] and not (oidc.provider.folder / "tamper.json").exists()


def test_oidc_a_deactivated_account_cannot_sign_in(oidc, engine):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "alice-sub"))
    run_sql(engine, 'UPDATE "user" SET is_active = :no', no=False)
    with a_browser() as browser:
        assert_refused(oidc.sign_in(browser, "alice-sub"), "account_deactivated")
    register(oidc.server, "frank@example.com")
    run_sql(
        engine,
        "UPDATE \"user\" SET is_active = :no, is_verified = :yes WHERE email = 'frank@example.com'",
        no=False,
        yes=True,
    )
    oidc.provider.set_account("frank-sub", "frank@example.com", email_verified=True)
    with a_browser() as browser:
        assert_refused(oidc.sign_in(browser, "frank-sub"), "account_deactivated")
    assert [row.subject for row in rows(engine, main.ProviderAccount)] == [
        "alice-sub"
    ]  # frank's was not linked


def test_oidc_an_account_with_no_password_gets_the_same_401_in_the_same_time(oidc):
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "alice-sub"))
    register(oidc.server, "bob@example.com")
    no_password, wrong_password = [], []
    # Interleaved, each from an address of its own (throttling counts per address).
    for n in range(9):
        for address, times in (
            ("alice@example.com", no_password),
            ("bob@example.com", wrong_password),
        ):
            started = time.perf_counter()
            answer = login(
                oidc.server.from_address(f"127.0.{n + 1}.{len(times) + 1}"), address, "a guess!"
            )
            times.append(time.perf_counter() - started)
            assert (
                answer.status_code == 401
                and answer.json()["detail"] == "Incorrect email or password"
            )
    assert 0.7 <= statistics.median(no_password) / statistics.median(wrong_password) <= 1.3


def test_oidc_an_account_with_no_password_can_set_one_by_email(oidc):  # ch. 6
    oidc.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
    with a_browser() as browser:
        assert_signed_in(oidc.sign_in(browser, "alice-sub"))
    assert forgot(oidc.server, "alice@example.com").status_code == 202
    time.sleep(0.5)  # the email goes after the answer, to the log (no SMTP_HOST)
    [token] = re.findall(r"reset-password\?token=(\S+)", oidc.server.log.read_text())
    assert reset(oidc.server, token, "alice's own password").status_code == 204
    assert login(oidc.server, "alice@example.com", "alice's own password").status_code == 200


def test_oidc_a_sign_in_started_on_one_instance_finishes_on_another(engine, database_url, tmp_path):
    with oidc_setup(tmp_path, database_url, count=2) as setup:
        a, b = setup.servers
        setup.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
        with a_browser() as browser:
            callback = at_the_provider(browser, setup.start(browser, server=a), "alice-sub")
            assert_signed_in(browser.get(callback.replace(a.url, b.url)))
            assert account_of(setup, browser)["email"] == "alice@example.com"


def test_oidc_a_provider_that_is_down_gets_an_error_not_a_500(engine, database_url, tmp_path):
    with oidc_setup(tmp_path, database_url) as setup:
        setup.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
        with a_browser() as browser:
            callback = at_the_provider(browser, setup.start(browser), "alice-sub")
            setup.provider.stop()
            # Its token endpoint is down.
            assert_refused(browser.get(callback), "provider_unavailable")
        with a_browser() as browser:
            # Its discovery is down.
            answer = browser.get(f"{setup.servers[0].url}/auth/oidc/trusting/login")
            assert_refused(answer, "provider_unavailable")
        assert setup.failures_logged() == ["provider_unavailable"] * 2


def test_oidc_a_provider_answering_a_web_page_gets_an_error_not_a_500(
    engine, database_url, tmp_path
):
    with oidc_setup(tmp_path, database_url) as setup:
        setup.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
        with a_browser() as browser:
            setup.provider.garble("discovery")
            answer = browser.get(f"{setup.server.url}/auth/oidc/test/login")
            assert_refused(answer, "provider_unavailable")
            for route in ("jwks", "token"):
                callback = at_the_provider(browser, setup.start(browser), "alice-sub")
                setup.provider.garble(route)
                assert_refused(browser.get(callback), "sign_in_failed")
            assert_signed_in(setup.sign_in(browser, "alice-sub"))  # once it is itself again
        assert setup.failures_logged() == ["provider_unavailable"] + ["sign_in_failed"] * 2
        assert "Traceback" not in setup.server.log.read_text()


def test_oidc_a_failure_is_logged_on_one_line_whatever_the_provider_says(oidc):
    forged = "x\nWARNING:  Sign-in with test failed (forged): a line of the attacker's"
    with a_browser() as browser:
        state = dict(parse_qsl(urlsplit(oidc.start(browser)).query))["state"]
        query = urlencode({"state": state, "error": "access_denied", "error_description": forged})
        assert_refused(
            browser.get(f"{oidc.server.url}/auth/oidc/test/callback?{query}"), "sign_in_failed"
        )
    lines = [line for line in oidc.server.log.read_text().splitlines() if "Sign-in with" in line]
    assert len(lines) == 1 and "(sign_in_failed)" in lines[0], lines


def test_oidc_an_unknown_provider_is_404(oidc):
    with a_browser() as browser:
        for path in ("login", "callback?code=x&state=y"):
            response = browser.get(f"{oidc.server.url}/auth/oidc/nobody/{path}")
            assert response.status_code == 404 and "set-cookie" not in response.headers


SIGN_IN_PAGE = """<!doctype html><title>front end</title>
<a id="sign-in" href="{api}/auth/oidc/test/login">Sign in with the provider</a>
<pre id="who"></pre>
<script>
  const refreshing = fetch("{api}/auth/refresh", {{method: "POST", credentials: "include"}});
  refreshing.then(async (refreshed) => {{
    if (!refreshed.ok) {{ document.getElementById("who").textContent = "signed out"; return; }}
    const {{access_token}} = await refreshed.json();
    const signedIn = {{Authorization: `Bearer ${{access_token}}`}};
    const me = await fetch("{api}/users/me", {{headers: signedIn}});
    document.getElementById("who").textContent = (await me.json()).email;
  }});
</script>"""


def test_oidc_in_a_real_browser_a_front_end_signs_in_and_stays_signed_in(
    chromium, engine, database_url, tmp_path
):
    """A front end on another origin links to the sign-in; the provider (on another site) shows its
    login and consent pages; the browser lands back on the front end, signed in, and stays signed in
    after a reload."""

    class SignInPage(PageHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(SIGN_IN_PAGE.format(api=api).encode())

    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SignInPage)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    front_end = f"http://127.0.0.1:{pages.server_port}"
    try:
        with oidc_setup(
            tmp_path,
            database_url,
            host="localhost",
            CORS_ORIGINS=front_end,
            FRONTEND_URL=front_end + "/",
        ) as setup:
            api = setup.server.url
            setup.provider.set_account("alice-sub", "alice@example.com", email_verified=True)
            context = chromium.new_context()
            # the provider's pages ask for a web font: keep the browser on this machine
            context.route(
                re.compile(r"^https?://(?!127\.0\.0\.1[:/]|localhost[:/])"),
                lambda route: route.abort(),
            )
            page = context.new_page()
            page.goto(front_end + "/")
            assert page.wait_for_selector("#who:has-text('signed out')")
            page.click("#sign-in")
            page.wait_for_url(f"{setup.provider.issuer}/interaction/**")
            page.fill("input[name=login]", "alice-sub")
            page.fill("input[name=password]", "anything")
            page.click("button[type=submit]")
            page.wait_for_selector("input[name=prompt][value=consent]", state="attached")
            page.click("button[type=submit]")
            page.wait_for_url(front_end + "/")
            assert page.wait_for_selector("#who:has-text('alice@example.com')")
            page.reload()
            assert page.wait_for_selector("#who:has-text('alice@example.com')")
            names = [cookie["name"] for cookie in context.cookies(api)]
            assert names == [main.REFRESH_COOKIE], names  # the flow's cookie is gone, used up
            context.close()
    finally:
        pages.shutdown()
        pages.server_close()


# === 8. Admin: scopes by role, routes to manage users, and `python main.py make-admin EMAIL`


def make_admin_in_db(engine, email: str) -> None:
    run_sql(engine, "UPDATE \"user\" SET role = 'admin' WHERE email = :email", email=email)


def admin_and_user(client, engine) -> tuple[dict, dict]:
    """An admin (logged in after promotion) and a plain user: their token responses."""
    signed_up(client, "admin@example.com")
    make_admin_in_db(engine, "admin@example.com")
    admin = login(client, "admin@example.com").json()
    user = signed_up(client, "user@example.com")
    return admin, user


def test_the_refresh_grant_can_narrow_the_scope_but_never_widen_it(client, engine):  # ch. 3
    admin, user = admin_and_user(client, engine)

    def grant(tokens: dict, scope: str) -> dict:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "scope": scope,
        }
        return client.post("/auth/login", data=form).json()

    narrowed = grant(admin, "me")
    assert narrowed["scope"] == "me" and access_claims(narrowed)["scope"] == "me"
    assert set(grant(narrowed, "me admin")["scope"].split()) == {
        "me",
        "admin",
    }  # the login's grant still holds
    assert grant(user, "me admin")["scope"] == "me"


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
    assert client.get("/users", headers=bearer(only_admin["access_token"])).status_code == 403
    # ch. 3: refreshing doesn't widen it
    assert refresh(client, only_admin["refresh_token"]).json()["scope"] == ""


def test_a_narrower_scope_can_be_requested_and_refresh_keeps_it(client, engine):  # ch. 3
    admin_and_user(client, engine)
    narrow = login(client, "admin@example.com", scope="me").json()
    assert narrow["scope"] == "me"
    refreshed = refresh(client, narrow["refresh_token"]).json()
    assert refreshed["scope"] == "me"
    response = client.get("/users", headers=bearer(refreshed["access_token"]))
    assert response.status_code == 403
    assert (
        response.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="admin"'
    )


def test_users_me_needs_the_me_scope(client, engine):
    signed_up(client)
    token = login(client, scope="admin").json()["access_token"]  # granted nothing
    response = client.get("/users/me", headers=bearer(token))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="me"'


def test_admin_routes_refuse_users_and_anonymous(client, engine):
    _, user = admin_and_user(client, engine)
    assert client.get("/users", headers=bearer(user["access_token"])).status_code == 403
    assert (
        client.patch(
            "/users/1", json={"is_active": False}, headers=bearer(user["access_token"])
        ).status_code
        == 403
    )
    assert client.delete("/users/1", headers=bearer(user["access_token"])).status_code == 403
    assert_bearer_401(client.get("/users"))


def test_demotion_takes_effect_on_an_existing_token(client, engine):
    admin, _ = admin_and_user(client, engine)
    assert client.get("/users", headers=bearer(admin["access_token"])).status_code == 200
    run_sql(engine, "UPDATE \"user\" SET role = 'user' WHERE email = 'admin@example.com'")
    assert client.get("/users", headers=bearer(admin["access_token"])).status_code == 403
    assert me(client, admin).status_code == 200


def test_refresh_after_demotion_no_longer_grants_admin(client, engine):  # ch. 3
    admin, _ = admin_and_user(client, engine)
    run_sql(engine, "UPDATE \"user\" SET role = 'user' WHERE email = 'admin@example.com'")
    refreshed = refresh(client, admin["refresh_token"]).json()
    assert refreshed["scope"] == "me"
    # Another service trusting the token's scopes is safe too.
    assert access_claims(refreshed)["scope"] == "me"
    run_sql(engine, "UPDATE \"user\" SET role = 'admin' WHERE email = 'admin@example.com'")
    assert set(refresh(client, refreshed["refresh_token"]).json()["scope"].split()) == {
        "me",
        "admin",
    }


def test_promotion_needs_a_new_login(client, engine):
    user = signed_up(client)
    make_admin_in_db(engine, "ann@example.com")
    assert client.get("/users", headers=bearer(user["access_token"])).status_code == 403
    assert (
        client.get("/users", headers=bearer(login(client).json()["access_token"])).status_code
        == 200
    )


def test_admin_lists_users_a_page_at_a_time(client, engine):
    admin, _ = admin_and_user(client, engine)
    for n in range(3):
        register(client, f"extra{n}@example.com")
    headers = bearer(admin["access_token"])
    everyone = client.get("/users", headers=headers).json()
    assert [u["email"] for u in everyone] == ["admin@example.com", "user@example.com"] + [
        f"extra{n}@example.com" for n in range(3)
    ]
    assert set(everyone[0]) == {"id", "email", "is_active", "is_verified", "role"}
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
    user_id = me(client, user).json()["id"]
    response = client.patch(
        f"/users/{user_id}", json={"is_active": False}, headers=bearer(admin["access_token"])
    )
    assert response.status_code == 200 and response.json()["is_active"] is False
    assert_bearer_401(me(client, user))
    assert_bearer_401(refresh(client, user["refresh_token"]))  # ch. 3
    assert login(client, "user@example.com").status_code == 403
    response = client.patch(
        f"/users/{user_id}", json={"is_active": True}, headers=bearer(admin["access_token"])
    )
    assert response.status_code == 200 and response.json()["is_active"] is True
    assert login(client, "user@example.com").status_code == 200
    # ch. 3: the logins ended on deactivation stay ended
    assert_bearer_401(refresh(client, user["refresh_token"]))
    assert_bearer_401(me(client, user))


def test_deactivation_revokes_refresh_sessions_in_the_database(client, engine):
    admin, _ = admin_and_user(client, engine)
    client.patch("/users/2", json={"is_active": False}, headers=bearer(admin["access_token"]))
    assert [row.revoked for row in rows(engine, main.Login) if row.user_id == 2] == [True]


def test_admin_changes_a_role(client, engine):
    admin, _ = admin_and_user(client, engine)
    response = client.patch(
        "/users/2", json={"role": "admin"}, headers=bearer(admin["access_token"])
    )
    assert response.status_code == 200 and response.json()["role"] == "admin"
    assert "admin" in login(client, "user@example.com").json()["scope"].split()


@pytest.mark.parametrize(
    "body",
    [
        {"is_active": "maybe"},
        {"role": "superuser"},
        {"is_admin": True},
        {"email": "x@y.com"},
        {"is_verified": True},
    ],
)
def test_admin_update_rejects_bad_fields(client, engine, body):
    admin, _ = admin_and_user(client, engine)
    assert (
        client.patch("/users/2", json=body, headers=bearer(admin["access_token"])).status_code
        == 422
    )


def test_admin_update_ignores_nulls(client, engine):
    admin, _ = admin_and_user(client, engine)
    response = client.patch(
        "/users/2", json={"is_active": None, "role": None}, headers=bearer(admin["access_token"])
    )
    assert response.status_code == 200
    assert response.json()["is_active"] is True and response.json()["role"] == "user"


@pytest.mark.parametrize(
    "user_id", ["999", "0", "-1", str(2**31), str(2**63), "99999999999999999999999"]
)
def test_admin_routes_404_for_unknown_users(client, engine, user_id):
    admin, _ = admin_and_user(client, engine)
    headers = bearer(admin["access_token"])
    assert (
        client.patch(f"/users/{user_id}", json={"is_active": False}, headers=headers).status_code
        == 404
    )
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
    assert_bearer_401(me(client, user))
    assert_bearer_401(refresh(client, user["refresh_token"]))  # ch. 3
    assert register(client, "user@example.com").status_code == 201  # the email is free again


def test_ids_are_never_reused_so_a_deleted_users_token_cant_sign_in_as_a_newcomer(client, engine):
    admin, user = admin_and_user(client, engine)
    user_id = me(client, user).json()["id"]
    assert (
        client.delete(f"/users/{user_id}", headers=bearer(admin["access_token"])).status_code == 204
    )
    newcomer = signed_up(client, "newcomer@example.com")
    assert me(client, newcomer).json()["id"] > user_id
    assert_bearer_401(me(client, user))


def test_load_a_hundred_admins_paging_the_user_list(server, engine):
    signed_up(server)
    make_admin_in_db(engine, "ann@example.com")
    admin = login(server).json()

    def page(http: httpx.Client) -> httpx.Response:
        return http.get(server.url + "/users?limit=5", headers=bearer(admin["access_token"]))

    results = hammer([("users", 0, page)] * 100)
    assert_never_wedged(results)
    assert {status for _, status, _ in results} == {200}


def run_main(*args: str, cwd: Path = HERE, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


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


def admin_calls(server: Server, engine) -> list:
    """Admins paging the user list, for chapter 1's mixed load."""
    signed_up(server, "admin@example.com")
    make_admin_in_db(engine, "admin@example.com")
    as_admin = bearer(login(server, "admin@example.com").json()["access_token"])
    return [("users", lambda http: http.get(server.url + "/users?limit=5", headers=as_admin))] * 15


def test_admin_routes_give_their_connection_back_before_answering(client, engine):
    admin, _ = admin_and_user(client, engine)
    as_admin = bearer(admin["access_token"])
    assert_connections_given_back(
        lambda watched: [
            watched.get("/users", headers=as_admin),
            watched.patch("/users/999", json={"role": "admin"}, headers=as_admin),
            watched.delete("/users/1", headers=as_admin),
        ],
        [200, 404, 400],
    )


# === 2. What no deployment should lose (keep): a kept key, stronger hashes, outages


def test_a_short_secret_key_stops_startup_naming_it(app_copy):
    result = start_main(app_copy, SECRET_KEY="x" * 31)
    assert result.returncode != 0
    assert "SECRET_KEY must be at least 32 bytes" in result.stderr


def test_a_secret_key_from_a_dotenv_file_is_used(app_copy):
    (app_copy / ".env").write_text("SECRET_KEY=" + "k" * 40 + "\n")
    result = start_main(app_copy)
    assert result.stdout.strip() == "k" * 40
    assert not (app_copy / ".secret_key").exists()


def test_without_secret_key_one_is_generated_once_kept_private_and_reused(app_copy):
    keys = []
    for _ in range(2):  # two starts
        result = start_main(app_copy)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("SECRET_KEY is not set") == 1
        keys.append(result.stdout.strip())
    key_file = app_copy / ".secret_key"
    assert keys[0] == keys[1] == key_file.read_text().strip()
    assert len(keys[0]) >= 64
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in app_copy.iterdir() if p.name.startswith(".secret_key")] == [
        ".secret_key"
    ]


def test_without_secret_key_and_nowhere_to_save_one_startup_says_to_set_it(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main.load_or_create_secret_key(tmp_path / "missing-folder" / ".secret_key")
    assert "set SECRET_KEY" in str(stopped.value)


def test_processes_starting_together_agree_on_one_generated_key(app_copy):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # eight processes starting at once
        keys = {
            result.stdout.strip() for result in pool.map(lambda _: start_main(app_copy), range(8))
        }
    assert len(keys) == 1 and keys != {""}


def test_secret_files_are_git_ignored():
    ignored = (HERE / ".gitignore").read_text().split()
    assert {".secret_key", ".env", "*.db"} <= set(ignored)
    assert "SECRET_KEY=" not in (HERE / ".env.example").read_text().replace("# SECRET_KEY=", "")


@pytest.mark.parametrize(
    ("variant", "memory_mib", "passes", "upgraded"),
    [
        (Type.ID, 8, 1, True),  # weaker on both counts
        (Type.ID, 19, 2, True),  # OWASP's memory, one pass fewer than ours
        (Type.ID, 64, 3, False),  # argon2-cffi's default, stronger than ours: kept
        (Type.ID, 8, 12, True),  # less memory, however many passes: memory is what GPUs lack
        (Type.ID, 64, 1, False),  # more memory, fewer passes: 64 * 1 > 19 * 3, kept
        (Type.ID, 46, 1, True),  # one of OWASP's minimum settings, weaker than ours: upgraded
        (
            Type.I,
            19,
            3,
            True,
        ),  # our settings, but argon2i: weaker against side channels, so argon2id
        (Type.I, 64, 3, True),  # argon2i with more memory still becomes argon2id
    ],
)
def test_login_rehashes_a_stored_hash_only_when_it_is_weaker_than_ours(
    client, engine, variant, memory_mib, passes, upgraded
):
    register(client)
    stored = PasswordHasher(
        memory_cost=memory_mib * 1024, time_cost=passes, parallelism=1, type=variant
    )
    stored = stored.hash(PASSWORD)
    run_sql(engine, 'UPDATE "user" SET hashed_password = :stored', stored=stored)
    assert login(client).status_code == 200
    now_stored = rows(engine, main.User)[0].hashed_password
    assert (now_stored != stored) is upgraded
    if upgraded:
        assert now_stored.startswith("$argon2id$") and "m=19456,t=3,p=1" in now_stored
    assert login(client).status_code == 200  # the stored hash, old or new, matches the password


def test_an_upgrade_never_writes_back_a_password_changed_while_it_was_checked(
    client, engine, monkeypatch
):
    register(client)
    weak = PasswordHasher(memory_cost=8 * 1024, time_cost=1, parallelism=1).hash(PASSWORD)
    run_sql(engine, 'UPDATE "user" SET hashed_password = :weak', weak=weak)
    new = main.hash_password("the new password")
    check = main.verify_password

    def check_while_it_changes(password: str, hashed_password: str) -> bool:
        set_password_elsewhere(engine, new)
        return check(password, hashed_password)

    monkeypatch.setattr(main, "verify_password", check_while_it_changes)
    assert_bearer_401(login(client))
    assert rows(engine, main.User)[0].hashed_password == new


def test_a_login_whose_hash_another_login_upgraded_meanwhile_still_logs_in(
    client, engine, monkeypatch
):
    """An upgrade is the same password: only set_password moves what a login checks."""
    register(client)
    weak = PasswordHasher(memory_cost=8 * 1024, time_cost=1, parallelism=1).hash(PASSWORD)
    run_sql(engine, 'UPDATE "user" SET hashed_password = :weak', weak=weak)
    upgraded = main.hash_password(PASSWORD)
    check = main.verify_password

    def check_while_another_login_upgrades(password: str, hashed_password: str) -> bool:
        run_sql(engine, 'UPDATE "user" SET hashed_password = :upgraded', upgraded=upgraded)
        return check(password, hashed_password)

    monkeypatch.setattr(main, "verify_password", check_while_another_login_upgrades)
    assert login(client).status_code == 200
    monkeypatch.setattr(main, "verify_password", check)
    assert login(client).status_code == 200


def test_logins_at_once_to_an_account_with_an_old_hash_all_succeed(server, engine):
    register(server)
    weak = PasswordHasher(memory_cost=8 * 1024, time_cost=1, parallelism=1).hash(PASSWORD)
    run_sql(engine, 'UPDATE "user" SET hashed_password = :weak', weak=weak)
    answers = in_parallel([lambda: login(server) for _ in range(4)])
    assert [answer.status_code for answer in answers] == [200] * 4
    assert rows(engine, main.User)[0].hashed_password.startswith("$argon2id$v=19$m=19456,t=3")


def test_making_the_tables_later_retries_an_outage_and_stops_at_a_bug(monkeypatch):
    """A bug (here PostgreSQL's "permission denied") ends the wait: from then on it is a 500 with
    its traceback, not a 503 for ever."""
    attempts = []

    def create_tables() -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("no server"))
        raise ProgrammingError("CREATE TABLE", {}, PermissionError("permission denied"))

    monkeypatch.setattr(main, "create_tables", create_tables)
    ended = []

    def wait_for_the_tables() -> None:
        try:
            main.make_tables_when_back()
        except SQLAlchemyError as error:
            ended.append(error)

    waiting = threading.Thread(target=wait_for_the_tables, daemon=True)
    waiting.start()
    waiting.join(10)
    assert len(attempts) == 2 and [type(error) for error in ended] == [ProgrammingError]


def test_validation_errors_never_echo_the_password(client):
    response = register(client, password="secret7")
    assert response.status_code == 422
    assert "secret7" not in response.text


def every_database_route(client, tokens: dict) -> dict[str, httpx.Response]:
    """One request to each route that needs the database, as a signed-in user would make it."""
    signed_in = bearer(tokens["access_token"])
    refresh_token = tokens["refresh_token"]  # ch. 3
    answers = {"register": register(client, "bob@example.com"), "login": login(client)}
    answers["me"] = client.get("/users/me", headers=signed_in)
    answers["refresh"] = refresh(client, refresh_token)  # ch. 3
    grant = {"grant_type": "refresh_token", "refresh_token": refresh_token}  # ch. 3
    answers["refresh grant"] = client.post("/auth/login", data=grant)  # ch. 3
    answers["logout"] = client.post("/auth/logout", json={"refresh_token": refresh_token})  # ch. 3
    answers["sessions"] = client.get("/auth/sessions", headers=signed_in)  # ch. 4
    answers["end one"] = client.delete("/auth/sessions/some-id", headers=signed_in)  # ch. 4
    answers["end all"] = client.delete("/auth/sessions", headers=signed_in)  # ch. 4
    answers["change password"] = change_password(client, tokens)  # ch. 4
    answers["delete account"] = delete_account(client, tokens)  # ch. 4
    answers["reset"] = reset(client, "a-token-from-an-email")  # ch. 6
    answers["verify"] = client.post("/auth/verify-email", json={"token": "a-token"})  # ch. 6
    answers["users"] = client.get("/users", headers=signed_in)  # ch. 8
    # ch. 8
    answers["update user"] = client.patch("/users/2", json={"role": "user"}, headers=signed_in)
    answers["delete user"] = client.delete("/users/2", headers=signed_in)  # ch. 8
    return answers


def assert_database_unavailable(answers: dict[str, httpx.Response]) -> None:
    for route, response in answers.items():
        assert response.status_code == 503, (route, response.text)
        assert response.headers["retry-after"] == str(main.DATABASE_RETRY_SECONDS)
        assert response.json()["detail"] and response.json()["error"] == "temporarily_unavailable"


@pytest.fixture
def use_engine(monkeypatch) -> Iterator[Callable]:
    """Makes main use another engine for the rest of the test; it is disposed of after."""
    engines = []

    def use(engine):
        engines.append(engine)
        monkeypatch.setattr(main, "engine", engine)

    yield use
    for engine in engines:
        engine.dispose()


def unreachable_database_url(database_url: str, tmp_path: Path) -> str:
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'no-such-folder' / 'app.db'}"  # can't be opened
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"  # nothing listens there


def test_an_unreachable_database_gets_503_and_retry_after_never_500(
    client, database_url, tmp_path, use_engine, caplog
):
    tokens = signed_up(client)
    use_engine(main.create_db_engine(unreachable_database_url(database_url, tmp_path)))
    answers = every_database_route(client, tokens)
    assert_database_unavailable(answers)
    assert client.get("/").status_code == 200  # what needs no database still answers
    failures = [
        record for record in caplog.records if record.message.startswith("Database unavailable")
    ]
    assert len(failures) == len(answers)  # one line per failure
    # No traceback, nothing but that line.
    assert all(record.exc_info is None and "\n" not in record.message for record in failures)
    # ch. 6: forgot-password's work comes after the answer: a log line, not a failed request
    assert forgot(client).status_code == 202 and "(no reset email sent)" in caplog.text


def test_a_postgresql_server_that_never_answers_gets_503_after_ten_seconds(use_engine):
    """A server that accepts the connection and then says nothing (a hung host, a black hole) is
    unavailable too."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        use_engine(
            main.create_db_engine(
                f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
            )
        )
        with contextlib.closing(
            test_client()
        ) as client:  # not started: its start-up would wait for the database too
            started = time.perf_counter()
            assert_database_unavailable({"login": login(client)})
            assert 9 <= time.perf_counter() - started < 20


def test_a_locked_sqlite_database_gets_503(client, tmp_path, use_engine):
    """Busy: another process holds SQLite's write lock longer than a request waits for it."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    use_engine(create_engine(url, connect_args={"check_same_thread": False, "timeout": 0.1}))
    main.create_tables()
    with contextlib.closing(sqlite3.connect(tmp_path / "locked.db")) as holder:
        holder.execute("BEGIN EXCLUSIVE")
        response = register(client)
        holder.rollback()
    assert response.status_code == 503 and response.headers["retry-after"]
    assert register(client).status_code == 201  # the lock is gone


def test_no_free_pooled_connection_gets_503(client, database_url, use_engine):
    """Busy: every pooled connection stays checked out longer than a request waits for one."""
    tokens = signed_up(client)
    use_engine(create_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=0.1))
    with main.engine.connect():
        response = me(client, tokens)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert me(client, tokens).status_code == 200


def test_an_outage_is_told_from_a_bug_by_the_errors_code(engine, database_url, tmp_path):
    """Only what a retry may cure is an outage (503); a bad statement is a bug (500), whatever its
    Python class."""
    unreachable = main.create_db_engine(unreachable_database_url(database_url, tmp_path))

    def error_of(*statements: str, on=engine) -> SQLAlchemyError:
        with pytest.raises(SQLAlchemyError) as caught, on.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
        return caught.value

    bugs = [error_of('SELECT no_such_column FROM "user"')]
    outages = [error_of("SELECT 1", on=unreachable)]
    if engine.dialect.name == "postgresql":
        # An index row too big (SQLSTATE 54000) comes as an OperationalError, as outages do.
        too_big = f"INSERT INTO t VALUES ('{secrets.token_urlsafe(6000)}')"
        bugs.append(error_of("CREATE TEMP TABLE t (v TEXT PRIMARY KEY)", too_big))
        assert isinstance(bugs[-1], OperationalError) and bugs[-1].orig.sqlstate == "54000"
        # Cancelled: 57014.
        outages.append(error_of("SET statement_timeout = 1", "SELECT pg_sleep(1)"))
    unreachable.dispose()
    assert [main.is_database_unavailable(error) for error in bugs] == [False] * len(bugs)
    assert [main.is_database_unavailable(error) for error in outages] == [True] * len(outages)


@pytest.fixture
def earlier_database(engine) -> None:
    """A database made by an earlier version, whose login table lacks a column this one has."""
    SQLModel.metadata.create_all(engine, tables=[main.User.__table__])
    run_sql(
        engine,
        "CREATE TABLE login (id VARCHAR NOT NULL PRIMARY KEY, user_id INTEGER NOT NULL "
        'REFERENCES "user" (id) ON DELETE CASCADE, scopes VARCHAR NOT NULL, '
        "user_agent VARCHAR NOT NULL, created_at FLOAT NOT NULL, "
        "expires_at FLOAT NOT NULL, revoked BOOLEAN NOT NULL)",
    )


def test_a_schema_error_is_a_500_not_an_outage(earlier_database, caplog):
    """A column missing after an upgrade is a bug to fix (a migration), not a database to wait
    for."""
    with TestClient(main.app, raise_server_exceptions=False) as client:
        assert register(client).status_code == 201  # what the upgrade didn't change works
        assert login(client).status_code == 500
    assert "Database unavailable" not in caplog.text


class PrivatePostgres:
    """A PostgreSQL server of the tests' own, from this machine's binaries, that a test may stop and
    restart."""

    def __init__(self, binaries: Path) -> None:
        self.binaries, self.port = binaries, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="auth-starter-postgres-"))
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        # It won't run as root.
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
        self.run("initdb", "-D", "data", "-A", "trust", "-U", "postgres", "--no-sync")

    def run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.binaries / program), *args],
            cwd=self.root,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run("pg_ctl", "-D", "data", "-l", "postgres.log", "-o", options, "-w", "start")

    def stop(self) -> None:  # as an operator stops it: every connection is cut
        self.run("pg_ctl", "-D", "data", "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg_ctl = shutil.which("pg_ctl") or max(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), default=None
    )
    if pg_ctl is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    database = PrivatePostgres(Path(pg_ctl).resolve().parent)
    database.start()
    yield database
    with contextlib.suppress(subprocess.CalledProcessError):  # already stopped by the test
        database.stop()
    shutil.rmtree(database.root, ignore_errors=True)


def test_postgresql_stopped_restarted_and_back_under_a_real_server(private_postgres, tmp_path):
    with running_servers(tmp_path, private_postgres.url) as [server]:
        tokens = signed_up(server)
        private_postgres.stop()
        answers = every_database_route(server, tokens)
        assert_database_unavailable(answers)
        assert server.get("/").status_code == 200 and server.get("/openapi.json").status_code == 200
        assert forgot(server).status_code == 202  # ch. 6
        private_postgres.start()
        # The very first request works: the pool's dead connections are replaced.
        assert me(server, tokens).status_code == 200
        # ch. 3: the outage used up nothing
        assert refresh(server, tokens["refresh_token"]).status_code == 200
        in_parallel([lambda: me(server, tokens) for _ in range(12)])  # a dozen pooled connections
        private_postgres.restart()  # while the app is idle
        after = in_parallel([lambda: me(server, tokens) for _ in range(12)])
        assert [response.status_code for response in after] == [200] * 12
    log = server.log.read_text()
    assert log.count("Database unavailable (answered 503)") == len(answers), log  # one line each
    assert log.count("Database unavailable (no reset email sent)") == 1  # ch. 6
    secrets_in_play = [access_claims(tokens)["sid"], tokens["access_token"]]
    secrets_in_play += [tokens["refresh_token"]]  # ch. 3
    assert [secret for secret in secrets_in_play if secret in log] == []
    assert "parameters" not in log.lower()


def test_a_server_started_while_postgresql_is_down_answers_503_until_it_is_back(
    private_postgres, tmp_path
):
    with running_servers(tmp_path, private_postgres.url) as [server]:
        tokens = signed_up(server)  # the tables exist
    private_postgres.stop()
    with running_servers(tmp_path, private_postgres.url) as [server]:
        assert server.get("/").status_code == 200  # it started
        assert_database_unavailable({"me": me(server, tokens), "login": login(server)})
        private_postgres.start()
        assert me(server, tokens).status_code == 200
        assert login(server).status_code == 200
    logs = "".join(log.read_text() for log in tmp_path.glob("server-*.log"))
    assert "Database unavailable at start-up" in logs and "Traceback" not in logs


def test_a_server_started_before_its_new_database_makes_the_tables_once_it_is_up(
    private_postgres, tmp_path
):
    """As docker compose starts them: the app first, then PostgreSQL, with no tables yet."""
    private_postgres.stop()
    with running_servers(tmp_path, private_postgres.url) as [server]:
        assert_database_unavailable({"register": register(server)})
        made, seen = threading.Event(), []

        def hammer_logins() -> None:  # requests that meet no tables are outages too, not bugs
            while not made.is_set():
                seen.append(login(server, "nobody@example.com").status_code)

        hammers = [threading.Thread(target=hammer_logins) for _ in range(4)]
        for thread in hammers:
            thread.start()
        private_postgres.start()
        statuses = [register(server).status_code]
        while statuses[-1] == 503 and len(statuses) < 100:
            time.sleep(0.1)
            statuses.append(register(server).status_code)
        made.set()
        for thread in hammers:
            thread.join()
        assert statuses[-1] == 201 and set(statuses[:-1]) <= {503}, statuses
        assert set(seen) <= {503, 401, 429}, seen  # no 500
        assert login(server).status_code == 200


def test_clients_refreshing_through_a_database_restart_lose_no_session(  # ch. 3
    private_postgres, tmp_path
):
    """40 clients keep refreshing and reading their account while PostgreSQL restarts under them:
    every answer is a 200 or a 503, and afterwards every session is alive, even one whose rotation
    committed as the database went down."""
    with running_servers(tmp_path, private_postgres.url, workers=2) as [server]:
        register(server)
        start = [login(server).json() for _ in range(40)]
        statuses, finals, stop_at = [], [], time.time() + 8

        def keep_refreshing(tokens: dict) -> dict:
            while time.time() < stop_at:
                response = refresh(server, tokens["refresh_token"])
                statuses.append(response.status_code)
                if response.status_code == 200:  # on a 503, retry with the same token
                    tokens = response.json()
                statuses.append(me(server, tokens).status_code)
            return tokens

        with concurrent.futures.ThreadPoolExecutor(41) as pool:
            running = [pool.submit(keep_refreshing, tokens) for tokens in start]
            time.sleep(2)
            private_postgres.stop()
            time.sleep(2)
            private_postgres.start()
            finals = [future.result() for future in running]
        assert set(statuses) <= {200, 503} and 503 in statuses, set(statuses)
        assert [refresh(server, tokens["refresh_token"]).status_code for tokens in finals] == [
            200
        ] * 40
    assert "Traceback" not in "".join(log.read_text() for log in tmp_path.glob("server-*.log"))


DIE_AFTER_ROTATING = """
import os, signal
import main

rotate = main.rotate_refresh_token


def rotate_then_die(*args, **kwargs):
    rotate(*args, **kwargs)  # committed: the login moved on to the token's successor
    os.kill(os.getpid(), signal.SIGKILL)  # and the answer never leaves


main.rotate_refresh_token = rotate_then_die
app = main.app
"""


def test_a_server_killed_right_after_rotating_a_token_loses_no_session(  # ch. 3
    engine, database_url, tmp_path
):
    (tmp_path / "dying.py").write_text(DIE_AFTER_ROTATING)
    with running_servers(tmp_path, database_url) as [healthy]:
        tokens = signed_up(healthy)
        with (
            running_servers(tmp_path, database_url, app="dying:app") as [dying],
            pytest.raises(httpx.TransportError),
        ):
            refresh(dying, tokens["refresh_token"])  # the connection drops: no answer
        assert rows(engine, main.Login)[0].refresh_count == 1  # the rotation was committed
        # The client retries with the token it still has.
        retried = refresh(healthy, tokens["refresh_token"])
        assert retried.status_code == 200
        assert rows(engine, main.Login)[0].refresh_count == 1  # and got the successor it never saw
        assert me(healthy, retried.json()).status_code == 200
        assert refresh(healthy, retried.json()["refresh_token"]).status_code == 200


def test_sigterm_under_load_finishes_the_requests_in_flight(server):
    register(server)
    body = "username=ann%40example.com&password=correct+horse+battery"
    request = (
        "POST /auth/login HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
    # 24 logins sent in full: each takes a hash, so they finish over a second or so.
    for connection in connections:
        connection.sendall(request)
    # The first answer is coming: all 24 are in the server's hands.
    connections[0].recv(1, socket.MSG_PEEK)
    server.process.send_signal(signal.SIGTERM)
    answers = []
    for connection in connections:
        with connection, connection.makefile("rb") as answer:
            answers.append(answer.read())
    assert [answer.split(b"\r\n")[0] for answer in answers] == [b"HTTP/1.1 200 OK"] * 24
    assert all(b'"access_token"' in answer for answer in answers)
    server.process.wait(30)  # uvicorn shuts down, then ends by the signal it caught
    assert "Finished server process" in server.log.read_text()
    with pytest.raises(httpx.ConnectError):
        server.get("/")


def test_openapi_declares_every_status_each_route_was_seen_to_return(client):
    paths = client.get("/openapi.json").json()["paths"]
    seen_routes = {(method, path) for method, path, _ in SEEN_STATUSES}
    declared_routes = {
        (method.upper(), path) for path, operations in paths.items() for method in operations
    }
    # This test checks what the tests above saw: run it with the whole file.
    assert declared_routes <= seen_routes, (
        f"routes no test exercised: {declared_routes - seen_routes}"
    )
    undeclared = sorted(
        (method, path, status)
        for method, path, status in SEEN_STATUSES
        if str(status) not in paths[path][method.lower()]["responses"]
    )
    assert undeclared == []
    for path, operations in paths.items():  # and each error answer names its body's schema
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if not status.startswith(("2", "3")):
                    assert "application/json" in answer.get("content", {}), (method, path, status)


if __name__ == "__main__":  # python test_main.py trim N: chapter N goes from main.py and this file
    if sys.argv[1:2] != ["trim"] or len(sys.argv) != 3:
        sys.exit(
            "usage: python test_main.py trim N (a chapter of main.py, with those that need it)"
        )
    going = removable((HERE / "main.py").read_text())
    if not sys.argv[2].isdigit() or int(sys.argv[2]) not in going:
        sys.exit(f"Chapters that can be trimmed: {', '.join(map(str, going))}")
    for path in (HERE / "main.py", HERE / "test_main.py"):
        path.write_text(trimmed(path.read_text(), going[int(sys.argv[2])]))
    print(f"Trimmed chapters {sorted(going[int(sys.argv[2])])} from main.py and test_main.py.")

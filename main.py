"""A FastAPI JWT auth starter in chapters: 1 is a complete app, each later one adds a feature.
To drop chapter N, delete it and the lines marked `# ch. N`. The README reads along.
"""

import argparse
import contextlib
import hashlib
import logging
import math
import os
import secrets
import smtplib
import ssl
import sys
import tempfile
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx2
import jwt
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from authlib.integrations.starlette_client import OAuth
from fastapi import (
    BackgroundTasks,
    Depends,
    FastAPI,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    Security,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    PositiveInt,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, Engine, UniqueConstraint, bindparam, event, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, insert, not_, select, update
from starlette.middleware.sessions import SessionMiddleware

BASE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("uvicorn.error")  # our lines appear among uvicorn's own


# === 1. A working JWT app: users, passwords, log in, the access token, GET /users/me


# --- Settings: from the environment, or a .env file beside this one
class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")
    database_url: str = f"sqlite:///{BASE_DIR / 'app.db'}"
    secret_key: SecretStr = SecretStr("")  # unset: chapter 2 generates one and keeps it
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_days: PositiveInt = 14  # a login's life: refreshing never extends it


settings = Settings()
SECRET_KEY = settings.secret_key.get_secret_value()
ALGORITHM = "HS256"  # pinned, never the one a token's header names (RFC 8725)
ACCESS_TOKEN_SECONDS = settings.access_token_expire_minutes * 60
LOGIN_SECONDS = settings.refresh_token_expire_days * 24 * 3600


# --- The database: a route gets its Session from SessionDep
def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite") and make_url(url).database in (None, "", ":memory:"):
        sys.exit("DATABASE_URL: threads can't share an in-memory SQLite database: use a file.")
    # hide_parameters: no token, id or email reaches a log.
    options = {"pool_size": 20, "max_overflow": 0, "hide_parameters": True}
    if not url.startswith("sqlite"):
        # pre_ping replaces connections a restart dropped; connecting gives up after 10 s.
        connect = {"connect_timeout": 10}
        return create_engine(url, **options, pool_pre_ping=True, connect_args=connect)
    # Threads share SQLite; a writer waits 30 s for another. WAL: readers never wait.
    connect = {"check_same_thread": False, "timeout": 30}
    sqlite = create_engine(url, **options, connect_args=connect)
    pragmas = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
    event.listen(sqlite, "connect", lambda connection, _: connection.executescript(pragmas))
    return sqlite


engine = create_db_engine(settings.database_url)


def get_session() -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


# The rule: a route using the database is a plain `def` with a SessionDep, and commits or
# closes it before it hashes or returns.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
# Routes that hash: so many at once; the others wait, holding no thread.
HASHES_AT_ONCE = 2 * (os.cpu_count() or 1)
LimitedSessionDep = Annotated[
    Session, Depends(get_session, scope="function", max_concurrency=HASHES_AT_ONCE)
]


# --- Tables: a user, and a login (one device's sign-in; each access token names one)
MAX_ID = 2**31 - 1  # ids are 32-bit on PostgreSQL


class User(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}  # a deleted user's id is never reused
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=254)  # trimmed, lower-cased
    hashed_password: str
    passwords_set: int = 0  # set_password counts; a rehash doesn't
    is_active: bool = True
    is_verified: bool = False  # the address is proven (chapters 6 and 7)
    role: str = "user"  # ch. 8


class Login(SQLModel, table=True):  # ending it ends its tokens
    id: str = Field(default_factory=lambda: secrets.token_hex(16), primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", index=True)
    scopes: str  # granted at login, space-separated
    created_at: float = Field(default_factory=time.time)  # Unix time, as in JWTs
    last_used_at: float = Field(default_factory=time.time)  # its latest refresh
    expires_at: float = Field(default_factory=lambda: time.time() + LOGIN_SECONDS)
    revoked: bool = False
    refresh_count: int = 0  # ch. 3
    previous_used_at: float = 0  # ch. 3
    user_agent: str = ""  # ch. 4


# Every statement on a login asks this; `now` is read as it runs.
LOGIN_IS_LIVE = not_(Login.revoked) & (Login.expires_at > bindparam("now", callable_=time.time))


def revoke_logins(session: Session, *where: ColumnElement[bool]) -> int:
    """End the logins that match, and so their tokens. How many ended."""
    statement = update(Login).where(not_(Login.revoked), *where).values(revoked=True)
    return session.exec(statement).rowcount


def create_tables() -> None:
    # Workers starting together: one takes a lock and creates them.
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        SQLModel.metadata.create_all(connection)


# --- Passwords: argon2id, hashed on a small pool of threads of its own
# OWASP's minimum (19 MiB, 2 passes), plus a pass.
password_hasher = PasswordHasher(memory_cost=19 * 1024, time_cost=3, parallelism=1)
# A thread per core bounds CPU and memory; low priority: requests go first.
LOW_PRIORITY = os.nice if sys.platform == "linux" else None
hash_pool = ThreadPoolExecutor(
    os.cpu_count() or 1, "argon2", initializer=LOW_PRIORITY, initargs=(10,)
)
# Checked for an unknown email: as slow as a wrong password.
DUMMY_HASH = password_hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    # NFKC: the same password typed on any device gives the same bytes (NIST SP 800-63B).
    return hash_pool.submit(password_hasher.hash, unicodedata.normalize("NFKC", password)).result()


def verify_password(password: str, hashed_password: str) -> bool:
    normalized = unicodedata.normalize("NFKC", password)
    try:
        return hash_pool.submit(password_hasher.verify, hashed_password, normalized).result()
    except (VerificationError, InvalidHashError):
        return False


def set_password(session: Session, user_id: int, hashed_password: str, keep: str = "") -> None:
    """Store a new password. Every login but `keep` ends."""
    new = update(User).where(User.id == user_id).values(hashed_password=hashed_password)
    session.exec(new.values(passwords_set=User.passwords_set + 1))
    # ch. 6: a reset link sent before is worthless now
    session.exec(
        delete(EmailLink).where(EmailLink.user_id == user_id, EmailLink.purpose == "reset")
    )
    revoke_logins(session, Login.user_id == user_id, Login.id != keep)


def sha256(text: str) -> str:  # for what is kept but never read back (chapters 5, 6)
    return hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()


# --- Models: each lists its fields, so no hash can leak into an answer
def normalize_email(email: str) -> str:  # NFC, as the validator stores it: "ä" however typed
    return unicodedata.normalize("NFC", email.strip().lower())


Email = Annotated[EmailStr, BeforeValidator(lambda v: normalize_email(v) if type(v) is str else v)]
NewPassword = Annotated[str, Field(min_length=8, max_length=128)]  # length, not composition rules
Password = Annotated[str, Field(max_length=128)]  # a longer one is refused before any hashing
TokenString = Annotated[str, Field(min_length=1, max_length=512)]


class UserCreate(SQLModel):
    email: Email
    password: NewPassword


class UserPublic(SQLModel):
    id: int
    email: str
    is_active: bool
    is_verified: bool


# Not FastAPI's OAuth2PasswordRequestForm: the refresh grant (chapter 3) has no username.
class TokenForm(SQLModel):  # RFC 6749 §4.3
    grant_type: str = "password"  # absent means password
    username: str | None = None  # the email
    password: Password | None = None
    refresh_token: TokenString | None = None  # ch. 3
    scope: str = ""  # space-separated: asking narrows what is granted, never widens it

    @model_validator(mode="after")
    def has_what_its_grant_needs(self) -> "TokenForm":
        if self.grant_type == "password" and (self.username is None or self.password is None):
            raise ValueError("grant_type=password needs username and password")
        return self


class Token(SQLModel):  # the token endpoint's answer
    access_token: str
    refresh_token: str | None = None  # ch. 3
    token_type: str = "bearer"
    expires_in: int = ACCESS_TOKEN_SECONDS
    scope: str


class ErrorMessage(SQLModel):
    detail: str


def documented(*status_codes: int) -> dict[int | str, dict[str, Any]]:  # error answers, for OpenAPI
    return {code: {"model": ErrorMessage} for code in status_codes}


# --- The app, and errors of the token endpoints
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        create_tables()
    except SQLAlchemyError as error:  # ch. 2
        log_unless_a_bug(error, "at start-up (its tables are made once it is back)")
        tables_maker.start()
    yield


# 503 from any route while the database is unavailable (chapter 2).
app = FastAPI(title="FastAPI JWT auth starter", lifespan=lifespan, responses=documented(503))


class OAuth2Error(HTTPException):  # RFC 6749 §5.2's `error` code goes beside `detail`
    def __init__(self, error: str, detail: str, status_code: int = 401, headers=None):
        if status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        super().__init__(status_code, detail, headers)
        self.error = error


@app.exception_handler(OAuth2Error)
async def oauth2_error_handler(request: Request, exc: OAuth2Error) -> JSONResponse:
    body = {"detail": exc.detail, "error": exc.error, "error_description": exc.detail}
    return JSONResponse(body, exc.status_code, headers=exc.headers)


# --- The access token: a JWT naming its login, which must be live at every request
SCOPES = {"me": "Your account."}
SCOPES["admin"] = "Every user's account."  # ch. 8
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="auth/login", scopes=SCOPES)


class AccessTokenClaims(SQLModel):
    sub: int = Field(gt=0, le=MAX_ID)  # the user
    sid: str  # the login
    type: Literal["access"]  # no other kind passes for one
    scope: str


class SignedInUser(UserPublic):  # who is calling, through which login
    login_id: str
    role: str  # ch. 8


def decode_token(token: str, claims_type: type[SQLModel]) -> Any:
    """The claims_type of a token this API signed, unexpired and of that type, or None."""
    try:
        options = {"require": ["exp", "iat"]}
        payload = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM], options=options)
        return claims_type.model_validate(payload)
    except (jwt.InvalidTokenError, ValidationError):
        return None


def create_access_token(login: Login, scopes: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": str(login.user_id), "sid": login.id, "scope": " ".join(scopes), "iat": now}
    claims |= {"type": "access", "exp": now + ACCESS_TOKEN_SECONDS, "jti": secrets.token_hex(8)}
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


def grant_scopes(held: list[str], asked: str, user: User | SignedInUser) -> list[str]:
    """Those held that were asked for (none asked: all): asking narrows, never widens."""
    granted = [scope for scope in held if asked == "" or scope in asked.split()]
    granted = [scope for scope in granted if scope in ROLE_SCOPES[user.role]]  # ch. 8
    return granted


# Built once: the user (not the hash), if this login is live.
SELECT_SIGNED_IN_USER = (
    select(User.id, User.email, User.is_active, User.is_verified, Login.id.label("login_id"))
    .join(Login)
    .where(User.id == bindparam("user_id"), Login.id == bindparam("login_id"))
    .where(User.is_active, LOGIN_IS_LIVE)
)
SELECT_SIGNED_IN_USER = SELECT_SIGNED_IN_USER.add_columns(User.role)  # ch. 8


def get_current_user(
    security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]
) -> SignedInUser:
    """The user behind a valid access token, read fresh: logout and deactivation apply at once."""
    claims = decode_token(token, AccessTokenClaims)
    row = None
    if claims is not None:
        # Its own connection, back in the pool before the route runs.
        with engine.connect() as connection:
            ids = {"user_id": claims.sub, "login_id": claims.sid}
            row = connection.execute(SELECT_SIGNED_IN_USER, ids).first()
    if row is None:
        raise HTTPException(401, "Could not validate credentials", {"WWW-Authenticate": "Bearer"})
    user = SignedInUser.model_validate(row, from_attributes=True)
    if not set(security_scopes.scopes) <= set(grant_scopes(claims.scope.split(), "", user)):
        needed = security_scopes.scope_str
        challenge = f'Bearer error="insufficient_scope", scope="{needed}"'
        detail = f"Not enough permissions: this needs the scope '{needed}'"
        raise HTTPException(403, detail, {"WWW-Authenticate": challenge})
    return user


CurrentUser = Annotated[SignedInUser, Security(get_current_user, scopes=["me"])]


# --- Register, log in, and GET /users/me
@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastAPI JWT auth starter. Try the API at /docs"}


@app.post(
    "/auth/register", status_code=201, response_model=UserPublic, responses=documented(400, 409)
)
def register(
    user_in: UserCreate, session: LimitedSessionDep, background_tasks: BackgroundTasks
) -> User:
    """Create an account."""
    user = User(email=user_in.email, hashed_password=hash_password(user_in.password))
    session.add(user)
    try:
        session.commit()
    except IntegrityError:
        # The unique email: also right when two sign-ups race.
        raise HTTPException(409, "An account with this email already exists") from None
    background_tasks.add_task(email_link, user.email, "verify")  # ch. 6
    return user


def authenticate(session: Session, email: str, password: str, request: Request) -> User | None:
    """The user with this email and password, or None. No connection is held while hashing."""
    check_login_throttle(session, email, request)  # ch. 5
    user = None
    # No email holds a NUL or a lone surrogate, which databases can't compare.
    if email.isprintable():
        user = session.exec(select(User).where(User.email == email)).first()
    session.close()
    hashed_password = DUMMY_HASH if user is None else user.hashed_password
    password_ok = verify_password(password, hashed_password)
    if password_ok and is_weaker_than_ours(hashed_password):  # ch. 2
        hashed_password = hash_password(password)
    check_login_throttle(session, email, request)  # ch. 5: parallel guesses passed the first
    if password_ok:
        # Not set again since read? Its row stays locked until the login is stored.
        same = update(User).where(User.id == user.id, User.passwords_set == user.passwords_set)
        password_ok = session.exec(same.values(hashed_password=hashed_password)).rowcount == 1
    if not password_ok:
        record_failed_login(session, email, request)  # ch. 5
        return None
    forget_failed_logins(session, email, request)  # ch. 5
    return user


def start_login(session: Session, user: User, asked: str, request: Request) -> Login:
    """A new login for the user, with the scopes it holds that were asked for."""
    # The user's expired logins go, so the table doesn't grow forever.
    session.exec(delete(Login).where(Login.user_id == user.id, Login.expires_at <= time.time()))
    login = Login(user_id=user.id, scopes=" ".join(grant_scopes(list(SCOPES), asked, user)))
    login.user_agent = request.headers.get("user-agent", "")[:200]  # ch. 4
    session.add(login)
    return login


def issue_tokens(login: Login, scopes: list[str], request: Request, response: Response) -> Token:
    """A new access token for the login (and its refresh token, chapter 3)."""
    # Tokens are never cached (RFC 6749 §5.1).
    response.headers["Cache-Control"] = "no-store"
    tokens = Token(access_token=create_access_token(login, scopes), scope=" ".join(scopes))
    add_refresh_token(tokens, login, request, response)  # ch. 3
    return tokens


@app.post("/auth/login", responses=documented(400, 401, 403, 429), response_model_exclude_none=True)
def log_in(
    form: Annotated[TokenForm, Form()],
    request: Request,
    response: Response,
    session: LimitedSessionDep,
) -> Token:
    """The OAuth2 token endpoint: the password grant (`username` is the email)."""
    check_origin(request)  # ch. 3
    if form.grant_type == "refresh_token":  # ch. 3
        refresh_token = presented_refresh_token(request, form.refresh_token)
        return rotate_refresh_token(session, request, response, refresh_token, form.scope)
    if form.grant_type != "password":
        raise OAuth2Error("unsupported_grant_type", "This grant_type is not supported", 400)
    user = authenticate(session, normalize_email(form.username), form.password, request)
    if user is None:
        raise OAuth2Error("invalid_grant", "Incorrect email or password")
    if not user.is_active:
        raise OAuth2Error("invalid_grant", "This account has been deactivated", 403)
    login = start_login(session, user, form.scope, request)
    session.commit()
    return issue_tokens(login, login.scopes.split(), request, response)


@app.get("/users/me", responses=documented(401, 403))
async def read_me(user: CurrentUser) -> UserPublic:
    """Your account."""
    return user


# === 2. What no deployment should lose (keep): a kept key, stronger hashes, outages
def load_or_create_secret_key(path: Path) -> str:
    """The key kept in `path`, made at first start: workers starting together each link a temp
    file there, and the first wins."""
    if not path.exists():
        try:
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
        except OSError as error:
            problem = f"no key can be saved in {path.parent} ({error.strerror})"
            sys.exit(f"No SECRET_KEY, and {problem}: set SECRET_KEY.")
        with os.fdopen(fd, "w") as temp_file:
            temp_file.write(secrets.token_urlsafe(64))
        with contextlib.suppress(FileExistsError):
            os.link(temp_name, path)
        os.unlink(temp_name)
    key = path.read_text().strip()
    if len(key) < 32:
        sys.exit(f"{path} holds no usable key: delete it for a new one, or set SECRET_KEY.")
    log.warning("SECRET_KEY is not set: using the key kept in %s. Set it in production.", path)
    return key


if SECRET_KEY == "":
    SECRET_KEY = load_or_create_secret_key(BASE_DIR / ".secret_key")
if len(SECRET_KEY.encode()) < 32:
    make_one = 'python -c "import secrets; print(secrets.token_urlsafe(64))"'
    sys.exit(f"SECRET_KEY must be at least 32 bytes long: {make_one}")


def is_weaker_than_ours(hashed_password: str) -> bool:
    """Rehash at login only to upgrade: not argon2id, less memory, or less memory x passes
    (OWASP's settings trade one for the other)."""
    stored, ours = extract_parameters(hashed_password), password_hasher
    if stored.type != Type.ID or stored.memory_cost < ours.memory_cost:
        return True
    return stored.memory_cost * stored.time_cost < ours.memory_cost * ours.time_cost


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422 echoes the rejected input, and that may be a password.
    problems = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
    description = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems)
    body = {"detail": problems, "error": "invalid_request", "error_description": description}
    return JSONResponse(body, 422)


def make_tables_when_back() -> None:
    """Start-up found the database unavailable: make the tables once it is back."""
    while True:
        time.sleep(1)
        with contextlib.suppress(OperationalError):
            create_tables()
            # A second more: what failed without them is an outage too.
            time.sleep(1)
            return


tables_maker = threading.Thread(target=make_tables_when_back, daemon=True)
DATABASE_RETRY_SECONDS = 5  # a 503's Retry-After
# PostgreSQL's SQLSTATEs a retry may cure: no connection, out of connections or resources,
# a shutdown, a cancel, a serialization failure, a deadlock.
RETRY_SQLSTATES = ("08", "53", "57", "40001", "40P01")


def is_database_unavailable(error: SQLAlchemyError) -> bool:
    """Down, restarting, overloaded or busy: worth a retry. A bad statement is a bug: a 500."""
    if isinstance(error, PoolTimeoutError) or tables_maker.is_alive():
        # All pooled connections busy, or no tables yet.
        return True
    if not isinstance(error, OperationalError):
        return False
    sqlite_error = getattr(error.orig, "sqlite_errorname", None)
    if sqlite_error is not None:
        # Busy, locked, no file: all but SQLITE_ERROR, a bad statement.
        return sqlite_error != "SQLITE_ERROR"
    # No SQLSTATE: no server answered.
    sqlstate = getattr(error.orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(RETRY_SQLSTATES)


def log_unless_a_bug(error: SQLAlchemyError, what: str) -> None:
    """One log line, no traceback, while the database is unavailable. A bug goes on up."""
    if not is_database_unavailable(error):
        raise error
    log.error("Database unavailable %s: %s", what, str(error).splitlines()[0])


@app.exception_handler(SQLAlchemyError)
async def database_error_handler(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log_unless_a_bug(exc, "(answered 503)")
    detail = "The database is unavailable: try again shortly"
    retry_after = {"Retry-After": str(DATABASE_RETRY_SECONDS)}
    return await oauth2_error_handler(
        request, OAuth2Error("temporarily_unavailable", detail, 503, retry_after)
    )


# === 3. Refresh and log out: tokens that rotate, one chain per login, a cookie for browsers
class BrowserSettings(Settings):
    cors_origins: str = ""  # comma-separated origins of front ends elsewhere


CORS_ORIGINS = [url.strip() for url in BrowserSettings().cors_origins.split(",") if url.strip()]
REFRESH_GRACE_SECONDS = 30  # a used token may come again this long after its first use
REFRESH_COOKIE = "__Host-refresh_token"  # __Host-: set by this host alone, for every path


class RefreshTokenClaims(SQLModel):  # nothing is stored: the login's row alone decides
    sid: str  # the login
    n: int = Field(ge=0, lt=MAX_ID)  # its refresh_count when issued: only the newest rotates
    type: Literal["refresh"]


class RefreshRequest(SQLModel):
    refresh_token: TokenString | None = None  # none: a browser's is in its cookie


NO_BODY = RefreshRequest()  # a browser may send no body at all


def create_refresh_token(login: Login) -> str:
    """The login's newest refresh token, the same each time: a retry gets it too."""
    claims = {"sid": login.id, "n": login.refresh_count, "type": "refresh"}
    claims |= {"iat": int(login.created_at), "exp": int(login.expires_at)}
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


def rotate_refresh_token(
    session: Session, request: Request, response: Response, refresh_token: str | None, asked: str
) -> Token:
    """New tokens for the token's login. The newest works once; the two before it again, within
    REFRESH_GRACE_SECONDS of their first use, for the same successor."""
    if refresh_token is None:
        # In neither the body nor a cookie: a missing field (RFC 6749 §5.2).
        missing = {"type": "missing", "loc": ("body", "refresh_token"), "msg": "Field required"}
        raise RequestValidationError([missing])
    claims = decode_token(refresh_token, RefreshTokenClaims)
    if claims is None:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    now = time.time()
    # One UPDATE moves the login on: of two racing requests, one does.
    newest = update(Login).where(Login.id == claims.sid, Login.refresh_count == claims.n)
    moved_on = newest.values(refresh_count=claims.n + 1, previous_used_at=Login.last_used_at)
    session.exec(moved_on.values(last_used_at=now))
    live = select(Login, User).join(User).where(Login.id == claims.sid, User.is_active)
    found = session.exec(live.where(LOGIN_IS_LIVE)).first()
    if found is None:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    login, user = found
    # Each retried within the window of its own first use.
    first_used = {login.refresh_count - 1: login.last_used_at}
    first_used[login.refresh_count - 2] = login.previous_used_at
    if now - first_used.get(claims.n, 0) > REFRESH_GRACE_SECONDS:
        # A used token came back late: a thief's, or its victim's (RFC 9700 §4.14.2).
        revoke_logins(session, Login.id == login.id)
        session.commit()
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    session.commit()
    return issue_tokens(login, grant_scopes(login.scopes.split(), asked, user), request, response)


# --- Browsers: the refresh token in a cookie no script reads
if CORS_ORIGINS:
    # Unset: only pages this API serves may call it from a browser.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=CORS_ORIGINS,
        allow_credentials=True,  # the refresh token cookie
        allow_methods=["*"],
        allow_headers=["Authorization", "Content-Type"],
    )


def is_browser(request: Request) -> bool:  # a browser's POST has an Origin; curl's has none
    return "origin" in request.headers


def check_origin(request: Request) -> None:
    """403 unless from the API's own origin or CORS_ORIGINS: no page elsewhere uses the cookie,
    or plants its own (login CSRF)."""
    own = f"{request.url.scheme}://{request.url.netloc}"
    origin = request.headers.get("origin", own)
    if origin != own and origin not in CORS_ORIGINS:
        raise OAuth2Error("access_denied", f"Requests from {origin!r} are not allowed here", 403)


def presented_refresh_token(request: Request, in_body: str | None) -> str | None:
    """The refresh token in the body, or else the cookie, which only a browser may send (CSRF)."""
    cookie_header = ";".join(request.headers.getlist("cookie"))
    cookie_names = [pair.split("=")[0].strip() for pair in cookie_header.split(";")]
    if cookie_names.count(REFRESH_COOKIE) > 1:
        # One was planted: a sibling host can't set ours.
        raise OAuth2Error("invalid_request", f"{REFRESH_COOKIE} was sent twice: log in again", 400)
    if in_body is not None:
        return in_body
    in_cookie = request.cookies.get(REFRESH_COOKIE)
    if in_cookie is not None and not is_browser(request):
        raise OAuth2Error("access_denied", "The cookie is taken only with an Origin header", 403)
    return in_cookie


def set_refresh_cookie(response: Response, refresh_token: str, max_age: int) -> None:
    # HttpOnly: no script reads it. Secure: HTTPS only. Strict: no other site's page sends it.
    cookie = f"{REFRESH_COOKIE}={refresh_token}; HttpOnly; Secure; SameSite=Strict; Path=/"
    response.headers.append("Set-Cookie", f"{cookie}; Max-Age={max_age}")


def add_refresh_token(tokens: Token, login: Login, request: Request, response: Response) -> None:
    """The login's refresh token: in the answer, or for a browser, only in its cookie."""
    refresh_token = create_refresh_token(login)
    if is_browser(request):
        set_refresh_cookie(response, refresh_token, int(login.expires_at - time.time()))
    else:
        tokens.refresh_token = refresh_token


@app.post("/auth/refresh", responses=documented(400, 401, 403), response_model_exclude_none=True)
def refresh(
    request: Request, response: Response, session: SessionDep, body: RefreshRequest = NO_BODY
) -> Token:
    """Trade a refresh token (in the body, or a browser's cookie) for new tokens."""
    check_origin(request)
    refresh_token = presented_refresh_token(request, body.refresh_token)
    return rotate_refresh_token(session, request, response, refresh_token, "")


@app.post("/auth/logout", status_code=204, responses=documented(400, 403))
def log_out(
    request: Request, response: Response, session: SessionDep, body: RefreshRequest = NO_BODY
) -> None:
    """End the refresh token's login and its tokens. None, or an unknown one, is fine (RFC 7009)."""
    check_origin(request)
    refresh_token = presented_refresh_token(request, body.refresh_token)
    if is_browser(request):
        # The browser forgets it.
        set_refresh_cookie(response, "", 0)
    claims = decode_token(refresh_token or "", RefreshTokenClaims)
    if claims is not None:
        revoke_logins(session, Login.id == claims.sid)
        session.commit()


# === 4. Your account: your logins (the API says sessions), a new password, deleting it
class LoginInfo(SQLModel):
    id: str
    created_at: datetime
    last_used_at: datetime
    user_agent: str
    current: bool  # the login of this request's token


class PasswordChange(SQLModel):
    current_password: Password
    new_password: NewPassword


class PasswordConfirmation(SQLModel):
    password: Password


def check_password(session: Session, user: SignedInUser, password: str, request: Request) -> None:
    """400 unless it is the user's password. Throttled: a stolen token gives no free guesses."""
    if authenticate(session, user.email, password, request) is None:
        raise HTTPException(400, "The password is not correct")


@app.get("/auth/sessions", responses=documented(401, 403))
def list_logins(user: CurrentUser, session: SessionDep) -> list[LoginInfo]:
    """Your live logins, newest first."""
    mine = select(Login).where(Login.user_id == user.id, LOGIN_IS_LIVE)
    logins = session.exec(mine.order_by(Login.created_at.desc())).all()
    session.close()
    return [LoginInfo(**login.model_dump(), current=login.id == user.login_id) for login in logins]


@app.delete("/auth/sessions/{login_id}", status_code=204, responses=documented(401, 403, 404))
def log_out_one(login_id: str, user: CurrentUser, session: SessionDep) -> None:
    """Log out one of your logins (an id from GET /auth/sessions), at once."""
    ended = 0
    # PostgreSQL can't compare a NUL, and no id holds one.
    if "\x00" not in login_id:
        ended = revoke_logins(
            session, Login.id == login_id, Login.user_id == user.id, LOGIN_IS_LIVE
        )
    session.commit()
    if ended == 0:
        raise HTTPException(404, "Session not found")


@app.delete("/auth/sessions", status_code=204, responses=documented(401, 403))
def log_out_everywhere(user: CurrentUser, session: SessionDep) -> None:
    """Log out every login, this one included."""
    revoke_logins(session, Login.user_id == user.id)
    session.commit()


@app.post("/auth/change-password", status_code=204, responses=documented(400, 401, 403, 429))
def change_password(
    body: PasswordChange, user: CurrentUser, request: Request, session: LimitedSessionDep
) -> None:
    """Change your password. Your other logins end at once; this one goes on."""
    check_login_throttle(session, user.email, request)  # ch. 5: before any hashing
    session.close()
    # Hashed first: the check locks the row until the commit.
    hashed_password = hash_password(body.new_password)
    check_password(session, user, body.current_password, request)
    set_password(session, user.id, hashed_password, keep=user.login_id)
    session.commit()


@app.delete("/users/me", status_code=204, responses=documented(400, 401, 403, 429))
def delete_me(
    body: PasswordConfirmation, user: CurrentUser, request: Request, session: LimitedSessionDep
) -> None:
    """Delete your account and its logins. Its email can sign up again."""
    check_password(session, user, body.password, request)
    session.exec(delete(User).where(User.id == user.id))
    session.commit()


# === 5. Login throttling: failures are counted, to slow password guessing (OWASP ASVS 2.2.1)
MAX_FAILURES_PER_EMAIL, MAX_FAILURES_PER_CLIENT = 5, 50  # from one client, in FAILURE_WINDOW
FAILURE_WINDOW = 15 * 60


class LoginFailure(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    client_hash: str = Field(index=True)  # SHA-256 of the client's address: bounded, however long
    email_hash: str  # SHA-256 of the email tried: what strangers type isn't kept
    failed_at: float = Field(default_factory=time.time, index=True)


def client_address(request: Request) -> str:  # "" when unknown, as on a Unix socket
    return request.client.host if request.client else ""


def check_login_throttle(session: Session, email: str, request: Request) -> None:
    """429 while this client has failed too often at this email, or at any. Others still log in."""
    client, email_hash = client_address(request), sha256(email)
    recent = select(LoginFailure.email_hash, LoginFailure.failed_at).where(
        LoginFailure.client_hash == sha256(client),
        LoginFailure.failed_at > time.time() - FAILURE_WINDOW,
    )
    # No address (a Unix socket) isn't one client: only the email's limit applies.
    if client == "":
        recent = recent.where(LoginFailure.email_hash == email_hash)
    latest = recent.order_by(LoginFailure.failed_at.desc()).limit(MAX_FAILURES_PER_CLIENT)
    failures = session.exec(latest).all()
    at_this_email = [failure for failure in failures if failure.email_hash == email_hash]
    # It may try again once the limit-th latest failure leaves the window.
    limits = ((at_this_email, MAX_FAILURES_PER_EMAIL), (failures, MAX_FAILURES_PER_CLIENT))
    for counted, limit in limits:
        if len(counted) >= limit:
            seconds = str(math.ceil(counted[limit - 1].failed_at + FAILURE_WINDOW - time.time()))
            detail = f"Too many failed logins: try again in {seconds} s"
            raise OAuth2Error("temporarily_unavailable", detail, 429, {"Retry-After": seconds})


def record_failed_login(session: Session, email: str, request: Request) -> None:
    client_hash = sha256(client_address(request))
    session.add(LoginFailure(client_hash=client_hash, email_hash=sha256(email)))
    session.exec(delete(LoginFailure).where(LoginFailure.failed_at < time.time() - FAILURE_WINDOW))
    session.commit()


def forget_failed_logins(session: Session, email: str, request: Request) -> None:
    mine = LoginFailure.client_hash == sha256(client_address(request))
    session.exec(delete(LoginFailure).where(mine, LoginFailure.email_hash == sha256(email)))


# === 6. Email links: reset a forgotten password, verify an address; once, soon, stored hashed
class EmailSettings(Settings):
    frontend_url: str = "http://localhost:8000"  # where the links point
    reset_token_expire_minutes: PositiveInt = 30
    smtp_host: str = ""  # unset: emails are written to the log instead
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_tls: bool = True  # STARTTLS
    emails_from: str = "noreply@example.com"


email_settings = EmailSettings()


class EmailLink(SQLModel, table=True):  # a user's latest link of each kind, until used
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", primary_key=True)
    purpose: str = Field(primary_key=True)  # "reset" or "verify"
    token_hash: str = Field(unique=True)  # SHA-256 of the token in the link
    created_at: float
    expires_at: float


LINKS = {  # purpose: (the link's page, the subject, minutes it works)
    "reset": ("reset-password", "Reset your password", email_settings.reset_token_expire_minutes),
    "verify": ("verify-email", "Verify your email address", 2 * 24 * 60),
}
EMAIL_ON_ITS_WAY = {"message": "If an account has this address, an email is on its way."}


class EmailRequest(SQLModel):
    email: Email


class LinkToken(SQLModel):
    token: TokenString


class PasswordReset(LinkToken):
    new_password: NewPassword


def send_email(to: str, subject: str, body: str) -> None:
    """Send a plain-text email (with no SMTP_HOST, log it). Failures are logged, not raised."""
    if not email_settings.smtp_host:
        log.warning(
            "SMTP_HOST is not set, so this email was not sent:\nTo: %s\nSubject: %s\n\n%s",
            to,
            subject,
            body,
        )
        return
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = email_settings.emails_from, to, subject
    message.set_content(body)
    try:
        with smtplib.SMTP(email_settings.smtp_host, email_settings.smtp_port, timeout=10) as smtp:
            if email_settings.smtp_tls:
                # The default context checks the certificate and the name.
                smtp.starttls(context=ssl.create_default_context())
            if email_settings.smtp_user:
                password = email_settings.smtp_password.get_secret_value()
                smtp.login(email_settings.smtp_user, password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        # TLS errors are OSErrors.
        log.error("Could not send an email to %s: %s", to, error)


def email_link(email: str, purpose: Literal["reset", "verify"]) -> None:
    """Email an active user a one-time link, one of each kind a minute at most. It runs after
    the answer: an unknown address takes as long."""
    token, now = secrets.token_urlsafe(32), time.time()
    page, subject, minutes = LINKS[purpose]
    try:
        # Outside a route: a connection of its own.
        with engine.begin() as connection:
            active = select(User.id, User.is_verified).where(User.email == email, User.is_active)
            user = connection.execute(active).first()
            if user is None or (purpose == "verify" and user.is_verified):
                return
            # A link over a minute old is replaced; a newer one makes the key refuse this.
            connection.execute(
                delete(EmailLink).where(
                    EmailLink.user_id == user.id,
                    EmailLink.purpose == purpose,
                    EmailLink.created_at < now - 60,
                )
            )
            link = insert(EmailLink).values(user_id=user.id, purpose=purpose, created_at=now)
            connection.execute(link.values(token_hash=sha256(token), expires_at=now + minutes * 60))
    except IntegrityError:
        # One is on its way already (a racing request's).
        return
    except SQLAlchemyError as error:  # ch. 2
        log_unless_a_bug(error, f"(no {purpose} email sent)")
        return
    url = f"{email_settings.frontend_url}/{page}?token={token}"
    body = f"{subject}: {url}\n\nIt works once, within {minutes} minutes. Not you? Ignore this."
    send_email(email, subject, body)


def use_link(session: Session, token: str, purpose: str) -> int:
    """Use up a link: its user's id. 400 if invalid, used or expired."""
    link = delete(EmailLink).where(
        EmailLink.token_hash == sha256(token),
        EmailLink.purpose == purpose,
        EmailLink.expires_at > time.time(),
    )
    # Deleted as it is read: it works once.
    user_id = session.exec(link.returning(EmailLink.user_id)).scalar()
    if user_id is None:
        raise HTTPException(400, "This link is invalid, used or expired: ask for a new one")
    return user_id


@app.post("/auth/forgot-password", status_code=202, responses=documented(400))
async def forgot_password(body: EmailRequest, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Email a link to reset the password, if an active account has this address."""
    background_tasks.add_task(email_link, body.email, "reset")
    return EMAIL_ON_ITS_WAY


@app.post("/auth/reset-password", status_code=204, responses=documented(400))
def reset_password(body: PasswordReset, session: LimitedSessionDep) -> None:
    """Set a new password with the token from the email. Every login of the account ends."""
    user_id = use_link(session, body.token, "reset")
    # Used up before the slow hash: two requests can't both use it.
    session.commit()
    set_password(session, user_id, hash_password(body.new_password))
    session.commit()


@app.post("/auth/verify-email", status_code=204, responses=documented(400))
def verify_email(body: LinkToken, session: SessionDep) -> None:
    """Mark the address verified, with the token from the email."""
    user_id = use_link(session, body.token, "verify")
    session.exec(update(User).where(User.id == user_id).values(is_verified=True))
    session.commit()


@app.post("/auth/verify-email/resend", status_code=202, responses=documented(400))
async def resend_verification_email(
    body: EmailRequest, background_tasks: BackgroundTasks
) -> dict[str, str]:
    """Email a new verification link, if an unverified account has this address."""
    background_tasks.add_task(email_link, body.email, "verify")
    return EMAIL_ON_ITS_WAY


async def get_verified_user(user: CurrentUser) -> SignedInUser:
    if not user.is_verified:
        raise HTTPException(403, "Verify your email address first")
    return user


VerifiedUser = Annotated[SignedInUser, Depends(get_verified_user)]  # for routes that need one


# === 7. Sign in with Google, Microsoft, GitLab or any OpenID Connect provider (needs 3)
class OidcProvider(BaseModel):
    issuer: str  # as its discovery document says, e.g. https://accounts.google.com
    client_id: str
    client_secret: SecretStr
    trust_email: bool = False  # its emails count as verified (Microsoft never says)


class OidcSettings(Settings):
    oidc_providers: dict[str, OidcProvider] = {}  # JSON: {"google": {"issuer": ..., ...}, ...}
    frontend_url: str = "http://localhost:8000"  # where a sign-in ends


oidc_settings = OidcSettings()
OIDC_PROVIDERS = oidc_settings.oidc_providers
oauth = OAuth()
for name, provider in OIDC_PROVIDERS.items():
    oauth.register(
        name,
        client_id=provider.client_id,
        client_secret=provider.client_secret.get_secret_value(),
        server_metadata_url=f"{provider.issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": "openid email", "code_challenge_method": "S256"},  # PKCE
    )
if OIDC_PROVIDERS:
    # State, nonce and PKCE verifier wait 10 minutes in a signed cookie of the
    # browser that started it. Lax: the provider's redirect back is cross-site; Strict misses it.
    app.add_middleware(
        SessionMiddleware,
        secret_key=SECRET_KEY,
        session_cookie="__Host-oidc_flow",
        max_age=600,
        same_site="lax",
        https_only=True,
    )


class ProviderAccount(SQLModel, table=True):  # a user's account at a provider
    __table_args__ = (UniqueConstraint("provider", "user_id"),)  # one per provider per user
    provider: str = Field(primary_key=True)  # a key of OIDC_PROVIDERS
    subject: str = Field(primary_key=True)  # the ID token's `sub`: it never changes, the email may
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE")


class IdTokenClaims(SQLModel):  # what we use of the provider's ID token
    sub: Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]{1,255}$")]
    email: Email | None = None
    email_verified: bool = False


class SignInError(Exception):  # its argument is the ?error= code the front end gets
    pass


def oidc_client(name: str) -> Any:
    if name not in OIDC_PROVIDERS:
        raise HTTPException(404, f"No sign-in provider named {name!r}")
    return oauth.create_client(name)


def link_user(session: Session, name: str, claims: IdTokenClaims) -> User:
    """A first sign-in: the user with the provider's email, if it verified it, or a new user."""
    if claims.email is None or not (claims.email_verified or OIDC_PROVIDERS[name].trust_email):
        raise SignInError("email_not_verified")
    user = session.exec(select(User).where(User.email == claims.email)).first()
    accounts = select(ProviderAccount).where(ProviderAccount.provider == name)
    if user is None:
        # DUMMY_HASH: no password logs in, as slowly as a wrong one. Forgot-password sets one.
        user = User(email=claims.email, hashed_password=DUMMY_HASH, is_verified=True)
        session.add(user)
        session.flush()
    elif session.exec(accounts.where(ProviderAccount.user_id == user.id)).first() is not None:
        # Linked to another subject there: a recycled address takes over nothing.
        raise SignInError("email_linked_to_another_account")
    elif not user.is_verified:
        # Whoever chose its password never proved the address (pre-account takeover): it goes.
        set_password(session, user.id, DUMMY_HASH)
        user.is_verified = True
    session.add(ProviderAccount(provider=name, subject=claims.sub, user_id=user.id))
    return user


def sign_in_with_provider(name: str, claims: IdTokenClaims, request: Request) -> Login:
    """A new login for the account's user: found by its subject, or else by its email."""
    # In a thread, outside a route: a session of its own.
    with Session(engine, expire_on_commit=False) as session:
        accounts = select(User).join(ProviderAccount).where(ProviderAccount.provider == name)
        user = session.exec(accounts.where(ProviderAccount.subject == claims.sub)).first()
        if user is None:
            user = link_user(session, name, claims)
        if not user.is_active:
            raise SignInError("account_deactivated")
        login = start_login(session, user, "", request)
        session.commit()
        return login


def sign_in_failed(name: str, code: str, error: Exception) -> RedirectResponse:
    # One line, whatever the provider wrote.
    log.warning("Sign-in with %s failed (%s): %r", name, code, str(error))
    return RedirectResponse(f"{oidc_settings.frontend_url}?error={code}", 303)


PROVIDER_DOWN = {303: {"description": "To FRONTEND_URL?error=provider_unavailable"}}


@app.get("/auth/oidc/{name}/login", status_code=302, responses=documented(404) | PROVIDER_DOWN)
async def oidc_login(name: str, request: Request) -> RedirectResponse:
    """Sign in with a provider: off to its login page, then back to the callback."""
    provider = oidc_client(name)
    try:
        return await provider.authorize_redirect(
            request, request.url_for("oidc_callback", name=name)
        )
    except Exception as error:  # down, or its discovery document won't do
        return sign_in_failed(name, "provider_unavailable", error)


@app.get("/auth/oidc/{name}/callback", status_code=303, responses=documented(404))
async def oidc_callback(name: str, request: Request) -> RedirectResponse:
    """The provider sends the browser back here: a login starts, with its cookie, then on to
    FRONTEND_URL (or FRONTEND_URL?error=code)."""
    provider = oidc_client(name)
    # Authlib checks the ID token's signature, nonce and times; we pin `iss` and `aud`.
    expected = {"iss": {"value": OIDC_PROVIDERS[name].issuer}, "aud": {"value": provider.client_id}}
    try:
        token = await provider.authorize_access_token(request, claims_options=expected)
        # No userinfo: the provider sent no ID token.
        claims = IdTokenClaims.model_validate(token.get("userinfo"))
    except httpx2.HTTPError as error:
        return sign_in_failed(name, "provider_unavailable", error)
    except Exception as error:  # what the provider or the browser sent won't do
        return sign_in_failed(name, "sign_in_failed", error)
    try:
        login = await run_in_threadpool(sign_in_with_provider, name, claims, request)
    except SignInError as error:
        return sign_in_failed(name, error.args[0], error)
    except IntegrityError as error:  # a parallel sign-in linked it first
        return sign_in_failed(name, "sign_in_failed", error)
    response = RedirectResponse(oidc_settings.frontend_url, 303)
    set_refresh_cookie(response, create_refresh_token(login), LOGIN_SECONDS)
    return response


# === 8. Admin: scopes by role, routes to manage users, and `python main.py make-admin EMAIL`
# A token's scopes hold only while its user's role has them.
ROLE_SCOPES = {"user": ["me"], "admin": ["me", "admin"]}
MAX_PAGE_SIZE = 100
AdminUser = Annotated[SignedInUser, Security(get_current_user, scopes=["admin"])]


class UserWithRole(UserPublic):  # what admins see of users
    role: str


class UserUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # a typo must not look like a change
    is_active: bool | None = None
    role: Literal["user", "admin"] | None = None


def check_other_user(user_id: int, admin: SignedInUser) -> None:
    if not 0 < user_id <= MAX_ID:
        raise HTTPException(404, "User not found")
    if user_id == admin.id:
        # One wrong click would lock this admin out.
        raise HTTPException(400, "Admins cannot change or delete their own account here")


@app.get("/users", response_model=list[UserWithRole], responses=documented(401, 403))
def list_users(
    admin: AdminUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, description="100 at most")] = MAX_PAGE_SIZE,
) -> list[User]:
    """All users, a page at a time."""
    page = select(User).order_by(User.id).offset(offset).limit(min(limit, MAX_PAGE_SIZE))
    users = session.exec(page).all()
    session.close()
    return users


@app.patch(
    "/users/{user_id}", response_model=UserWithRole, responses=documented(400, 401, 403, 404)
)
def update_user(user_id: int, changes: UserUpdate, admin: AdminUser, session: SessionDep) -> User:
    """Deactivate or reactivate a user, or change their role: from their next request on."""
    check_other_user(user_id, admin)
    values = changes.model_dump(exclude_none=True)
    if values:
        session.exec(update(User).where(User.id == user_id).values(**values))
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "User not found")
    if not user.is_active:
        revoke_logins(session, Login.user_id == user.id)
    session.commit()
    return user


@app.delete("/users/{user_id}", status_code=204, responses=documented(400, 401, 403, 404))
def delete_user(user_id: int, admin: AdminUser, session: SessionDep) -> None:
    """Delete a user; their logins go with them (ON DELETE CASCADE)."""
    check_other_user(user_id, admin)
    deleted = session.exec(delete(User).where(User.id == user_id)).rowcount
    session.commit()
    if deleted == 0:
        raise HTTPException(404, "User not found")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="make-admin: give an account the admin role")
    parser.add_argument("command", choices=["make-admin"])
    parser.add_argument("email")
    email = normalize_email(parser.parse_args().email)
    create_tables()
    with engine.begin() as connection:
        found = connection.execute(
            update(User).where(User.email == email).values(role="admin")
        ).rowcount
    if found == 0:
        sys.exit(f"No account with the email {email!r}. Register it first (POST /auth/register).")
    print(f"{email} is now an admin. Log in again to get a token with the 'admin' scope.")

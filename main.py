"""FastAPI JWT authentication starter: one file to read top to bottom, then copy. The README reads it with you.

Chapter 1 is a complete app. Each later one adds a feature with its own tables, models, helpers and routes:
2. refresh and log out, 3. your account, 4. login throttling, 5. email links, 6. database outages, 7. admin.
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
import time
import unicodedata
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import httpx2
import jwt
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.starlette_client import OAuth
from fastapi import BackgroundTasks, Depends, FastAPI, Form, HTTPException, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from joserfc.errors import JoseError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    PositiveInt,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, Engine, UniqueConstraint, bindparam, case, event, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, insert, not_, select, update
from starlette.middleware.sessions import SessionMiddleware

BASE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("uvicorn.error")  # our messages appear alongside uvicorn's own


# === 1. A working JWT app: settings, users, passwords, register, log in, the access token, GET /users/me ==============


# --- Settings: environment variables, or a .env file beside this one --------------------------------------------------
class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")
    database_url: str = f"sqlite:///{BASE_DIR / 'app.db'}"
    secret_key: SecretStr = SecretStr("")  # unset: a key is generated once and kept in .secret_key
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_days: PositiveInt = 14  # a login's whole life; refreshing doesn't extend it
    reset_token_expire_minutes: PositiveInt = 30
    cors_origins: str = ""  # comma-separated origins of browser front ends allowed to call the API
    frontend_url: str = "http://localhost:8000"  # where the links in emails point
    smtp_host: str = ""  # unset: emails are written to the log instead of sent
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_tls: bool = True  # STARTTLS
    emails_from: str = "noreply@example.com"


def load_or_create_secret_key(path: Path) -> str:
    if not path.exists():
        try:  # a private (0600) temp file, linked into place: if another worker's link won, all read that key
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
        except OSError as error:  # e.g. a read-only file system
            sys.exit(f"No SECRET_KEY, and no key can be saved in {path.parent} ({error.strerror}): set SECRET_KEY.")
        with os.fdopen(fd, "w") as temp_file:
            temp_file.write(secrets.token_urlsafe(64))
        with contextlib.suppress(FileExistsError):
            os.link(temp_name, path)
        os.unlink(temp_name)
    key = path.read_text().strip()
    if len(key) < 32:
        sys.exit(f"{path} does not hold a usable key: delete it to generate a new one, or set SECRET_KEY.")
    log.warning("SECRET_KEY is not set: using the generated key saved in %s. Set SECRET_KEY in production.", path)
    return key


settings = Settings()
SECRET_KEY = settings.secret_key.get_secret_value()
if SECRET_KEY == "":
    SECRET_KEY = load_or_create_secret_key(BASE_DIR / ".secret_key")
if len(SECRET_KEY.encode()) < 32:
    sys.exit('SECRET_KEY must be at least 32 bytes long: python -c "import secrets; print(secrets.token_urlsafe(64))"')
ALGORITHM = "HS256"  # pinned: the algorithm named in a token's header is never trusted (RFC 8725)
ACCESS_TOKEN_SECONDS = settings.access_token_expire_minutes * 60
LOGIN_SECONDS = settings.refresh_token_expire_days * 24 * 3600
CORS_ORIGINS = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]


# --- The database: a route gets a Session through SessionDep; code outside a route takes a connection -----------------
def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite") and make_url(url).database in (None, "", ":memory:"):
        sys.exit("DATABASE_URL: an in-memory SQLite database is not shared between threads: use a file.")
    # 20 pooled connections: with SQLAlchemy's default of 5, each request past the fifth opens and closes its own.
    # hide_parameters: no token hash, id or email from a statement ever reaches an error message or a log.
    options = {"pool_size": 20, "max_overflow": 0, "hide_parameters": True}
    if not url.startswith("sqlite"):
        # pre_ping: a connection the server dropped (e.g. on a restart) is replaced as it leaves the pool.
        # connect_timeout: a server that doesn't answer at all is unavailable after 10 s, not TCP's 2 minutes.
        return create_engine(url, **options, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    # Requests use SQLite from several threads; a writer waits up to 30 s for another to finish. WAL: readers don't
    # wait for the writer. foreign_keys: SQLite leaves them off unless asked. A file never drops a connection.
    engine = create_engine(url, **options, connect_args={"check_same_thread": False, "timeout": 30})
    pragmas = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
    event.listen(engine, "connect", lambda dbapi_connection, _record: dbapi_connection.executescript(pragmas))
    return engine


engine = create_db_engine(settings.database_url)


def get_session() -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:  # what a route returns after a commit needs no new query
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # closed before the response goes out
# For routes that hash a password: only a few run at once; the others wait on the event loop, holding no thread.
HASHES_AT_ONCE = 2 * (os.cpu_count() or 1)
HashingSessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=HASHES_AT_ONCE)]


# --- Tables: a user, and a login (one device's sign-in, which every access token names) -------------------------------
ROLE_SCOPES = {"user": ["me"], "admin": ["me", "admin"]}  # a token's scopes count only while its user's role has them
MAX_ID = 2**31 - 1  # ids are INTEGER, 32 bits on PostgreSQL: a larger number is nobody's id


class User(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}  # a deleted user's id is never given to someone new
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=254)  # stored trimmed and lower-cased
    hashed_password: str
    is_active: bool = True
    is_verified: bool = False  # the user followed the link we emailed (chapter 5)
    role: str = "user"  # a key of ROLE_SCOPES


class Login(SQLModel, table=True):  # one sign-in on one device: ending it ends all its tokens at once
    id: str = Field(default_factory=lambda: secrets.token_hex(16), primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", index=True)
    scopes: str  # granted when logging in, space-separated; refreshing never widens them
    user_agent: str = ""
    created_at: float = Field(default_factory=time.time)  # Unix time, as in JWTs: no time zone to get wrong
    last_used_at: float = Field(default_factory=time.time)  # its latest refresh (chapter 2)
    expires_at: float = Field(default_factory=lambda: time.time() + LOGIN_SECONDS)  # refreshing never extends it
    revoked: bool = False  # by logout, a replayed refresh token, a new password or deactivation
    refresh_count: int = 0  # the number its newest refresh token carries (chapter 2)
    retry_from: int = 0  # the oldest used refresh token that may still be retried (chapter 2)


# The one condition every use of a login checks. `now` is read each time a statement runs.
LOGIN_IS_LIVE = not_(Login.revoked) & (Login.expires_at > bindparam("now", callable_=time.time))


def create_tables() -> None:  # workers start at once: one takes the database's lock and creates the tables
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        SQLModel.metadata.create_all(connection)


# --- Passwords: argon2id, hashed on a small pool of threads of its own ------------------------------------------------
password_hasher = PasswordHasher(memory_cost=19 * 1024, time_cost=3, parallelism=1)  # OWASP's minimum, plus a pass
# Slow on purpose (tens of ms, 19 MiB): a thread per core bounds CPU and memory; nice(): requests go first.
hash_pool = ThreadPoolExecutor(
    os.cpu_count() or 1, "argon2", initializer=os.nice if sys.platform == "linux" else None, initargs=(10,)
)
DUMMY_HASH = password_hasher.hash(secrets.token_urlsafe(16))  # checked for unknown emails: as slow as a wrong password


def hash_password(password: str) -> str:
    # NFKC: the same password typed on different devices gives the same bytes (NIST SP 800-63B).
    return hash_pool.submit(password_hasher.hash, unicodedata.normalize("NFKC", password)).result()


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return hash_pool.submit(password_hasher.verify, password_hash, unicodedata.normalize("NFKC", password)).result()
    except (VerificationError, InvalidHashError):
        return False


def is_weaker_than_ours(password_hash: str) -> bool:
    """Rehash at login only to upgrade: not argon2id, less memory, or less memory x passes (OWASP's settings trade
    memory for passes)."""
    stored, ours = extract_parameters(password_hash), password_hasher
    if stored.type != Type.ID or stored.memory_cost < ours.memory_cost:
        return True
    return stored.memory_cost * stored.time_cost < ours.memory_cost * ours.time_cost


def sha256(token: str) -> str:  # for long random tokens (and for emails in chapter 4): fast, and can't be reversed
    return hashlib.sha256(token.encode()).hexdigest()


# --- Request and response models: each lists its fields, so a password hash can never leak into an answer -------------
def normalize_email(email: str) -> str:  # NFC, as the email validator stores it: "ä" matches however it was typed
    return unicodedata.normalize("NFC", email.strip().lower())


Email = Annotated[EmailStr, BeforeValidator(lambda value: normalize_email(value) if isinstance(value, str) else value)]
NewPassword = Annotated[str, Field(min_length=8, max_length=128)]  # length makes it strong: no composition rules
Password = Annotated[str, Field(max_length=128)]  # a longer one is refused before any hashing
Token = Annotated[str, Field(min_length=1, max_length=512)]


class UserCreate(SQLModel):
    email: Email
    password: NewPassword


class UserPublic(SQLModel):  # what the API shows of a user
    id: int
    email: str
    is_active: bool
    is_verified: bool


class TokenForm(SQLModel):  # the token endpoint's form: the password grant or the refresh grant (RFC 6749)
    grant_type: str = "password"  # absent means password, as the Authorize button in /docs sends it
    username: str | None = None  # the email
    password: Password | None = None
    refresh_token: Token | None = None  # none: a browser's is in its cookie (chapter 2)
    scope: str = ""  # space-separated; asking can narrow what is granted, never widen it (RFC 6749 §3.3)

    @model_validator(mode="after")
    def has_the_fields_of_the_password_grant(self) -> "TokenForm":
        if self.grant_type == "password" and (self.username is None or self.password is None):
            raise ValueError("grant_type=password needs username and password")
        return self


class TokenResponse(SQLModel):
    access_token: str
    refresh_token: str | None = None  # left out for a browser: it gets its refresh token in a cookie (chapter 2)
    token_type: str = "bearer"
    expires_in: int = ACCESS_TOKEN_SECONDS  # seconds until the access token expires
    scope: str  # the scopes granted, space-separated


class ErrorMessage(SQLModel):  # every error; the token endpoints add RFC 6749's `error` and `error_description`
    detail: str


def errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:  # for the OpenAPI document; FastAPI adds 422
    return {code: {"model": ErrorMessage} for code in status_codes}


# --- The app, and its answers to errors -------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        create_tables()
    except SQLAlchemyError as error:  # the database is down: start anyway, and answer 503 until it is back
        log_unless_a_bug(error, "at start-up (tables not checked)")
    yield


app = FastAPI(title="FastAPI JWT auth starter", lifespan=lifespan)


class OAuth2Error(HTTPException):  # an error of the token endpoints: RFC 6749 §5.2's `error` code goes beside `detail`
    def __init__(self, error: str, detail: str, status_code: int = 401, headers: dict[str, str] | None = None) -> None:
        if status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        super().__init__(status_code, detail, headers)
        self.error = error


@app.exception_handler(OAuth2Error)
async def oauth2_error_handler(request: Request, exc: OAuth2Error) -> JSONResponse:
    body = {"detail": exc.detail, "error": exc.error, "error_description": exc.detail}
    return JSONResponse(body, exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default handler echoes the rejected input back, and that input may be a password.
    problems = [{key: value for key, value in error.items() if key not in ("input", "ctx")} for error in exc.errors()]
    description = "; ".join(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in problems)
    return JSONResponse({"detail": problems, "error": "invalid_request", "error_description": description}, 422)


# --- Register and log in ----------------------------------------------------------------------------------------------
# The rule for every route: one that uses the database is a plain `def` with a SessionDep, run in FastAPI's thread pool,
# so the event loop never waits for it. It holds a connection only while its thread works (it commits, or closes the
# session, before it returns or hashes): else requests holding connections could wait for threads that wait for them.
@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastAPI JWT auth starter. Try the API at /docs"}


@app.post("/auth/register", status_code=201, response_model=UserPublic, tags=["auth"], responses=errors(400, 409, 503))
def register(user_in: UserCreate, session: HashingSessionDep, background_tasks: BackgroundTasks) -> User:
    """Create an account, and email it a link to verify its address (chapter 5)."""
    user = User(email=user_in.email, hashed_password=hash_password(user_in.password))
    session.add(user)
    try:
        session.commit()
    except IntegrityError:  # the unique email index: also right when two sign-ups race
        raise HTTPException(409, "An account with this email already exists") from None
    background_tasks.add_task(email_link, user.email, "verify")  # after the response: mail never slows it
    return user


@app.post("/auth/login", tags=["auth"], responses=errors(400, 401, 403, 429, 503), response_model_exclude_none=True)
def log_in(
    form: Annotated[TokenForm, Form()], request: Request, response: Response, session: HashingSessionDep
) -> TokenResponse:
    """The OAuth2 token endpoint: the password grant (`username` is the email), or the refresh grant (chapter 2)."""
    browser = is_from_browser(request)  # first: a foreign page's login is refused before any work (chapter 2)
    if form.grant_type == "refresh_token":
        refresh_token = presented_refresh_token(request, form.refresh_token, browser)
        return rotate_refresh_token(session, response, refresh_token, form.scope, browser)
    if form.grant_type != "password":
        raise OAuth2Error("unsupported_grant_type", "grant_type must be password or refresh_token", 400)
    user = authenticate(session, normalize_email(form.username), form.password, client_address(request))
    if user is None:
        raise OAuth2Error("invalid_grant", "Incorrect email or password")
    if not user.is_active:
        raise OAuth2Error("invalid_grant", "This account has been deactivated", 403)
    login = start_login(session, user, form.scope, request)
    return issue_tokens(session, response, login, login.scopes.split(), browser)


def start_login(session: Session, user: User, asked: str, request: Request) -> Login:
    """A new login of the user, with the scopes its role grants, narrowed to those asked for."""
    # Forget the user's finished logins (their tokens go with them), so the table doesn't grow forever.
    session.exec(delete(Login).where(Login.user_id == user.id, Login.expires_at <= time.time()))
    scopes = granted_scopes(ROLE_SCOPES.get(user.role, []), user.role, asked)
    user_agent = request.headers.get("user-agent", "")[:200]
    login = Login(user_id=user.id, scopes=" ".join(scopes), user_agent=user_agent)
    session.add(login)
    return login


def authenticate(session: Session, email: str, password: str, client: str) -> User | None:
    """The user with this email and password, or None. Throttled (chapter 4): 429 after too many failures, before any
    hashing. It closes the session first, so no connection is held while the password is hashed."""
    check_login_throttle(session, email, client)
    user = None
    if "\x00" not in email:  # no stored email holds a NUL, and PostgreSQL can't compare one
        user = session.exec(select(User).where(User.email == email)).first()
    session.close()
    password_hash = user.hashed_password if user else DUMMY_HASH  # unknown: as slow as a wrong password
    password_ok = verify_password(password, password_hash)
    if password_ok and is_weaker_than_ours(password_hash):
        password_hash = hash_password(password)  # upgraded now, while no connection is held
    check_login_throttle(session, email, client)  # again: parallel guesses all passed the first check
    if user is None or not password_ok:
        record_failed_login(session, email, client)
        return None
    forget_failed_logins(session, email, client)
    if password_hash != user.hashed_password:
        session.exec(update(User).where(User.id == user.id).values(hashed_password=password_hash))
    session.commit()
    return user


def granted_scopes(held: list[str], role: str, asked: str) -> list[str]:
    """The held scopes that the role still has (a demoted admin loses `admin`), narrowed to those asked for."""
    return [scope for scope in held if scope in ROLE_SCOPES.get(role, []) and (asked == "" or scope in asked.split())]


def issue_tokens(session: Session, response: Response, login: Login, scopes: list[str], browser: bool) -> TokenResponse:
    """Commit, and answer with the login's newest refresh token (chapter 2) and a new access token."""
    session.commit()
    refresh_token = create_refresh_token(login)
    response.headers["Cache-Control"] = "no-store"  # tokens must never be cached (RFC 6749 §5.1)
    if browser:
        set_refresh_cookie(response, refresh_token, int(login.expires_at - time.time()))
        refresh_token = None
    access_token = create_access_token(login, scopes)
    return TokenResponse(access_token=access_token, refresh_token=refresh_token, scope=" ".join(scopes))


# --- The access token: a JWT that names its login, which must still be live at every request --------------------------
class AccessTokenClaims(SQLModel):
    sub: int = Field(gt=0, le=MAX_ID)  # the user id
    sid: str  # the login: the token works only while it is live
    type: Literal["access"]  # so no other kind of token can pass for an access token
    scope: str


ClaimsT = TypeVar("ClaimsT", bound=SQLModel)


def decode_token(token: str, claims_model: type[ClaimsT]) -> ClaimsT | None:
    """The claims of a token this API signed, unexpired and of this kind (its `type`), or None."""
    try:
        payload = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM], options={"require": ["exp", "iat"]})
        return claims_model.model_validate(payload)
    except (jwt.InvalidTokenError, ValidationError):  # forged, expired, or another kind of token
        return None


def create_access_token(login: Login, scopes: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": str(login.user_id), "sid": login.id, "type": "access", "scope": " ".join(scopes), "iat": now}
    claims |= {"exp": now + ACCESS_TOKEN_SECONDS, "jti": secrets.token_hex(8)}  # jti: every token is unique
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


class SignedInUser(UserPublic):  # who is calling, through which login
    role: str
    login_id: str


oauth2_scheme = OAuth2PasswordBearer(tokenUrl="auth/login", scopes={"me": "Your account.", "admin": "All users."})
# Built once, as it runs on every authenticated request: the user (not the hash), if this login is live.
SELECT_SIGNED_IN_USER = (
    select(User.id, User.email, User.is_active, User.is_verified, User.role, Login.id.label("login_id"))
    .join(Login)
    .where(User.id == bindparam("user_id"), Login.id == bindparam("login_id"), User.is_active, LOGIN_IS_LIVE)
)


def get_current_user(security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]) -> SignedInUser:
    """The user behind a valid access token, read fresh so that logout, deactivation and demotion apply at once."""
    row = None
    claims = decode_token(token, AccessTokenClaims)
    if claims is not None:
        with engine.connect() as connection:  # outside a route: a connection of its own, back before the route runs
            row = connection.execute(SELECT_SIGNED_IN_USER, {"user_id": claims.sub, "login_id": claims.sid}).first()
    if row is None:
        raise HTTPException(401, "Could not validate credentials", headers={"WWW-Authenticate": "Bearer"})
    user = SignedInUser.model_validate(row, from_attributes=True)
    # The route's scopes must be granted in the token and still held by the user's role.
    if not set(security_scopes.scopes) <= set(claims.scope.split()) & set(ROLE_SCOPES.get(user.role, [])):
        needed = security_scopes.scope_str
        detail = f"Not enough permissions: this needs the scope '{needed}'"
        raise HTTPException(403, detail, {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'})
    return user


CurrentUser = Annotated[SignedInUser, Security(get_current_user, scopes=["me"])]


@app.get("/users/me", tags=["account"], responses=errors(401, 403, 503))
async def read_me(user: CurrentUser) -> UserPublic:
    """Your account."""
    return user


# === 2. Refresh and log out: refresh tokens that rotate, a grace window for retries, the browser's cookie =============
REFRESH_GRACE_SECONDS = 30  # a used refresh token still works this long after the login's latest refresh
REFRESH_COOKIE = "__Host-refresh_token"  # __Host-: only this host sets it, for every path (no sibling can shadow it)


class RefreshTokenClaims(SQLModel):  # nothing is stored: the login's row alone decides whether it works
    sid: str  # the login
    n: int  # the login's refresh_count when it was issued: only the newest one rotates
    type: Literal["refresh"]


class RefreshRequest(SQLModel):
    refresh_token: Token | None = None  # none: a browser's is in its cookie


NO_BODY = RefreshRequest()  # a browser may send no body at all


def create_refresh_token(login: Login) -> str:
    """The login's newest refresh token. The same login and count always give the same token: a retry gets it too."""
    claims = {"sid": login.id, "n": login.refresh_count, "type": "refresh", "iat": int(login.created_at)}
    return jwt.encode(claims | {"exp": int(login.expires_at)}, SECRET_KEY, algorithm=ALGORITHM)


def rotate_refresh_token(
    session: Session, response: Response, refresh_token: str | None, asked: str, browser: bool
) -> TokenResponse:
    """New tokens for the refresh token's login. Each refresh token works once (rotation); a used one works again
    until REFRESH_GRACE_SECONDS after the login's latest refresh, and gets the same newest token: a lost answer, a
    retry or a second tab never log anyone out, and a login never has two chains of tokens."""
    if refresh_token is None:  # in neither the body nor a cookie: as when a required field is missing (RFC 6749 §5.2)
        raise RequestValidationError([{"type": "missing", "loc": ("body", "refresh_token"), "msg": "Field required"}])
    claims = decode_token(refresh_token, RefreshTokenClaims)
    if claims is None:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    now = time.time()
    # The newest token moves the login on. One UPDATE: of two requests racing with it, the second finds it used.
    # A refresh more than the window after the last starts a new run: older tokens can no longer be retried.
    retry_from = case((Login.last_used_at < now - REFRESH_GRACE_SECONDS, claims.n), else_=Login.retry_from)
    newest = update(Login).where(Login.id == claims.sid, Login.refresh_count == claims.n)
    session.exec(newest.values(refresh_count=claims.n + 1, retry_from=retry_from, last_used_at=now))
    statement = select(Login, User).join(User).where(Login.id == claims.sid, LOGIN_IS_LIVE, User.is_active)
    live = session.exec(statement).first()
    if live is None:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    login, user = live
    if claims.n < login.retry_from or now - login.last_used_at > REFRESH_GRACE_SECONDS:
        # A used token came back later: from a thief, or from the client after a thief. End the login (RFC 9700).
        end_logins(session, Login.id == login.id)
        session.commit()
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    return issue_tokens(session, response, login, granted_scopes(login.scopes.split(), user.role, asked), browser)


def end_logins(session: Session, *where: ColumnElement[bool]) -> int:
    """End the logins that match: their refresh and access tokens stop working at once. How many ended."""
    return session.exec(update(Login).where(not_(Login.revoked), *where).values(revoked=True)).rowcount


# --- Browsers: the refresh token in a cookie no script can read, and an Origin check so no other page can use it ------
if CORS_ORIGINS:  # unset: only pages served from this API's own origin may call it from a browser
    app.add_middleware(
        CORSMiddleware,
        allow_origins=CORS_ORIGINS,
        allow_credentials=True,  # the refresh token cookie
        allow_methods=["*"],
        allow_headers=["Authorization", "Content-Type"],
    )


def is_from_browser(request: Request) -> bool:
    """Browsers send an Origin with every POST; curl, Authlib and mobile apps don't. 403 from an origin that is neither
    the API's nor in CORS_ORIGINS: a page elsewhere may neither use the cookie nor plant its own (login CSRF)."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin != f"{request.url.scheme}://{request.url.netloc}" and origin not in CORS_ORIGINS:
        raise OAuth2Error("access_denied", f"Requests from the origin {origin!r} are not allowed here", 403)
    return True


def presented_refresh_token(request: Request, in_body: str | None, browser: bool) -> str | None:
    """The refresh token in the body, or else the cookie, which only a page at an allowed origin may use (CSRF)."""
    # Two cookies of one name: one was planted, by a page on a sibling host that can't set ours (__Host-).
    cookie_names = [pair.split("=")[0].strip() for pair in ";".join(request.headers.getlist("cookie")).split(";")]
    if cookie_names.count(REFRESH_COOKIE) > 1:
        raise OAuth2Error("invalid_request", f"The {REFRESH_COOKIE} cookie was sent twice: log in again", 400)
    if in_body is not None:
        return in_body
    in_cookie = request.cookies.get(REFRESH_COOKIE)
    if in_cookie is not None and not browser:
        raise OAuth2Error("access_denied", "The refresh token cookie is taken only from an allowed Origin", 403)
    return in_cookie


def set_refresh_cookie(response: Response, refresh_token: str, max_age: int) -> None:
    # HttpOnly: no script reads it. Secure: HTTPS only. Strict: no other site's page sends it. Path=/: as __Host- needs.
    cookie = f"{REFRESH_COOKIE}={refresh_token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age}"
    response.headers.append("Set-Cookie", cookie)


@app.post("/auth/refresh", tags=["auth"], responses=errors(400, 401, 403, 503), response_model_exclude_none=True)
def refresh(request: Request, response: Response, session: SessionDep, body: RefreshRequest = NO_BODY) -> TokenResponse:
    """Trade a refresh token (in the body, or a browser's cookie) for new tokens. The old one is used up."""
    browser = is_from_browser(request)
    refresh_token = presented_refresh_token(request, body.refresh_token, browser)
    return rotate_refresh_token(session, response, refresh_token, "", browser)


@app.post("/auth/logout", status_code=204, tags=["auth"], responses=errors(400, 403, 503))
def log_out(request: Request, response: Response, session: SessionDep, body: RefreshRequest = NO_BODY) -> None:
    """End the refresh token's login and its access tokens. An unknown token, or none, is fine (RFC 7009)."""
    browser = is_from_browser(request)
    refresh_token = presented_refresh_token(request, body.refresh_token, browser)
    if browser:
        set_refresh_cookie(response, "", 0)  # the browser forgets it
    if refresh_token is None:
        return
    claims = decode_token(refresh_token, RefreshTokenClaims)
    if claims is not None:
        end_logins(session, Login.id == claims.sid)
        session.commit()


# === 3. Your account: your logins (the API calls them sessions), change your password, delete your account ============
class LoginInfo(SQLModel):
    id: str
    created_at: datetime
    last_used_at: datetime
    user_agent: str
    current: bool  # the login of the token this request came with


class PasswordChange(SQLModel):
    current_password: Password
    new_password: NewPassword


class PasswordConfirmation(SQLModel):
    password: Password


@app.get("/auth/sessions", tags=["account"], responses=errors(401, 403, 503))
def list_logins(user: CurrentUser, session: SessionDep) -> list[LoginInfo]:
    """Your live logins, newest first."""
    statement = select(Login).where(Login.user_id == user.id, LOGIN_IS_LIVE).order_by(Login.created_at.desc())
    logins = session.exec(statement).all()
    session.close()
    return [LoginInfo(**login.model_dump(), current=login.id == user.login_id) for login in logins]


@app.delete("/auth/sessions/{login_id}", status_code=204, tags=["account"], responses=errors(401, 403, 404, 503))
def end_login(login_id: str, user: CurrentUser, session: SessionDep) -> None:
    """Log out one of your logins (see GET /auth/sessions), at once."""
    ended = 0
    if "\x00" not in login_id:  # no id holds a NUL, and PostgreSQL can't compare one
        ended = end_logins(session, Login.id == login_id, Login.user_id == user.id, LOGIN_IS_LIVE)
    session.commit()
    if ended == 0:
        raise HTTPException(404, "Session not found")


@app.delete("/auth/sessions", status_code=204, tags=["account"], responses=errors(401, 403, 503))
def end_all_logins(user: CurrentUser, session: SessionDep) -> None:
    """Log out everywhere, this login included."""
    end_logins(session, Login.user_id == user.id)
    session.commit()


@app.post("/auth/change-password", status_code=204, tags=["account"], responses=errors(400, 401, 403, 429, 503))
def change_password(body: PasswordChange, user: CurrentUser, request: Request, session: HashingSessionDep) -> None:
    """Change your password. Your other logins end at once; this one goes on."""
    check_password(session, user, body.current_password, request)
    set_password(session, user.id, hash_password(body.new_password), keep_login=user.login_id)
    session.commit()


@app.delete("/users/me", status_code=204, tags=["account"], responses=errors(400, 401, 403, 429, 503))
def delete_me(body: PasswordConfirmation, user: CurrentUser, request: Request, session: HashingSessionDep) -> None:
    """Delete your account, with all its logins. Your email can sign up again afterwards."""
    check_password(session, user, body.password, request)
    session.exec(delete(User).where(User.id == user.id))
    session.commit()


def check_password(session: Session, user: SignedInUser, password: str, request: Request) -> None:
    """400 unless this is the user's password. Throttled as a login is: a stolen access token can't guess it."""
    if authenticate(session, user.email, password, client_address(request)) is None:
        raise HTTPException(400, "The password is not correct")


def set_password(session: Session, user_id: int, password_hash: str, keep_login: str | None = None) -> None:
    """Store a new password. Every login but `keep_login` ends, and so does a pending reset link (chapter 5)."""
    session.exec(update(User).where(User.id == user_id).values(hashed_password=password_hash))
    session.exec(delete(EmailLink).where(EmailLink.user_id == user_id, EmailLink.purpose == "reset"))
    end_logins(session, Login.user_id == user_id, Login.id != keep_login)


# === 4. Login throttling: failed logins are counted for a while, to slow down password guessing (OWASP ASVS 2.2.1) ====
MAX_FAILURES_PER_EMAIL, MAX_FAILURES_PER_CLIENT, FAILURE_WINDOW = 5, 50, 15 * 60  # from one client address, in 15 min


class LoginFailure(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    client_hash: str = Field(index=True)  # SHA-256 of the client's address: bounded, whatever a proxy forwards
    email_hash: str  # SHA-256 of the email tried: no need to store what strangers typed
    failed_at: float = Field(default_factory=time.time, index=True)


def check_login_throttle(session: Session, email: str, client: str) -> None:
    """429 while this client has failed too often at this email, or at any. Another client can still log in."""
    email_hash = sha256(email)
    recent = select(LoginFailure.email_hash, LoginFailure.failed_at).where(
        LoginFailure.client_hash == sha256(client), LoginFailure.failed_at > time.time() - FAILURE_WINDOW
    )
    if client == "":  # no known address (a Unix socket): callers aren't one client, so only the email's limit counts
        recent = recent.where(LoginFailure.email_hash == email_hash)
    failures = session.exec(recent.order_by(LoginFailure.failed_at.desc()).limit(MAX_FAILURES_PER_CLIENT)).all()
    at_this_email = [failure for failure in failures if failure.email_hash == email_hash]
    # The client may try again once its limit-th latest failure leaves the window; the email's limit ends last.
    for recent_failures, limit in ((at_this_email, MAX_FAILURES_PER_EMAIL), (failures, MAX_FAILURES_PER_CLIENT)):
        if len(recent_failures) >= limit:
            seconds = str(math.ceil(recent_failures[limit - 1].failed_at + FAILURE_WINDOW - time.time()))
            detail = f"Too many failed logins: try again in {seconds} s"
            raise OAuth2Error("temporarily_unavailable", detail, 429, {"Retry-After": seconds})


def client_address(request: Request) -> str:  # what throttling counts failures by; "" when unknown
    return request.client.host if request.client else ""


def record_failed_login(session: Session, email: str, client: str) -> None:
    session.add(LoginFailure(client_hash=sha256(client), email_hash=sha256(email)))
    session.exec(delete(LoginFailure).where(LoginFailure.failed_at < time.time() - FAILURE_WINDOW))  # old ones go
    session.commit()


def forget_failed_logins(session: Session, email: str, client: str) -> None:  # after the right password
    failures = delete(LoginFailure).where(LoginFailure.client_hash == sha256(client))
    session.exec(failures.where(LoginFailure.email_hash == sha256(email)))


# === 5. Email links: reset a forgotten password, verify an address. One-time, short-lived, stored hashed ==============
class EmailLink(SQLModel, table=True):  # the latest one-time link of each kind emailed to a user, until used
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", primary_key=True)
    purpose: str = Field(primary_key=True)  # "reset" or "verify"
    token_hash: str = Field(unique=True)  # SHA-256 of the token in the link
    created_at: float
    expires_at: float


LINKS = {  # purpose: (page of the link, subject, minutes it works)
    "reset": ("reset-password", "Reset your password", settings.reset_token_expire_minutes),
    "verify": ("verify-email", "Verify your email address", 2 * 24 * 60),
}
EMAIL_ON_ITS_WAY = {"message": "If an account has this address, an email is on its way."}  # whether it has or not


class EmailRequest(SQLModel):
    email: Email


class LinkToken(SQLModel):
    token: Token


class PasswordReset(LinkToken):
    new_password: NewPassword


def email_link(email: str, purpose: Literal["reset", "verify"]) -> None:
    """Email an active user a one-time link, at most one of each kind a minute. Runs after the response: the answer
    takes as long whether or not the account exists, and a slow mail server never slows a request."""
    token, now = secrets.token_urlsafe(32), time.time()
    page, subject, minutes = LINKS[purpose]
    try:
        with engine.begin() as connection:  # outside a route: a connection of its own, committed at the end
            active = select(User.id, User.is_verified).where(User.email == email, User.is_active)
            user = connection.execute(active).first()
            if user is None or (purpose == "verify" and user.is_verified):
                return
            # The last link goes once it is a minute old; a newer one left in place makes the primary key refuse this.
            old = delete(EmailLink).where(EmailLink.user_id == user.id, EmailLink.purpose == purpose)
            connection.execute(old.where(EmailLink.created_at < now - 60))
            link = {"token_hash": sha256(token), "created_at": now, "expires_at": now + minutes * 60}
            connection.execute(insert(EmailLink).values(user_id=user.id, purpose=purpose, **link))
    except IntegrityError:  # one is already on its way, maybe from a request racing this one
        return
    except SQLAlchemyError as error:  # after the response there is no one to answer 503 to: one log line instead
        log_unless_a_bug(error, f"(no {purpose} email sent)")
        return
    body = f"{subject}: {settings.frontend_url}/{page}?token={token}\n\nThe link works once, within {minutes} minutes."
    send_email(email, subject, body + " Not you? Ignore this email.")


def send_email(to: str, subject: str, body: str) -> None:
    """Send a plain-text email, or with no SMTP_HOST, write it to the log. A failure is logged, not raised."""
    if not settings.smtp_host:
        log.warning("SMTP_HOST is not set, so this email was not sent:\nTo: %s\nSubject: %s\n\n%s", to, subject, body)
        return
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = settings.emails_from, to, subject
    message.set_content(body)
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
            if settings.smtp_tls:  # the default context checks the server's certificate and name (SSL_CERT_FILE works)
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                smtp.login(settings.smtp_user, settings.smtp_password.get_secret_value())
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as error:  # TLS errors are OSErrors: no mail, and no password, went out
        log.error("Could not send an email to %s: %s", to, error)


def use_link(session: Session, token: str, purpose: str) -> int:
    """Use up a one-time link: the id of the user it was emailed to. 400 if it is invalid, used or expired."""
    link = delete(EmailLink).where(
        EmailLink.token_hash == sha256(token), EmailLink.purpose == purpose, EmailLink.expires_at > time.time()
    )
    user_id = session.exec(link.returning(EmailLink.user_id)).scalar()  # deleted as it is read: it works once
    if user_id is None:
        raise HTTPException(400, "This link is invalid, used or expired: ask for a new one")
    return user_id


@app.post("/auth/forgot-password", status_code=202, tags=["email"], responses=errors(400))
async def forgot_password(body: EmailRequest, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Email a link to reset the password, if an active account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "reset")
    return EMAIL_ON_ITS_WAY


@app.post("/auth/reset-password", status_code=204, tags=["email"], responses=errors(400, 503))
def reset_password(body: PasswordReset, session: HashingSessionDep) -> None:
    """Set a new password with the token from the reset email. Every login of the account ends."""
    user_id = use_link(session, body.token, "reset")
    session.commit()  # the link is used up before the slow hash, so two requests can't both use it
    set_password(session, user_id, hash_password(body.new_password))
    session.commit()


@app.post("/auth/verify-email", status_code=204, tags=["email"], responses=errors(400, 503))
def verify_email(body: LinkToken, session: SessionDep) -> None:
    """Mark the address verified, with the token from the verification email."""
    user_id = use_link(session, body.token, "verify")
    session.exec(update(User).where(User.id == user_id).values(is_verified=True))
    session.commit()


@app.post("/auth/verify-email/resend", status_code=202, tags=["email"], responses=errors(400))
async def resend_verification_email(body: EmailRequest, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Email a new verification link, if an unverified account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "verify")
    return EMAIL_ON_ITS_WAY


async def get_verified_user(user: CurrentUser) -> SignedInUser:
    if not user.is_verified:
        raise HTTPException(403, "Verify your email address first")
    return user


VerifiedUser = Annotated[SignedInUser, Depends(get_verified_user)]  # for your routes that need a verified email


# === 6. When the database is unavailable: 503 and Retry-After, never a 500 ============================================
DATABASE_RETRY_SECONDS = 5  # the Retry-After of a 503 while the database is unavailable


# PostgreSQL's SQLSTATEs worth a retry: connection failures, too many connections or out of resources, shutdowns and
# cancelled statements, serialization failures and deadlocks. A value too long or a missing column is a bug.
RETRY_SQLSTATES = ("08", "53", "57", "40001", "40P01")


def is_database_unavailable(error: SQLAlchemyError) -> bool:
    """Down, restarting, overloaded or busy: worth a retry. A bad statement is a bug, decided by the error's code."""
    if isinstance(error, PoolTimeoutError):  # every pooled connection stayed busy
        return True
    if not isinstance(error, OperationalError):
        return False
    sqlite_error = getattr(error.orig, "sqlite_errorname", None)
    if sqlite_error is not None:  # SQLite: busy, locked, can't open, I/O; its generic error is a bad statement
        return sqlite_error != "SQLITE_ERROR"
    sqlstate = getattr(error.orig, "sqlstate", None)  # None: no server answered
    return sqlstate is None or sqlstate.startswith(RETRY_SQLSTATES)


def log_unless_a_bug(error: SQLAlchemyError, what: str) -> None:
    """One log line, with no traceback or parameters, while the database is unavailable; a bug is raised again."""
    if not is_database_unavailable(error):
        raise error  # a 500, with its traceback in the log
    log.error("Database unavailable %s: %s", what, str(error).splitlines()[0])


@app.exception_handler(SQLAlchemyError)
async def database_error_handler(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log_unless_a_bug(exc, "(answered 503)")
    retry_after = {"Retry-After": str(DATABASE_RETRY_SECONDS)}
    error = OAuth2Error("temporarily_unavailable", "The database is unavailable: try again shortly", 503, retry_after)
    return await oauth2_error_handler(request, error)


# === 7. Admin: scopes by role, routes to manage users, and `python main.py make-admin EMAIL` ==========================
MAX_PAGE_SIZE = 100
AdminUser = Annotated[SignedInUser, Security(get_current_user, scopes=["admin"])]


class UserWithRole(UserPublic):  # what admins see of users
    role: str


class UserUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # a typo must not look like a successful change
    is_active: bool | None = None
    role: Literal["user", "admin"] | None = None


@app.get("/users", response_model=list[UserWithRole], tags=["admin"], responses=errors(401, 403, 503))
def list_users(
    admin: AdminUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, description="100 at most")] = MAX_PAGE_SIZE,
) -> list[User]:
    """All users, a page at a time."""
    users = session.exec(select(User).order_by(User.id).offset(offset).limit(min(limit, MAX_PAGE_SIZE))).all()
    session.close()
    return list(users)


@app.patch("/users/{user_id}", response_model=UserWithRole, tags=["admin"], responses=errors(400, 401, 403, 404, 503))
def update_user(user_id: int, changes: UserUpdate, admin: AdminUser, session: SessionDep) -> User:
    """Deactivate or reactivate a user, or change their role. Takes effect on their very next request."""
    check_other_user(user_id, admin)
    values = changes.model_dump(exclude_none=True)
    if values:
        session.exec(update(User).where(User.id == user_id).values(**values))
    user = session.exec(select(User).where(User.id == user_id)).first()
    if user is None:
        raise HTTPException(404, "User not found")
    if not user.is_active:
        end_logins(session, Login.user_id == user.id)
    session.commit()
    return user


@app.delete("/users/{user_id}", status_code=204, tags=["admin"], responses=errors(400, 401, 403, 404, 503))
def delete_user(user_id: int, admin: AdminUser, session: SessionDep) -> None:
    """Delete a user; their logins and tokens go with them (ON DELETE CASCADE)."""
    check_other_user(user_id, admin)
    deleted = session.exec(delete(User).where(User.id == user_id)).rowcount
    session.commit()
    if deleted == 0:
        raise HTTPException(404, "User not found")


def check_other_user(user_id: int, admin: SignedInUser) -> None:
    if not 0 < user_id <= MAX_ID:
        raise HTTPException(404, "User not found")
    if user_id == admin.id:  # here, one wrong click would lock this admin out (make-admin below undoes that)
        raise HTTPException(400, "Admins cannot change or delete their own account here")


# === 8. Sign in with Google, Microsoft, GitLab or any OpenID Connect provider (needs 2) =============================
class OidcProvider(BaseModel):
    issuer: str  # as its discovery document says, e.g. https://accounts.google.com
    client_id: str
    client_secret: SecretStr
    trust_email: bool = False  # true: take its emails as verified, for a provider that never says (Microsoft)


class OidcSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")
    oidc_providers: dict[str, OidcProvider] = {}  # JSON: {"google": {"issuer": ..., "client_id": ..., ...}}


OIDC_PROVIDERS = OidcSettings().oidc_providers
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
    # A sign-in's state, nonce and PKCE verifier wait in a signed cookie of the browser that started it, 10 minutes.
    # Lax, not Strict: the provider's redirect back is a cross-site navigation, which Strict cookies miss.
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
    subject: str = Field(primary_key=True)  # the ID token's `sub`, which never changes (the email may)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE")


class IdTokenClaims(SQLModel):  # what we use of the provider's ID token
    sub: str = Field(max_length=255)
    email: Email | None = None
    email_verified: bool = False


class SignInError(Exception):  # its one argument is the ?error= code the front end gets
    pass


def oidc_client(name: str) -> Any:
    if name not in OIDC_PROVIDERS:
        raise HTTPException(404, f"No sign-in provider named {name!r}")
    return oauth.create_client(name)


def sign_in_failed(name: str, code: str, error: Exception) -> RedirectResponse:
    log.warning("Sign-in with %s failed (%s): %s", name, code, error)
    return RedirectResponse(f"{settings.frontend_url}?error={code}", 303)


def sign_in_with_provider(name: str, claims: IdTokenClaims, request: Request) -> Login:
    """Start a login of the user the provider's account belongs to: found by its subject, or else by its email."""
    with Session(engine, expire_on_commit=False) as session:  # outside a route: in a thread of its own
        accounts = select(User).join(ProviderAccount).where(ProviderAccount.provider == name)
        user = session.exec(accounts.where(ProviderAccount.subject == claims.sub)).first()
        if user is None:
            user = link_user(session, name, claims)
        if not user.is_active:
            raise SignInError("account_deactivated")
        login = start_login(session, user, "", request)
        session.commit()
        return login


def link_user(session: Session, name: str, claims: IdTokenClaims) -> User:
    """A first sign-in: the user with the provider's email, if the provider verified it, or a new user."""
    if claims.email is None or not (claims.email_verified or OIDC_PROVIDERS[name].trust_email):
        raise SignInError("email_not_verified")
    user = session.exec(select(User).where(User.email == claims.email)).first()
    accounts = select(ProviderAccount).where(ProviderAccount.provider == name)
    if user is None:
        # DUMMY_HASH: no password logs it in, and a wrong one takes as long as ever. Forgot-password sets one.
        user = User(email=claims.email, hashed_password=DUMMY_HASH, is_verified=True)
        session.add(user)
        session.flush()
    elif session.exec(accounts.where(ProviderAccount.user_id == user.id)).first() is not None:
        # Linked to another subject there: a recycled address takes over nothing.
        raise SignInError("email_linked_to_another_account")
    elif not user.is_verified:
        # Whoever chose its password never proved the address (pre-account takeover): it goes, with its logins.
        session.exec(update(User).where(User.id == user.id).values(hashed_password=DUMMY_HASH, is_verified=True))
        end_logins(session, Login.user_id == user.id)
    session.add(ProviderAccount(provider=name, subject=claims.sub, user_id=user.id))
    return user


PROVIDER_DOWN = {303: {"description": "The provider can't be reached: to FRONTEND_URL?error=provider_unavailable"}}


@app.get("/auth/oidc/{name}/login", status_code=302, tags=["oidc"], responses=errors(404) | PROVIDER_DOWN)
async def oidc_login(name: str, request: Request) -> RedirectResponse:
    """Sign in with a provider: the browser goes to its login page, then comes back to the callback below."""
    provider = oidc_client(name)
    try:
        return await provider.authorize_redirect(request, request.url_for("oidc_callback", name=name))
    except httpx2.HTTPError as error:
        return sign_in_failed(name, "provider_unavailable", error)


@app.get("/auth/oidc/{name}/callback", status_code=303, tags=["oidc"], responses=errors(404, 503))
async def oidc_callback(name: str, request: Request) -> RedirectResponse:
    """Where the provider sends the browser back. A login starts as a browser's password login does, with the refresh
    token cookie, and the browser goes on to FRONTEND_URL, or to FRONTEND_URL?error=... if the sign-in failed."""
    provider = oidc_client(name)
    # Authlib checks the ID token's signature, nonce and times; `iss` and `aud` we pin here.
    expected = {"iss": {"value": OIDC_PROVIDERS[name].issuer}, "aud": {"value": provider.client_id}}
    try:
        token = await provider.authorize_access_token(request, claims_options=expected)
        claims = IdTokenClaims.model_validate(token.get("userinfo"))  # none: the provider sent no ID token
        login = await run_in_threadpool(sign_in_with_provider, name, claims, request)
    except SignInError as refused:
        return sign_in_failed(name, refused.args[0], refused)
    except (AuthlibBaseError, JoseError, ValidationError, IntegrityError) as error:  # state, code, ID token, a race
        return sign_in_failed(name, "sign_in_failed", error)
    except httpx2.HTTPError as error:
        return sign_in_failed(name, "provider_unavailable", error)
    response = RedirectResponse(settings.frontend_url, 303)
    set_refresh_cookie(response, create_refresh_token(login), LOGIN_SECONDS)
    return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Manage the auth starter's users.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("make-admin", help="give the admin role to a registered account").add_argument("email")
    email = normalize_email(parser.parse_args().email)
    create_tables()
    with engine.begin() as connection:
        found = connection.execute(update(User).where(User.email == email).values(role="admin")).rowcount
    if found == 0:
        sys.exit(f"No account with the email {email!r}. Register it first (POST /auth/register).")
    print(f"{email} is now an admin. Log in again to get a token with the 'admin' scope.")

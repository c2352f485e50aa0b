"""FastAPI JWT authentication starter: one file to read top to bottom, then copy. The README reads it with you."""

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
from typing import Annotated, Any, Literal

import jwt
from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import BackgroundTasks, Cookie, Depends, FastAPI, Form, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel, BeforeValidator, ConfigDict, EmailStr, PositiveInt, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, Engine, bindparam, event
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, func, not_, select, update

BASE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("uvicorn.error")  # our messages appear alongside uvicorn's own


# --- Settings: environment variables, or a .env file beside this one ------------------------------------------------
class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")
    database_url: str = f"sqlite:///{BASE_DIR / 'app.db'}"
    secret_key: str = ""  # unset: a key is generated once and kept in .secret_key
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_days: PositiveInt = 14  # a login session's whole life; refreshing doesn't extend it
    reset_token_expire_minutes: PositiveInt = 30
    cors_origins: str = ""  # comma-separated origins of browser front ends allowed to call the API
    frontend_url: str = "http://localhost:8000"  # where the links in emails point
    smtp_host: str = ""  # unset: emails are written to the log instead of sent
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
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
    if len(key := path.read_text().strip()) < 32:
        sys.exit(f"{path} does not hold a usable key: delete it to generate a new one, or set SECRET_KEY.")
    log.warning("SECRET_KEY is not set: using the generated key saved in %s. Set SECRET_KEY in production.", path)
    return key


settings = Settings()
if settings.secret_key and len(settings.secret_key.encode()) < 32:
    sys.exit('SECRET_KEY must be at least 32 bytes long: python -c "import secrets; print(secrets.token_urlsafe(64))"')
SECRET_KEY = settings.secret_key or load_or_create_secret_key(BASE_DIR / ".secret_key")
ALGORITHM = "HS256"  # pinned: the algorithm named in a token's header is never trusted (RFC 8725)
ACCESS_TOKEN_SECONDS = settings.access_token_expire_minutes * 60
SESSION_SECONDS = settings.refresh_token_expire_days * 24 * 3600
CORS_ORIGINS = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]


# --- Database and tables ----------------------------------------------------------------------------------------------
def create_db_engine(url: str) -> Engine:
    # 20 pooled connections: with SQLAlchemy's default of 5, each request past the fifth opens and closes its own.
    # hide_parameters: no token hash, id or email from a statement ever reaches an error message or a log.
    options = {"pool_size": 20, "max_overflow": 0, "hide_parameters": True}
    if not url.startswith("sqlite"):
        # pre_ping: a connection the server dropped (e.g. on a restart) is replaced as it leaves the pool.
        return create_engine(url, **options, pool_pre_ping=True)
    # Requests use SQLite from several threads; a writer waits up to 30 s for another to finish. WAL: readers don't
    # wait for the writer. foreign_keys: SQLite leaves them off unless asked. A file never drops a connection.
    engine = create_engine(url, **options, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", lambda dbapi_connection, _record: dbapi_connection.executescript(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"))
    return engine


engine = create_db_engine(settings.database_url)
ROLE_SCOPES = {"user": ["me"], "admin": ["me", "admin"]}  # a token's scopes count only while its user's role has them
MAX_ID = 2**31 - 1  # ids are INTEGER, 32 bits on PostgreSQL: a larger number is nobody's id
MAX_PAGE_SIZE = 100
REFRESH_GRACE_SECONDS = 30  # a used refresh token still works this long after its first use (see rotate_refresh_token)
DATABASE_RETRY_SECONDS = 5  # the Retry-After of a 503 while the database is unavailable


class User(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}  # a deleted user's id is never given to someone new
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=254)  # stored trimmed and lower-cased
    hashed_password: str
    is_active: bool = True
    is_verified: bool = False  # the user followed the link we emailed
    role: str = "user"  # a key of ROLE_SCOPES


class LoginSession(SQLModel, table=True):  # one login on one device; ending it ends all its tokens at once
    id: str = Field(default_factory=lambda: secrets.token_hex(16), primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", index=True)
    scopes: str  # granted at login, space-separated; refreshing never widens them
    user_agent: str = ""
    created_at: float = Field(default_factory=time.time)  # Unix time, as in JWTs: no time zone to get wrong
    last_used_at: float = Field(default_factory=time.time)
    expires_at: float  # refreshing never extends it
    revoked: bool = False  # by logout, a replayed token, a new password or deactivation


class RefreshToken(SQLModel, table=True):
    token_hash: str = Field(primary_key=True)  # SHA-256 of the token; the token itself is never stored
    session_id: str = Field(foreign_key="loginsession.id", ondelete="CASCADE", index=True)
    first_used_at: float | None = None  # a token works once, and again only within the grace window from here


class EmailLink(SQLModel, table=True):  # the latest one-time link of each kind emailed to a user, until used
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", primary_key=True)
    purpose: str = Field(primary_key=True)  # "reset" or "verify"
    token_hash: str = Field(unique=True)  # SHA-256 of the token in the link
    created_at: float
    expires_at: float


class LoginFailure(SQLModel, table=True):  # counted for a while, to slow down password guessing
    id: int | None = Field(default=None, primary_key=True)
    client: str = Field(index=True)  # the client's IP address
    email_hash: str  # SHA-256 of the email tried
    failed_at: float = Field(default_factory=time.time, index=True)


def create_tables() -> None:  # workers start at once: one takes the database's lock and creates the tables
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        SQLModel.metadata.create_all(connection)


def normalize_email(email: str) -> str:  # NFC, as the email validator stores it: "ä" matches however it was typed
    return unicodedata.normalize("NFC", email.strip().lower())


# The one condition every use of a login session checks. `now` is read each time a statement runs.
SESSION_IS_LIVE = not_(LoginSession.revoked) & (LoginSession.expires_at > bindparam("now", callable_=time.time))
NewPassword = Annotated[str, Field(min_length=8, max_length=128)]  # length makes it strong: no composition rules
Password = Annotated[str, Field(max_length=128)]  # a longer one is refused before any hashing
Token = Annotated[str, Field(min_length=1, max_length=512)]
Email = Annotated[EmailStr, BeforeValidator(lambda value: normalize_email(value) if isinstance(value, str) else value)]


class EmailRequest(SQLModel):
    email: Email


class UserCreate(EmailRequest):
    password: NewPassword


class UserPublic(SQLModel):  # what the API shows of a user: never the password hash
    id: int
    email: str
    is_active: bool
    is_verified: bool


class UserWithRole(UserPublic):  # what admins see of users
    role: str


class SignedInUser(UserWithRole):  # who is calling, through which login session
    session_id: str


class UserUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # a typo must not look like a successful change
    is_active: bool | None = None
    role: Literal["user", "admin"] | None = None


class TokenRequest(BaseModel):  # the token endpoint's form: the password grant or the refresh grant (RFC 6749)
    grant_type: str = "password"  # absent means password, as the Authorize button in /docs sends it
    username: str | None = None  # the email
    password: Password | None = None
    refresh_token: Token | None = None
    scope: str = ""  # space-separated; asking can narrow what is granted, never widen it (RFC 6749 §3.3)

    @model_validator(mode="after")
    def has_the_fields_of_its_grant(self) -> "TokenRequest":  # the refresh grant's token may come in the cookie
        needed = {"password": ["username", "password"]}.get(self.grant_type, [])
        if missing := [name for name in needed if getattr(self, name) is None]:
            raise ValueError(f"grant_type={self.grant_type} needs {' and '.join(missing)}")
        return self


class TokenResponse(SQLModel):
    access_token: str
    refresh_token: str | None = None  # left out for browsers: theirs is in an HttpOnly cookie
    token_type: str = "bearer"
    expires_in: int  # seconds until the access token expires
    scope: str  # the scopes granted, space-separated


class RefreshRequest(SQLModel):
    refresh_token: Token | None = None  # none: a browser's comes in the cookie


class PasswordChange(SQLModel):
    current_password: Password
    new_password: NewPassword


class PasswordConfirmation(SQLModel):
    password: Password


class LinkToken(SQLModel):
    token: Token


class PasswordReset(LinkToken):
    new_password: NewPassword


class SessionInfo(SQLModel):
    id: str
    created_at: datetime
    last_used_at: datetime
    user_agent: str
    current: bool  # the session of the token this request came with


class ErrorMessage(SQLModel):  # the token endpoints add RFC 6749's `error` and `error_description`
    detail: str


# --- Password hashing -------------------------------------------------------------------------------------------------
password_hasher = PasswordHasher(memory_cost=19 * 1024, time_cost=3, parallelism=1)  # argon2id: OWASP's minimum +1 pass
# Slow on purpose (tens of ms, 19 MiB): a pool of a thread per core bounds CPU and memory; nice(): requests go first.
hash_pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="argon2",
                               initializer=os.nice if sys.platform == "linux" else None, initargs=(10,))
DUMMY_HASH = password_hasher.hash(secrets.token_urlsafe(16))  # for unknown emails: as slow as a wrong password


def hash_password(password: str) -> str:
    # NFKC: the same password typed on different devices gives the same bytes (NIST SP 800-63B).
    return hash_pool.submit(password_hasher.hash, unicodedata.normalize("NFKC", password)).result()


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return hash_pool.submit(password_hasher.verify, password_hash, unicodedata.normalize("NFKC", password)).result()
    except (VerificationError, InvalidHashError):
        return False


def is_weaker_than_ours(password_hash: str) -> bool:
    """Rehash at login only to upgrade: OWASP's equivalent settings trade memory for passes, so compare the product."""
    stored = extract_parameters(password_hash)
    return stored.memory_cost * stored.time_cost < password_hasher.memory_cost * password_hasher.time_cost


def sha256(token: str) -> str:  # tokens are long random strings: a fast hash of one can't be reversed
    return hashlib.sha256(token.encode()).hexdigest()


class OAuth2Error(HTTPException):  # an error of the token endpoints: RFC 6749 §5.2's `error` code goes beside `detail`
    def __init__(self, error: str, detail: str, status_code: int = 401, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, detail, {"WWW-Authenticate": "Bearer"} if status_code == 401 else headers)
        self.error = error


# --- Tokens: the password grant (slowed down after failures, OWASP ASVS 2.2.1), JWT access and refresh tokens ------
MAX_FAILURES_PER_EMAIL, MAX_FAILURES_PER_CLIENT, FAILURE_WINDOW = 5, 50, 15 * 60  # from one client IP, in 15 min


def check_login_throttle(session: Session, email_hash: str, client: str) -> None:
    """429 while this client has failed too often at this email, or at any."""
    failures = session.exec(select(LoginFailure.email_hash, LoginFailure.failed_at).where(
        LoginFailure.client == client, LoginFailure.failed_at > time.time() - FAILURE_WINDOW,
    ).order_by(LoginFailure.failed_at.desc()).limit(MAX_FAILURES_PER_CLIENT)).all()
    at_this_email = [failure for failure in failures if failure.email_hash == email_hash]
    # The client may try again once its limit-th latest failure leaves the window; the email's limit ends last.
    for recent, limit in ((at_this_email, MAX_FAILURES_PER_EMAIL), (failures, MAX_FAILURES_PER_CLIENT)):
        if len(recent) >= limit:
            seconds = str(math.ceil(recent[limit - 1].failed_at + FAILURE_WINDOW - time.time()))
            raise OAuth2Error("temporarily_unavailable", f"Too many failed logins: try again in {seconds} s", 429,
                              {"Retry-After": seconds})


def authenticate(session: Session, email: str, password: str, client: str) -> User | None:
    """The user with this email and password, or None. Throttled: 429 after too many failures, before any hashing."""
    email_hash = sha256(email)  # failures are kept by the email's hash: no need to store what strangers typed
    check_login_throttle(session, email_hash, client)  # before any hashing, so a throttled guess costs nothing
    # No stored email holds a NUL, and PostgreSQL would refuse to compare one.
    user = session.exec(select(User).where(User.email == email)).first() if "\x00" not in email else None
    session.close()  # no connection held while the password is hashed
    password_ok = verify_password(password, user.hashed_password if user else DUMMY_HASH)
    if password_ok and is_weaker_than_ours(user.hashed_password):
        user.hashed_password = hash_password(password)
    check_login_throttle(session, email_hash, client)  # again: parallel guesses all passed the first check
    if user is None or not password_ok:
        session.add(LoginFailure(client=client, email_hash=email_hash))
        session.exec(delete(LoginFailure).where(LoginFailure.failed_at < time.time() - FAILURE_WINDOW))
        session.commit()
        return None
    session.exec(delete(LoginFailure).where(LoginFailure.client == client, LoginFailure.email_hash == email_hash))
    session.add(user)
    session.commit()
    return user


class AccessTokenClaims(BaseModel):
    sub: int = Field(gt=0, le=MAX_ID)  # the user id
    sid: str  # the login session: the token works only while it is live
    type: Literal["access"]  # so no other kind of token can pass for an access token
    scope: str


def issue_tokens(session: Session, response: Response, login_session: LoginSession, scopes: list[str],
                 browser: bool) -> TokenResponse:
    """Store a new refresh token for the login session, commit, and answer with it and a new access token (a JWT).
    A browser gets its refresh token in a cookie, out of reach of any script on the page."""
    refresh_token = secrets.token_urlsafe(32)
    session.add(RefreshToken(token_hash=sha256(refresh_token), session_id=login_session.id))
    session.commit()
    now, scope = int(time.time()), " ".join(scopes)
    claims = {"sub": str(login_session.user_id), "sid": login_session.id, "type": "access", "scope": scope,
              "iat": now, "exp": now + ACCESS_TOKEN_SECONDS, "jti": secrets.token_hex(8)}  # jti: every token unique
    response.headers["Cache-Control"] = "no-store"  # tokens must never be cached (RFC 6749 §5.1)
    if browser:
        set_refresh_cookie(response, refresh_token, int(login_session.expires_at) - now)
        refresh_token = None
    return TokenResponse(access_token=jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM), refresh_token=refresh_token,
                         expires_in=ACCESS_TOKEN_SECONDS, scope=scope)


def set_refresh_cookie(response: Response, refresh_token: str, max_age: int) -> None:
    # HttpOnly: no script reads it. Secure: HTTPS only. Strict: no other site's page sends it. Path: only to /auth.
    response.headers.append("Set-Cookie", f"refresh_token={refresh_token}; HttpOnly; Secure; SameSite=Strict; "
                                          f"Path=/auth; Max-Age={max_age}")


def presented_refresh_token(in_body: str | None, in_cookie: str | None, browser: bool) -> str | None:
    """The refresh token in the body or else the cookie, which only a page at an allowed origin may use (CSRF)."""
    if in_body is not None:
        return in_body
    if in_cookie is not None and not browser:
        raise OAuth2Error("access_denied", "The refresh token cookie is taken only from an allowed Origin", 403)
    return in_cookie


def missing_refresh_token() -> RequestValidationError:  # as when a required field is missing (RFC 6749 §5.2)
    return RequestValidationError([{"type": "missing", "loc": ("body", "refresh_token"), "msg": "Field required"}])


def rotate_refresh_token(session: Session, response: Response, refresh_token: str, asked: list[str],
                         browser: bool) -> TokenResponse:
    """Trade a refresh token for new tokens of its login session. Each refresh token works once (rotation), but a
    retry within REFRESH_GRACE_SECONDS of its first use gets new tokens too: a lost answer or a second tab."""
    now = time.time()
    # Record the first use, and keep it on a retry: the grace window runs from the first use and is never stretched.
    # One UPDATE, so that of two requests racing with one token, the second sees when the first used it.
    first_use = update(RefreshToken).where(RefreshToken.token_hash == sha256(refresh_token)).values(
        first_used_at=func.coalesce(RefreshToken.first_used_at, now))
    token = session.exec(first_use.returning(RefreshToken.session_id, RefreshToken.first_used_at)).first()
    login_session = token and session.exec(
        select(LoginSession).where(LoginSession.id == token.session_id, SESSION_IS_LIVE)).first()
    user = login_session and session.get(User, login_session.user_id)
    if not user or not user.is_active:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    if now - token.first_used_at > REFRESH_GRACE_SECONDS:
        # A used token came back, from the client or a thief: end the session, the thief's tokens too (RFC 9700).
        end_sessions(session, LoginSession.id == login_session.id)
        session.commit()
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    login_session.last_used_at = now
    # The login's scopes that the role still holds (a demoted admin loses `admin`), narrowed to those asked for.
    scopes = [scope for scope in login_session.scopes.split() if scope in ROLE_SCOPES.get(user.role, [])
              and (not asked or scope in asked)]
    return issue_tokens(session, response, login_session, scopes, browser)


def end_sessions(session: Session, *where: ColumnElement[bool]) -> int:
    """End the login sessions that match: their refresh and access tokens stop working at once."""
    return session.exec(update(LoginSession).where(not_(LoginSession.revoked), *where).values(revoked=True)).rowcount


def set_password(session: Session, user_id: int, password_hash: str, keep_session: str | None = None) -> None:
    """Store a new password. Every login but `keep_session` ends, and so does a pending reset link."""
    session.exec(update(User).where(User.id == user_id).values(hashed_password=password_hash))
    session.exec(delete(EmailLink).where(EmailLink.user_id == user_id, EmailLink.purpose == "reset"))
    end_sessions(session, LoginSession.user_id == user_id, LoginSession.id != keep_session)


# --- Email: one-time links to reset a password or verify an address --------------------------------------------------
LINKS = {  # purpose: (page of the link, subject, minutes it works)
    "reset": ("reset-password", "Reset your password", settings.reset_token_expire_minutes),
    "verify": ("verify-email", "Verify your email address", 2 * 24 * 60),
}


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
            if settings.smtp_tls:  # a default context checks the server's certificate and name (SSL_CERT_FILE works)
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                smtp.login(settings.smtp_user, settings.smtp_password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as error:  # ssl's errors are OSErrors: no mail, and no password, went out
        log.error("Could not send an email to %s: %s", to, error)


def email_link(email: str, purpose: Literal["reset", "verify"]) -> None:
    """Email an active user a one-time link, at most one of each kind a minute. Runs after the response."""
    token = secrets.token_urlsafe(32)
    page, subject, minutes = LINKS[purpose]
    try:
        stored = store_link(email, purpose, sha256(token), minutes)
    except SQLAlchemyError as error:
        if not database_unavailable(error):
            raise
        log.error("Database unavailable, no %s link emailed: %s", purpose, str(error).splitlines()[0])
        return
    if stored:
        send_email(email, subject, f"{subject}: {settings.frontend_url}/{page}?token={token}\n\nThe link works "
                                   f"once, within {minutes} minutes. Not you? Ignore this email.")


def store_link(email: str, purpose: str, token_hash: str, minutes: int) -> bool:
    """Store a link for the active user with this email, unless one went out in the last minute."""
    now = time.time()
    with Session(engine) as session:
        user = session.exec(select(User).where(User.email == email, User.is_active)).first()
        if user is None or (purpose == "verify" and user.is_verified):
            return False
        # The last link goes once it is a minute old; a newer one left in place makes the primary key refuse this one.
        session.exec(delete(EmailLink).where(EmailLink.user_id == user.id, EmailLink.purpose == purpose,
                                             EmailLink.created_at < now - 60))
        session.add(EmailLink(user_id=user.id, purpose=purpose, token_hash=token_hash, created_at=now,
                              expires_at=now + minutes * 60))
        try:
            session.commit()
        except IntegrityError:  # one is already on its way, maybe from a request racing this one
            return False
    return True


def use_link(session: Session, token: str, purpose: str) -> int:
    """Use up a one-time link: the id of the user it was emailed to. 400 if it is invalid, used or expired."""
    link = delete(EmailLink).where(EmailLink.token_hash == sha256(token), EmailLink.purpose == purpose,
                                   EmailLink.expires_at > time.time())
    if (user_id := session.exec(link.returning(EmailLink.user_id)).scalar()) is None:
        raise HTTPException(400, "This link is invalid, used or expired: ask for a new one")
    return user_id


# --- Dependencies -----------------------------------------------------------------------------------------------------
def get_session() -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:  # what a route returns after a commit needs no new query
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # closed before the response goes out
# For routes that hash a password: only a few run at once; the others wait on the event loop, holding no thread.
HashingSessionDep = Annotated[Session, Depends(get_session, scope="function",
                                               max_concurrency=2 * (os.cpu_count() or 1))]
async def get_client_address(request: Request) -> str:  # what login throttling counts failures by
    return request.client.host if request.client else ""


ClientAddress = Annotated[str, Depends(get_client_address)]
async def is_from_browser(request: Request) -> bool:
    """Browsers send an Origin with every POST; curl, Authlib and mobile apps don't. 403 from an origin that is neither
    the API's nor in CORS_ORIGINS: a page elsewhere may neither use the cookie nor plant its own (login CSRF)."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin != f"{request.url.scheme}://{request.url.netloc}" and origin not in CORS_ORIGINS:
        raise OAuth2Error("access_denied", f"Requests from the origin {origin!r} are not allowed here", 403)
    return True


FromBrowser = Annotated[bool, Depends(is_from_browser)]
RefreshCookie = Annotated[str | None, Cookie(alias="refresh_token")]
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="auth/login", scopes={"me": "Your account.", "admin": "All users."})
# Built once, as it runs on every authenticated request: the user (not the hash), if this login session is live.
SELECT_SIGNED_IN_USER = select(User.id, User.email, User.is_active, User.is_verified, User.role,
                               LoginSession.id.label("session_id")).join(LoginSession).where(
    User.id == bindparam("user_id"), LoginSession.id == bindparam("session_id"), User.is_active, SESSION_IS_LIVE)


def get_current_user(security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]) -> SignedInUser:
    """The user behind a valid access token, read fresh so that logout, deactivation and demotion apply at once."""
    row = None
    with contextlib.suppress(jwt.InvalidTokenError, ValidationError):  # forged, expired, or not an access token
        payload = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM], options={"require": ["exp", "iat", "sub"]})
        claims = AccessTokenClaims.model_validate(payload)
        with engine.connect() as connection:  # its own connection, given back before the route runs
            row = connection.execute(SELECT_SIGNED_IN_USER, {"user_id": claims.sub, "session_id": claims.sid}).first()
    if row is None:
        raise HTTPException(401, "Could not validate credentials", headers={"WWW-Authenticate": "Bearer"})
    user = SignedInUser.model_validate(row, from_attributes=True)
    if not set(security_scopes.scopes) <= set(claims.scope.split()) & set(ROLE_SCOPES.get(user.role, [])):
        needed = security_scopes.scope_str
        raise HTTPException(403, f"Not enough permissions: this needs the scope '{needed}'",
                            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'})
    return user


CurrentUser = Annotated[SignedInUser, Security(get_current_user, scopes=["me"])]
AdminUser = Annotated[SignedInUser, Security(get_current_user, scopes=["admin"])]


async def get_verified_user(user: CurrentUser) -> SignedInUser:
    if not user.is_verified:
        raise HTTPException(403, "Verify your email address first")
    return user


VerifiedUser = Annotated[SignedInUser, Depends(get_verified_user)]  # for routes that need a verified email


def errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:  # for the OpenAPI document; FastAPI adds 422
    return {code: {"model": ErrorMessage} for code in status_codes}


# --- App and routes ---------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    create_tables()
    yield


app = FastAPI(title="FastAPI JWT auth starter", lifespan=lifespan)
if CORS_ORIGINS:  # unset: only pages served from this API's own origin may call it from a browser
    app.add_middleware(CORSMiddleware, allow_origins=CORS_ORIGINS, allow_credentials=True, allow_methods=["*"],
                       allow_headers=["Authorization", "Content-Type"])


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default handler echoes the rejected input back, and that input may be a password.
    problems = [{key: value for key, value in error.items() if key not in ("input", "ctx")} for error in exc.errors()]
    description = "; ".join(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in problems)
    return JSONResponse({"detail": problems, "error": "invalid_request", "error_description": description}, 422)


@app.exception_handler(OAuth2Error)
async def oauth2_error_handler(request: Request, exc: OAuth2Error) -> JSONResponse:
    body = {"detail": exc.detail, "error": exc.error, "error_description": exc.detail}
    return JSONResponse(body, exc.status_code, headers=exc.headers)


def database_unavailable(error: Exception) -> bool:
    """Down, restarting, refusing connections or busy: worth a retry. A bad query (a missing column) is a bug."""
    if isinstance(error, PoolTimeoutError):  # every pooled connection stayed busy
        return True
    return isinstance(error, OperationalError) and getattr(error.orig, "sqlite_errorname", "") != "SQLITE_ERROR"


@app.exception_handler(SQLAlchemyError)
async def database_error_handler(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    if not database_unavailable(exc):
        raise exc  # a 500, its traceback in the log
    log.error("Database unavailable, answered 503: %s", str(exc).splitlines()[0])  # one line; no parameters in it
    error = OAuth2Error("temporarily_unavailable", "The database is unavailable: try again shortly", 503,
                        {"Retry-After": str(DATABASE_RETRY_SECONDS)})
    return await oauth2_error_handler(request, error)


# The rule for every route: one that uses the database is a plain `def` with a SessionDep, run in FastAPI's thread pool,
# so the event loop never waits for it. It holds a connection only while its thread works (it commits, or closes the
# session, before it returns or hashes): else requests holding connections could wait for threads that wait for them.
@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastAPI JWT auth starter. Try the API at /docs"}


@app.post("/auth/register", status_code=201, response_model=UserPublic, tags=["auth"], responses=errors(400, 409, 503))
def register(user_in: UserCreate, session: HashingSessionDep, background_tasks: BackgroundTasks) -> User:
    """Create an account, and email it a link to verify its address."""
    user = User(email=user_in.email, hashed_password=hash_password(user_in.password))
    session.add(user)
    try:
        session.commit()
    except IntegrityError:  # the unique email index: also right when two sign-ups race
        raise HTTPException(409, "An account with this email already exists") from None
    background_tasks.add_task(email_link, user.email, "verify")  # after the response: mail never slows it
    return user


@app.post("/auth/login", tags=["auth"], responses=errors(400, 401, 403, 429, 503), response_model_exclude_none=True)
def login(form: Annotated[TokenRequest, Form()], browser: FromBrowser, request: Request, response: Response,
          client: ClientAddress, session: HashingSessionDep, cookie: RefreshCookie = None) -> TokenResponse:
    """The OAuth2 token endpoint: the password grant (`username` is the email) or the refresh grant."""
    if form.grant_type == "refresh_token":
        refresh_token = presented_refresh_token(form.refresh_token, cookie, browser)
        if refresh_token is None:
            raise missing_refresh_token()
        return rotate_refresh_token(session, response, refresh_token, form.scope.split(), browser)
    if form.grant_type != "password":
        raise OAuth2Error("unsupported_grant_type", "grant_type must be password or refresh_token", 400)
    user = authenticate(session, normalize_email(form.username), form.password, client)
    if user is None:
        raise OAuth2Error("invalid_grant", "Incorrect email or password")
    if not user.is_active:
        raise OAuth2Error("invalid_grant", "This account has been deactivated", 403)
    # Forget the user's finished sessions (their tokens go with them), so the tables don't grow forever.
    session.exec(delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.expires_at <= time.time()))
    scopes = [scope for scope in ROLE_SCOPES.get(user.role, []) if not form.scope or scope in form.scope.split()]
    login_session = LoginSession(user_id=user.id, scopes=" ".join(scopes), expires_at=time.time() + SESSION_SECONDS,
                                 user_agent=request.headers.get("user-agent", "")[:200])
    session.add(login_session)
    return issue_tokens(session, response, login_session, scopes, browser)


@app.post("/auth/refresh", tags=["auth"], responses=errors(400, 401, 403, 503), response_model_exclude_none=True)
def refresh(browser: FromBrowser, response: Response, session: SessionDep, cookie: RefreshCookie = None,
            body: RefreshRequest = RefreshRequest()) -> TokenResponse:
    """Trade a refresh token (in the body, or a browser's cookie) for new tokens. Each works once (rotation)."""
    refresh_token = presented_refresh_token(body.refresh_token, cookie, browser)
    if refresh_token is None:
        raise missing_refresh_token()
    return rotate_refresh_token(session, response, refresh_token, [], browser)


@app.post("/auth/logout", status_code=204, tags=["auth"], responses=errors(400, 403, 503))
def logout(browser: FromBrowser, response: Response, session: SessionDep, cookie: RefreshCookie = None,
           body: RefreshRequest = RefreshRequest()) -> None:
    """End this refresh token's login session and its access tokens. An unknown token, or none, is fine (RFC 7009)."""
    refresh_token = presented_refresh_token(body.refresh_token, cookie, browser)
    if cookie is not None:  # the browser forgets it
        set_refresh_cookie(response, "", 0)
    if refresh_token is None:
        return
    if token := session.get(RefreshToken, sha256(refresh_token)):
        end_sessions(session, LoginSession.id == token.session_id)
        session.commit()


@app.post("/auth/forgot-password", status_code=202, tags=["email"], responses=errors(400))
async def forgot_password(body: EmailRequest, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Email a link to reset the password, if an active account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "reset")  # all its work after the response: same time
    return {"message": "If an account has this address, an email is on its way."}


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
    session.exec(update(User).where(User.id == use_link(session, body.token, "verify")).values(is_verified=True))
    session.commit()


@app.post("/auth/verify-email/resend", status_code=202, tags=["email"], responses=errors(400))
async def resend_verification_email(body: EmailRequest, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Email a new verification link, if an unverified account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "verify")
    return {"message": "If an account has this address, an email is on its way."}


@app.get("/auth/sessions", tags=["account"], responses=errors(401, 403, 503))
def list_sessions(user: CurrentUser, session: SessionDep) -> list[SessionInfo]:
    """Your live logins, newest first."""
    statement = select(LoginSession).where(LoginSession.user_id == user.id, SESSION_IS_LIVE)
    logins = session.exec(statement.order_by(LoginSession.created_at.desc())).all()
    session.close()
    return [SessionInfo(**login.model_dump(), current=login.id == user.session_id) for login in logins]


@app.delete("/auth/sessions/{session_id}", status_code=204, tags=["account"], responses=errors(401, 403, 404, 503))
def end_session(session_id: str, user: CurrentUser, session: SessionDep) -> None:
    """Log out one of your logins (see GET /auth/sessions), at once."""
    mine = [LoginSession.id == session_id, LoginSession.user_id == user.id, SESSION_IS_LIVE]
    if "\x00" in session_id or not end_sessions(session, *mine):  # no id holds a NUL; PostgreSQL can't compare one
        raise HTTPException(404, "Session not found")
    session.commit()


@app.delete("/auth/sessions", status_code=204, tags=["account"], responses=errors(401, 403, 503))
def end_all_sessions(user: CurrentUser, session: SessionDep) -> None:
    """Log out everywhere, this login included."""
    end_sessions(session, LoginSession.user_id == user.id)
    session.commit()


def check_password(session: Session, user: SignedInUser, password: str, client: str) -> None:
    """400 unless this is the user's password. Throttled as a login is, so a stolen access token can't guess it."""
    if authenticate(session, user.email, password, client) is None:
        raise HTTPException(400, "The password is not correct")


@app.post("/auth/change-password", status_code=204, tags=["account"], responses=errors(400, 401, 403, 429, 503))
def change_password(body: PasswordChange, user: CurrentUser, client: ClientAddress,
                    session: HashingSessionDep) -> None:
    """Change your password. Your other logins end at once; this one goes on."""
    check_password(session, user, body.current_password, client)
    set_password(session, user.id, hash_password(body.new_password), keep_session=user.session_id)
    session.commit()


@app.get("/users/me", tags=["account"], responses=errors(401, 403, 503))
async def read_me(user: CurrentUser) -> UserPublic:
    """Your account."""
    return user


@app.delete("/users/me", status_code=204, tags=["account"], responses=errors(400, 401, 403, 429, 503))
def delete_me(body: PasswordConfirmation, user: CurrentUser, client: ClientAddress,
              session: HashingSessionDep) -> None:
    """Delete your account, with all its logins. Your email can sign up again afterwards."""
    check_password(session, user, body.password, client)
    session.exec(delete(User).where(User.id == user.id))
    session.commit()


@app.get("/users", response_model=list[UserWithRole], tags=["admin"], responses=errors(401, 403, 503))
def list_users(admin: AdminUser, session: SessionDep, offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
               limit: Annotated[int, Query(ge=1, description="100 at most")] = MAX_PAGE_SIZE) -> list[User]:
    """All users, a page at a time."""
    users = session.exec(select(User).order_by(User.id).offset(offset).limit(min(limit, MAX_PAGE_SIZE))).all()
    session.close()
    return list(users)


def get_other_user(session: Session, user_id: int, admin: SignedInUser) -> User:
    user = session.get(User, user_id) if 0 < user_id <= MAX_ID else None
    if user is None:
        raise HTTPException(404, "User not found")
    if user.id == admin.id:  # so the last admin can't lock everyone out by accident
        raise HTTPException(400, "Admins cannot change or delete their own account here")
    return user


@app.patch("/users/{user_id}", response_model=UserWithRole, tags=["admin"], responses=errors(400, 401, 403, 404, 503))
def update_user(user_id: int, changes: UserUpdate, admin: AdminUser, session: SessionDep) -> User:
    """Deactivate or reactivate a user, or change their role. Takes effect on their very next request."""
    user = get_other_user(session, user_id, admin)
    user.sqlmodel_update(changes.model_dump(exclude_none=True))
    if not user.is_active:
        end_sessions(session, LoginSession.user_id == user.id)
    session.commit()
    return user


@app.delete("/users/{user_id}", status_code=204, tags=["admin"], responses=errors(400, 401, 403, 404, 503))
def delete_user(user_id: int, admin: AdminUser, session: SessionDep) -> None:
    """Delete a user; their login sessions and tokens go with them (ON DELETE CASCADE)."""
    session.delete(get_other_user(session, user_id, admin))
    session.commit()


# --- Command line: python main.py make-admin EMAIL --------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Manage the auth starter's users.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("make-admin", help="give the admin role to a registered account").add_argument("email")
    email = normalize_email(parser.parse_args().email)
    create_tables()
    with Session(engine) as session:
        found = session.exec(update(User).where(User.email == email).values(role="admin")).rowcount
        session.commit()
    if not found:
        sys.exit(f"No account with the email {email!r}. Register it first (POST /auth/register).")
    print(f"{email} is now an admin. Log in again to get a token with the 'admin' scope.")

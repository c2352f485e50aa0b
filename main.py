"""FastAPI JWT authentication starter: one file to read top to bottom, then copy.

Run it:   pip install -r requirements.txt && uvicorn main:app --reload   (then open /docs)
Read it:  settings -> tables -> password hashing -> tokens -> email -> dependencies -> routes -> command line
"""

import argparse
import hashlib
import logging
import math
import os
import secrets
import smtplib
import sys
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import BackgroundTasks, Depends, FastAPI, Form, HTTPException, Query, Request, Response, Security, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel, ConfigDict, EmailStr, PositiveInt, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, DateTime, TypeDecorator, bindparam, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, not_, select, update

BASE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("uvicorn.error")  # our messages appear alongside uvicorn's own


# --- Settings: environment variables, or a .env file beside this one --------------------------


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")

    database_url: str = f"sqlite:///{BASE_DIR / 'app.db'}"
    secret_key: str | None = None  # unset: a key is generated once and kept in .secret_key
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_days: PositiveInt = 14  # a login session's whole life; refreshing doesn't extend it
    reset_token_expire_minutes: PositiveInt = 30
    verify_token_expire_hours: PositiveInt = 48
    cors_origins: str = ""  # comma-separated web origins of browser front ends allowed to call the API
    frontend_url: str = "http://localhost:8000"  # where the links in emails point
    smtp_host: str = ""  # unset: emails are written to the log instead of sent
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_tls: bool = True  # STARTTLS
    emails_from: str = "noreply@example.com"

    @field_validator("secret_key")
    @classmethod
    def secret_key_is_long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < 32:
            raise ValueError(
                "SECRET_KEY must be at least 32 bytes long. Generate one with: "
                'python -c "import secrets; print(secrets.token_urlsafe(64))"'
            )
        return value


def load_or_create_secret_key(path: Path) -> str:
    """Return the key saved in `path`, generating it on the very first start."""
    if not path.exists():
        # Write the key to a private (0600) temp file, then link it into place. The link fails if
        # another worker got there first, so all workers end up reading the same complete key.
        try:
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
        except OSError as error:  # e.g. a read-only file system
            sys.exit(f"SECRET_KEY is not set and no key can be saved in {path.parent} ({error.strerror}): set SECRET_KEY.")
        with os.fdopen(fd, "w") as temp_file:
            temp_file.write(secrets.token_urlsafe(64))
        try:
            os.link(temp_name, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temp_name)
    key = path.read_text().strip()
    if len(key.encode()) < 32:
        sys.exit(f"{path} does not hold a usable key: delete it to generate a new one, or set SECRET_KEY.")
    return key


settings = Settings()
if settings.secret_key:
    SECRET_KEY = settings.secret_key
else:
    SECRET_KEY_FILE = BASE_DIR / ".secret_key"
    SECRET_KEY = load_or_create_secret_key(SECRET_KEY_FILE)
    log.warning("SECRET_KEY is not set: using the generated key saved in %s. Set SECRET_KEY in production.", SECRET_KEY_FILE)

ACCESS_TOKEN_LIFETIME = timedelta(minutes=settings.access_token_expire_minutes)
SESSION_LIFETIME = timedelta(days=settings.refresh_token_expire_days)
LINK_LIFETIMES = {"reset": timedelta(minutes=settings.reset_token_expire_minutes),
                  "verify": timedelta(hours=settings.verify_token_expire_hours)}


# --- Database and tables ------------------------------------------------------------------------


def create_db_engine(url: str) -> Engine:
    # Up to 40 requests use the database at once (FastAPI's thread pool). Keep 20 connections open:
    # past SQLAlchemy's default of 5, each request would open and close a connection of its own.
    pool = {"pool_size": 20, "max_overflow": 0}
    if not url.startswith("sqlite"):
        return create_engine(url, **pool)  # PostgreSQL and friends need nothing special
    # Requests run in several threads; a writer waits up to 30 s for another to finish.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

    @event.listens_for(engine, "connect")
    def configure_sqlite(dbapi_connection, _connection_record) -> None:  # noqa: ANN001 (DB-API objects)
        # WAL: readers don't wait for the writer. foreign_keys: SQLite leaves them off unless asked.
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    return engine


engine = create_db_engine(settings.database_url)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A moment in UTC. SQLite hands datetimes back without their time zone: this puts UTC back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value and value.tzinfo is None else value


# What each role may do. A token carries at most these scopes, and only while the user keeps the role.
ROLE_SCOPES = {"user": ["me"], "admin": ["me", "admin"]}
MAX_ID = 2**31 - 1  # ids are INTEGER, 32 bits on PostgreSQL: a larger number is nobody's id


class User(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}  # a deleted user's id is never given to someone new

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=254)  # stored trimmed and lower-cased
    hashed_password: str
    is_active: bool = True
    is_verified: bool = False  # the user followed the link we emailed
    role: str = "user"  # a key of ROLE_SCOPES


class LoginSession(SQLModel, table=True):
    """One login on one device. Its refresh tokens rotate; ending the session ends all its tokens at once."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", index=True)
    scopes: str  # granted at login, space-separated; refreshing never widens them
    user_agent: str = ""
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    last_used_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)  # refreshing never extends it
    revoked: bool = False  # by logout, a replayed token, a new password or deactivation


def is_live() -> ColumnElement[bool]:
    """The condition every use of a login session checks: not ended, not expired."""
    return not_(LoginSession.revoked) & (LoginSession.expires_at > utc_now())


class RefreshToken(SQLModel, table=True):
    token_hash: str = Field(primary_key=True)  # SHA-256 of the token; the token itself is never stored
    session_id: str = Field(foreign_key="loginsession.id", ondelete="CASCADE", index=True)
    used: bool = False  # each refresh token works once


class EmailLink(SQLModel, table=True):
    """The latest one-time link of each kind (reset, verify) emailed to a user; used up when followed."""

    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", primary_key=True)
    purpose: str = Field(primary_key=True)  # a key of LINK_LIFETIMES
    token_hash: str = Field(unique=True)  # SHA-256 of the token in the link
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class LoginFailure(SQLModel, table=True):
    """A failed login, counted for a while to slow down password guessing."""

    id: int | None = Field(default=None, primary_key=True)
    client: str = Field(index=True)  # the client's IP address
    email_hash: str  # SHA-256 of the email tried: no need to keep what strangers typed
    failed_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, index=True)


def create_tables() -> None:
    # Several workers may start at once: take the database's write lock first, so that one of
    # them creates the tables and the others find them made. (Use Alembic once the schema changes.)
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        SQLModel.metadata.create_all(connection)


def normalize_email(email: str) -> str:
    # NFC as the email validator stores it, so "ä" matches however the keyboard composed it.
    return unicodedata.normalize("NFC", email.strip().lower())


PASSWORD_MIN_LENGTH, PASSWORD_MAX_LENGTH = 8, 128  # length is what makes a password strong: no composition rules
NewPassword = Annotated[str, Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)]
Password = Annotated[str, Field(max_length=PASSWORD_MAX_LENGTH)]  # refused before any hashing if longer
Token = Annotated[str, Field(min_length=1, max_length=512)]


class EmailRequest(SQLModel):
    email: EmailStr

    @field_validator("email", mode="before")
    @classmethod
    def normalize(cls, value: object) -> object:
        return normalize_email(value) if isinstance(value, str) else value


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


class TokenRequest(BaseModel):
    """The token endpoint's form: the password grant or the refresh grant (RFC 6749 §4.3 and §6)."""

    grant_type: str = "password"  # absent means password, as the Authorize button in /docs sends it
    username: str | None = None  # the email
    password: Password | None = None
    refresh_token: Token | None = None
    scope: str = ""  # space-separated; asking can narrow what is granted, never widen it (RFC 6749 §3.3)

    @model_validator(mode="after")
    def has_the_fields_of_its_grant(self) -> "TokenRequest":
        needed = {"password": ["username", "password"], "refresh_token": ["refresh_token"]}.get(self.grant_type, [])
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"grant_type={self.grant_type} needs {' and '.join(missing)}")
        return self


class RefreshRequest(SQLModel):
    refresh_token: Token


class TokenResponse(SQLModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int  # seconds until the access token expires
    scope: str  # the scopes granted, space-separated


class PasswordChange(SQLModel):
    current_password: Password
    new_password: NewPassword


class PasswordConfirmation(SQLModel):
    password: Password


class PasswordReset(SQLModel):
    token: Token
    new_password: NewPassword


class EmailToken(SQLModel):
    token: Token


class SessionInfo(SQLModel):
    id: str
    created_at: datetime
    last_used_at: datetime
    user_agent: str
    current: bool  # the session of the token this request came with


class Message(SQLModel):
    message: str


class ErrorMessage(SQLModel):
    detail: str


class OAuth2ErrorMessage(ErrorMessage):
    error: str  # RFC 6749 §5.2: invalid_request, invalid_grant, unsupported_grant_type, ...
    error_description: str


# --- Password hashing ---------------------------------------------------------------------------

# argon2id, one step above OWASP's minimum (19 MiB of memory, 2 passes, 1 lane): 3 passes.
# Hashes made with weaker parameters are upgraded at the user's next login.
password_hasher = PasswordHasher(memory_cost=19 * 1024, time_cost=3, parallelism=1)


def lower_thread_priority() -> None:
    # When the CPU is busy, let request handling go first: logins wait a little, the API stays fast.
    if sys.platform == "linux":  # where setpriority applies to a single thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


# Hashing is slow on purpose (tens of ms of CPU and 19 MiB each), so it runs on a pool of its own with
# one thread per core: however many log in at once, the memory and CPU it takes stay bounded.
hash_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="argon2",
                               initializer=lower_thread_priority)

# Unknown emails are checked against this, so they take as long as a wrong password (no user enumeration).
DUMMY_HASH = password_hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    # NFKC: the same password typed on different devices gives the same bytes (NIST SP 800-63B).
    return hash_pool.submit(password_hasher.hash, unicodedata.normalize("NFKC", password)).result()


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return hash_pool.submit(password_hasher.verify, password_hash, unicodedata.normalize("NFKC", password)).result()
    except (VerificationError, InvalidHashError):
        return False


# --- Tokens -------------------------------------------------------------------------------------

ALGORITHM = "HS256"  # pinned: the algorithm named in a token's header is never trusted (RFC 8725)


class AccessTokenClaims(BaseModel):
    sub: int = Field(gt=0, le=MAX_ID)  # the user id
    sid: str  # the login session: the token works only while it is live
    type: Literal["access"]
    scope: str


def create_access_token(user_id: int, session_id: str, scopes: list[str]) -> str:
    now = utc_now()
    claims = {
        "sub": str(user_id),
        "sid": session_id,
        "type": "access",  # so no other kind of token can pass for an access token
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ACCESS_TOKEN_LIFETIME,
        "jti": uuid.uuid4().hex,  # every token unique, even two issued in the same second
    }
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


def decode_access_token(token: str) -> AccessTokenClaims | None:
    """The token's claims if it is a valid, unexpired access token signed with our key; else None."""
    required = ["exp", "iat", "sub", "sid", "type"]
    try:
        return AccessTokenClaims.model_validate(
            jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM], options={"require": required}))
    except (jwt.InvalidTokenError, ValidationError):
        return None


def sha256(token: str) -> str:
    # Tokens are long random strings, so a fast hash is enough to store them: it can't be reversed.
    return hashlib.sha256(token.encode()).hexdigest()


class OAuth2Error(HTTPException):
    """An error of the token endpoints: RFC 6749 §5.2's `error` code goes in the body beside `detail`."""

    def __init__(self, error: str, detail: str, status_code: int = 401, headers: dict[str, str] | None = None) -> None:
        if status_code == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        super().__init__(status_code, detail, headers)
        self.error = error


def grant_scopes(held: list[str], requested: list[str]) -> list[str]:
    """The scopes held that were asked for; asking for none asks for all (RFC 6749 §3.3)."""
    return [scope for scope in held if not requested or scope in requested]


def issue_tokens(session: Session, response: Response, login_session: LoginSession, scopes: list[str]) -> TokenResponse:
    """Store a new refresh token for the login session, commit, and answer with it and an access token."""
    refresh_token = secrets.token_urlsafe(32)
    session.add(RefreshToken(token_hash=sha256(refresh_token), session_id=login_session.id))
    session.commit()
    response.headers["Cache-Control"] = "no-store"  # tokens must never be cached (RFC 6749 §5.1)
    return TokenResponse(
        access_token=create_access_token(login_session.user_id, login_session.id, scopes),
        refresh_token=refresh_token,
        expires_in=int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        scope=" ".join(scopes),
    )


def rotate_refresh_token(session: Session, response: Response, refresh_token: str, requested: list[str]) -> TokenResponse:
    """Trade a refresh token for new tokens of its login session. Each refresh token works once."""
    token = session.get(RefreshToken, sha256(refresh_token))
    # Use the token up with a conditional UPDATE, not read-then-write: of two requests racing with the
    # same token, the database lets exactly one change the row.
    if token and session.exec(update(RefreshToken).where(RefreshToken.token_hash == token.token_hash,
                                                         not_(RefreshToken.used)).values(used=True)).rowcount != 1:
        # A used token came back: the client or a thief replayed it, and we can't tell which. End the
        # whole login session, so the thief's fresh token dies too (RFC 9700 §4.14.2).
        end_sessions(session, LoginSession.id == token.session_id)
        session.commit()
        token = None
    login_session = token and session.exec(select(LoginSession).where(LoginSession.id == token.session_id, is_live())).first()
    user = login_session and session.get(User, login_session.user_id)
    if not user or not user.is_active:
        raise OAuth2Error("invalid_grant", "Invalid or expired refresh token")
    login_session.last_used_at = utc_now()
    session.add(login_session)
    # The login's scopes that the role still holds: a demoted admin's refresh no longer gets `admin`.
    held = [scope for scope in login_session.scopes.split() if scope in ROLE_SCOPES.get(user.role, [])]
    return issue_tokens(session, response, login_session, grant_scopes(held, requested))


def end_sessions(session: Session, *where: ColumnElement[bool]) -> int:
    """End the login sessions that match: their refresh and access tokens stop working at once."""
    return session.exec(update(LoginSession).where(not_(LoginSession.revoked), *where).values(revoked=True)).rowcount


def set_password(session: Session, user_id: int, password_hash: str, keep_session: str | None = None) -> None:
    """Store a new password: every login of the user but `keep_session` ends, and so does a pending reset link."""
    session.exec(update(User).where(User.id == user_id).values(hashed_password=password_hash))
    session.exec(delete(EmailLink).where(EmailLink.user_id == user_id, EmailLink.purpose == "reset"))
    end_sessions(session, LoginSession.user_id == user_id, LoginSession.id != keep_session)


# --- Login throttling: slows down password guessing (OWASP ASVS 2.2.1) ---------------------------

FAILURE_WINDOW = timedelta(minutes=15)
MAX_FAILURES_PER_EMAIL, MAX_FAILURES_PER_CLIENT = 5, 50  # from one client IP, within the window


def check_login_throttle(session: Session, email: str, client: str) -> None:
    """429 while this client has failed too often at this email, or at any: refused before any hashing."""
    failures = session.exec(select(LoginFailure).where(
        LoginFailure.client == client, LoginFailure.failed_at > utc_now() - FAILURE_WINDOW,
    ).order_by(LoginFailure.failed_at.desc()).limit(MAX_FAILURES_PER_CLIENT)).all()
    at_this_email = [failure for failure in failures if failure.email_hash == sha256(email)]
    # Once the limit-th latest failure leaves the window, the client may try again.
    waits = [recent[limit - 1].failed_at + FAILURE_WINDOW - utc_now()
             for recent, limit in ((at_this_email, MAX_FAILURES_PER_EMAIL), (failures, MAX_FAILURES_PER_CLIENT))
             if len(recent) >= limit]
    if waits:
        seconds = str(math.ceil(max(waits).total_seconds()))
        raise OAuth2Error("temporarily_unavailable", f"Too many failed logins: try again in {seconds} seconds",
                          status.HTTP_429_TOO_MANY_REQUESTS, headers={"Retry-After": seconds})


def authenticate(session: Session, email: str, password: str, client: str) -> User:
    """The active user with this email and password, for the password grant; 401, 403 or 429 otherwise."""
    check_login_throttle(session, email, client)
    # No stored email holds a NUL, and PostgreSQL would refuse to compare one.
    user = session.exec(select(User).where(User.email == email)).first() if "\x00" not in email else None
    session.close()  # no connection held while the password is hashed
    # An unknown email is checked against a dummy hash, so it takes as long as a wrong password.
    password_ok = verify_password(password, user.hashed_password if user else DUMMY_HASH)
    if password_ok and password_hasher.check_needs_rehash(user.hashed_password):  # made with weaker parameters
        user.hashed_password = hash_password(password)
    check_login_throttle(session, email, client)  # again: parallel guesses all passed the first check
    if user is None or not password_ok:
        session.add(LoginFailure(client=client, email_hash=sha256(email)))
        session.exec(delete(LoginFailure).where(LoginFailure.failed_at < utc_now() - FAILURE_WINDOW))
        session.commit()
        raise OAuth2Error("invalid_grant", "Incorrect email or password")
    if not user.is_active:
        raise OAuth2Error("invalid_grant", "This account has been deactivated", status.HTTP_403_FORBIDDEN)
    session.exec(delete(LoginFailure).where(LoginFailure.client == client, LoginFailure.email_hash == sha256(email)))
    session.add(user)
    return user


# --- Email: one-time links for password resets and address verification -------------------------


def send_email(to: str, subject: str, body: str) -> None:
    """Send a plain-text email; with no SMTP_HOST, write it to the log. Failures are logged, not raised."""
    if not settings.smtp_host:
        log.warning("SMTP_HOST is not set, so this email was not sent:\nTo: %s\nSubject: %s\n\n%s", to, subject, body)
        return
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = settings.emails_from, to, subject
    message.set_content(body)
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=10) as smtp:
            if settings.smtp_tls:
                smtp.starttls()
            if settings.smtp_user:
                smtp.login(settings.smtp_user, settings.smtp_password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException):
        log.exception("Could not send an email to %s", to)


LINK_EMAILS = {
    "reset": ("reset-password", "Reset your password", "Someone asked to reset the password of your account."),
    "verify": ("verify-email", "Verify your email address", "Please confirm that this address is yours."),
}


def email_link(email: str, purpose: Literal["reset", "verify"]) -> None:
    """Email an active user a one-time link, at most one of each kind a minute. Runs after the response."""
    token, now = secrets.token_urlsafe(32), utc_now()
    with Session(engine) as session:
        user = session.exec(select(User).where(User.email == email, User.is_active)).first()
        if user is None or (purpose == "verify" and user.is_verified):
            return
        link = {"token_hash": sha256(token), "created_at": now, "expires_at": now + LINK_LIFETIMES[purpose]}
        # Replace the previous link only once it is a minute old. Conditional UPDATE, then INSERT: when
        # two requests race, the primary key lets only one of them through.
        if not session.exec(update(EmailLink).where(EmailLink.user_id == user.id, EmailLink.purpose == purpose,
                                                    EmailLink.created_at < now - timedelta(minutes=1)).values(**link)).rowcount:
            session.add(EmailLink(user_id=user.id, purpose=purpose, **link))
        try:
            session.commit()
        except IntegrityError:  # a link less than a minute old is already on its way
            return
    page, subject, why = LINK_EMAILS[purpose]
    minutes = int(LINK_LIFETIMES[purpose].total_seconds() // 60)
    send_email(email, subject, f"{why}\n\n{settings.frontend_url}/{page}?token={token}\n\n"
                                    f"The link works once, within {minutes} minutes. If it wasn't you, ignore this email.")


def use_link(session: Session, token: str, purpose: str) -> int:
    """Use up a one-time link: the id of the user it was emailed to. 400 if it is invalid, used or expired."""
    user_id = session.exec(delete(EmailLink).where(EmailLink.token_hash == sha256(token), EmailLink.purpose == purpose,
                                                   EmailLink.expires_at > utc_now()).returning(EmailLink.user_id)).scalar()
    if user_id is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "This link is invalid, used or expired: ask for a new one")
    return user_id


# --- Dependencies -------------------------------------------------------------------------------


def get_session() -> Iterator[Session]:
    # expire_on_commit=False: what a route returns after committing is sent as is, with no new query.
    with Session(engine, expire_on_commit=False) as session:
        yield session


# scope="function": the session is closed, its transaction ended, before the response goes out.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def hashing_turn() -> AsyncIterator[None]:
    yield  # held until the route has finished


# Routes that hash a password take a turn first. Only a few run at once; the others wait on the event
# loop, holding neither a thread nor a connection, so a crowd of logins can't take every thread.
HashingTurn = Depends(hashing_turn, scope="function", max_concurrency=2 * (os.cpu_count() or 1))


def unauthorized(detail: str) -> HTTPException:
    # A new exception each time: re-raising a shared one would grow its traceback on every request.
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="auth/login",
    scopes={"me": "Use your own account.", "admin": "Manage all users."},
)

# Built once, as it runs on every authenticated request: the user, if this login session is live.
SELECT_SIGNED_IN_USER = (
    select(User.id, User.email, User.is_active, User.is_verified, User.role, LoginSession.id.label("session_id"))
    .join(LoginSession)
    .where(User.id == bindparam("user_id"), LoginSession.id == bindparam("session_id"), User.is_active,
           not_(LoginSession.revoked), LoginSession.expires_at > bindparam("now"))
)


def get_current_user(security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]) -> SignedInUser:
    """The user behind a valid access token, read fresh so that logout, deactivation and demotion apply at once."""
    claims = decode_access_token(token)
    row = None
    if claims is not None:
        # A connection of its own, given back before the route runs (see the rule above the routes).
        with engine.connect() as connection:
            row = connection.execute(SELECT_SIGNED_IN_USER, {"user_id": claims.sub, "session_id": claims.sid,
                                                             "now": utc_now()}).first()
    if row is None:
        raise unauthorized("Could not validate credentials")
    user = SignedInUser.model_validate(row, from_attributes=True)
    scopes = set(claims.scope.split()) & set(ROLE_SCOPES.get(user.role, []))  # only while the role holds them
    if not set(security_scopes.scopes) <= scopes:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Not enough permissions: this needs the scope '{security_scopes.scope_str}'",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{security_scopes.scope_str}"'},
        )
    return user


CurrentUser = Annotated[SignedInUser, Security(get_current_user, scopes=["me"])]
AdminUser = Annotated[SignedInUser, Security(get_current_user, scopes=["admin"])]


async def get_verified_user(user: CurrentUser) -> SignedInUser:
    if not user.is_verified:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Verify your email address first")
    return user


VerifiedUser = Annotated[SignedInUser, Depends(get_verified_user)]  # for routes that need a verified email


def errors(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route can give, for the OpenAPI document (422 is added by FastAPI)."""
    return {code: {"model": ErrorMessage} for code in status_codes}


SIGNED_IN_ERRORS = errors(401, 403)
TOKEN_ERRORS = {code: {"model": OAuth2ErrorMessage} for code in (400, 401, 403, 429)}


# --- App and routes -----------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    create_tables()
    yield


app = FastAPI(title="FastAPI JWT auth starter", lifespan=lifespan)
if settings.cors_origins:  # unset: only pages served from this API's own origin may call it from a browser
    app.add_middleware(CORSMiddleware, allow_origins=[origin.strip() for origin in settings.cors_origins.split(",")],
                       allow_methods=["*"], allow_headers=["Authorization", "Content-Type"])


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default handler echoes the rejected input back, and that input may be a password.
    errors = [{key: value for key, value in error.items() if key not in ("input", "ctx")} for error in exc.errors()]
    description = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors)
    return JSONResponse({"detail": jsonable_encoder(errors), "error": "invalid_request", "error_description": description},
                        status.HTTP_422_UNPROCESSABLE_CONTENT)


@app.exception_handler(OAuth2Error)
async def oauth2_error_handler(request: Request, exc: OAuth2Error) -> JSONResponse:
    content = {"detail": exc.detail, "error": exc.error, "error_description": exc.detail}
    return JSONResponse(content, exc.status_code, headers=exc.headers)


# The rule every route follows: a route that uses the database is a plain `def` with a SessionDep, so
# it runs in FastAPI's thread pool and the event loop never waits for the database. A connection is
# held only while a thread works with it: a route commits, or closes its session after reading, before
# it returns, and closes it before hashing a password; otherwise requests holding connections could
# wait for threads while every thread waits for a connection.


@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastAPI JWT auth starter. Try the API at /docs"}


@app.post("/auth/register", status_code=status.HTTP_201_CREATED, response_model=UserPublic, tags=["auth"],
          responses=errors(409), dependencies=[HashingTurn])
def register(user_in: UserCreate, session: SessionDep, background_tasks: BackgroundTasks) -> User:
    """Create an account, and email it a link to verify its address."""
    user = User(email=user_in.email, hashed_password=hash_password(user_in.password))
    session.add(user)
    try:
        session.commit()
    except IntegrityError:  # the unique email index: also right when two sign-ups race
        raise HTTPException(status.HTTP_409_CONFLICT, "An account with this email already exists")
    background_tasks.add_task(email_link, user.email, "verify")  # after the response: mail never slows it
    return user


@app.post("/auth/login", tags=["auth"], responses=TOKEN_ERRORS, dependencies=[HashingTurn])
def login(form: Annotated[TokenRequest, Form()], request: Request, response: Response, session: SessionDep) -> TokenResponse:
    """The OAuth2 token endpoint: the password grant (`username` is the email; the Authorize button in
    /docs uses it) or the refresh grant."""
    if form.grant_type == "refresh_token":
        return rotate_refresh_token(session, response, form.refresh_token, form.scope.split())
    if form.grant_type != "password":
        raise OAuth2Error("unsupported_grant_type", "grant_type must be password or refresh_token", 400)
    client = request.client.host if request.client else ""
    user = authenticate(session, normalize_email(form.username), form.password, client)
    # Forget the user's finished sessions (their tokens go with them), so the tables don't grow forever.
    session.exec(delete(LoginSession).where(LoginSession.user_id == user.id, LoginSession.expires_at <= utc_now()))
    scopes = grant_scopes(ROLE_SCOPES.get(user.role, []), form.scope.split())
    login_session = LoginSession(user_id=user.id, scopes=" ".join(scopes), expires_at=utc_now() + SESSION_LIFETIME,
                                 user_agent=request.headers.get("user-agent", "")[:200])
    session.add(login_session)
    return issue_tokens(session, response, login_session, scopes)


@app.post("/auth/refresh", tags=["auth"], responses={401: {"model": OAuth2ErrorMessage}})
def refresh(body: RefreshRequest, response: Response, session: SessionDep) -> TokenResponse:
    """Trade a refresh token for new tokens, as JSON. Each refresh token works once (rotation)."""
    return rotate_refresh_token(session, response, body.refresh_token, [])


@app.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"])
def logout(body: RefreshRequest, session: SessionDep) -> None:
    """End the login session of this refresh token, its access tokens too. An unknown token is fine (RFC 7009)."""
    token = session.get(RefreshToken, sha256(body.refresh_token))
    if token is not None:
        end_sessions(session, LoginSession.id == token.session_id)
        session.commit()


@app.post("/auth/forgot-password", status_code=status.HTTP_202_ACCEPTED, tags=["email"])
async def forgot_password(body: EmailRequest, background_tasks: BackgroundTasks) -> Message:
    """Email a link to reset the password, if an active account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "reset")  # all its work after the response: same time
    return Message(message="If an account has this address, an email is on its way.")


@app.post("/auth/reset-password", status_code=status.HTTP_204_NO_CONTENT, tags=["email"], responses=errors(400), dependencies=[HashingTurn])
def reset_password(body: PasswordReset, session: SessionDep) -> None:
    """Set a new password with the token from the reset email. Every login of the account ends."""
    user_id = use_link(session, body.token, "reset")
    session.commit()  # the link is used up before the slow hash, so two requests can't both use it
    set_password(session, user_id, hash_password(body.new_password))
    session.commit()


@app.post("/auth/verify-email", status_code=status.HTTP_204_NO_CONTENT, tags=["email"], responses=errors(400))
def verify_email(body: EmailToken, session: SessionDep) -> None:
    """Mark the address verified, with the token from the verification email."""
    session.exec(update(User).where(User.id == use_link(session, body.token, "verify")).values(is_verified=True))
    session.commit()


@app.post("/auth/verify-email/resend", status_code=status.HTTP_202_ACCEPTED, tags=["email"])
async def resend_verification_email(body: EmailRequest, background_tasks: BackgroundTasks) -> Message:
    """Email a new verification link, if an unverified account has this address. The answer never says."""
    background_tasks.add_task(email_link, body.email, "verify")
    return Message(message="If an account has this address, an email is on its way.")


@app.get("/auth/sessions", tags=["account"], responses=SIGNED_IN_ERRORS)
def list_sessions(user: CurrentUser, session: SessionDep) -> list[SessionInfo]:
    """Your live logins, newest first."""
    statement = select(LoginSession).where(LoginSession.user_id == user.id, is_live())
    logins = session.exec(statement.order_by(LoginSession.created_at.desc())).all()
    session.close()
    return [SessionInfo(**login.model_dump(), current=login.id == user.session_id) for login in logins]


@app.delete("/auth/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["account"],
            responses=errors(401, 403, 404))
def end_session(session_id: str, user: CurrentUser, session: SessionDep) -> None:
    """Log out one of your logins (see GET /auth/sessions), at once."""
    # No session id holds a NUL, and PostgreSQL would refuse to compare one.
    if "\x00" in session_id or not end_sessions(session, LoginSession.id == session_id, LoginSession.user_id == user.id,
                                                 is_live()):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    session.commit()


@app.delete("/auth/sessions", status_code=status.HTTP_204_NO_CONTENT, tags=["account"], responses=SIGNED_IN_ERRORS)
def end_all_sessions(user: CurrentUser, session: SessionDep) -> None:
    """Log out everywhere, this login included."""
    end_sessions(session, LoginSession.user_id == user.id)
    session.commit()


def check_password(session: Session, user_id: int, password: str) -> None:
    """400 unless this is the user's password. The session is closed first: no connection held while hashing."""
    password_hash = session.exec(select(User.hashed_password).where(User.id == user_id)).one()
    session.close()
    if not verify_password(password, password_hash):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "The password is not correct")


@app.post("/auth/change-password", status_code=status.HTTP_204_NO_CONTENT, tags=["account"],
          responses=errors(400, 401, 403), dependencies=[HashingTurn])
def change_password(body: PasswordChange, user: CurrentUser, session: SessionDep) -> None:
    """Change your password. Your other logins end at once; this one goes on."""
    check_password(session, user.id, body.current_password)
    set_password(session, user.id, hash_password(body.new_password), keep_session=user.session_id)
    session.commit()


@app.get("/users/me", tags=["account"], responses=SIGNED_IN_ERRORS)
async def read_me(user: CurrentUser) -> UserPublic:
    return user


@app.delete("/users/me", status_code=status.HTTP_204_NO_CONTENT, tags=["account"], responses=errors(400, 401, 403), dependencies=[HashingTurn])
def delete_me(body: PasswordConfirmation, user: CurrentUser, session: SessionDep) -> None:
    """Delete your account, with all its logins. Your email can sign up again afterwards."""
    check_password(session, user.id, body.password)
    session.exec(delete(User).where(User.id == user.id))
    session.commit()


MAX_PAGE_SIZE = 100


@app.get("/users", response_model=list[UserWithRole], tags=["admin"], responses=SIGNED_IN_ERRORS)
def list_users(
    admin: AdminUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, description=f"at most {MAX_PAGE_SIZE}")] = MAX_PAGE_SIZE,
) -> list[User]:
    users = session.exec(select(User).order_by(User.id).offset(offset).limit(min(limit, MAX_PAGE_SIZE))).all()
    session.close()
    return list(users)


def get_other_user(session: Session, user_id: int, admin: SignedInUser) -> User:
    user = session.get(User, user_id) if 0 < user_id <= MAX_ID else None
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "User not found")
    if user.id == admin.id:  # so the last admin can't lock everyone out by accident
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Admins cannot change or delete their own account here")
    return user


@app.patch("/users/{user_id}", response_model=UserWithRole, tags=["admin"], responses=errors(400, 401, 403, 404))
def update_user(user_id: int, changes: UserUpdate, admin: AdminUser, session: SessionDep) -> User:
    """Deactivate or reactivate a user, or change their role. Takes effect on their very next request."""
    user = get_other_user(session, user_id, admin)
    user.sqlmodel_update(changes.model_dump(exclude_none=True))
    if not user.is_active:
        end_sessions(session, LoginSession.user_id == user.id)
    session.add(user)
    session.commit()
    return user


@app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["admin"],
            responses=errors(400, 401, 403, 404))
def delete_user(user_id: int, admin: AdminUser, session: SessionDep) -> None:
    """Delete a user; their login sessions and tokens go with them (ON DELETE CASCADE)."""
    session.delete(get_other_user(session, user_id, admin))
    session.commit()


# --- Command line: python main.py make-admin EMAIL ------------------------------------------------


def make_admin(email: str) -> int:
    create_tables()
    with Session(engine) as session:
        user = session.exec(select(User).where(User.email == normalize_email(email))).first()
        if user is None:
            print(f"No account with the email {email!r}. Register it first (POST /auth/register).", file=sys.stderr)
            return 1
        user.role = "admin"
        session.add(user)
        session.commit()
    print(f"{normalize_email(email)} is now an admin. Log in again to get a token with the 'admin' scope.")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Manage the auth starter's users.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("make-admin", help="give the admin role to a registered account").add_argument("email")
    args = parser.parse_args()
    sys.exit(make_admin(args.email))

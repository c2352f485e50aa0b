"""FastAPI JWT authentication starter: one file to read top to bottom, then copy.

Run it:   pip install -r requirements.txt && uvicorn main:app --reload   (then open /docs)
Read it:  settings -> tables -> password hashing -> tokens -> dependencies -> routes -> command line
"""

import argparse
import asyncio
import hashlib
import logging
import os
import secrets
import sys
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Query, Request, Response, Security, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm, SecurityScopes
from pydantic import BaseModel, ConfigDict, EmailStr, PositiveInt, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import DateTime, bindparam, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, create_engine, delete, not_, select, update

BASE_DIR = Path(__file__).resolve().parent
log = logging.getLogger("uvicorn.error")  # our messages appear alongside uvicorn's own


# --- Settings: environment variables, or a .env file beside this one -------------------------


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=BASE_DIR / ".env", extra="ignore")

    database_url: str = f"sqlite:///{BASE_DIR / 'app.db'}"
    secret_key: str | None = None  # unset: a key is generated once and kept in .secret_key
    access_token_expire_minutes: PositiveInt = 15
    refresh_token_expire_days: PositiveInt = 14  # a login session's whole life; refreshing doesn't extend it
    cors_origins: str = ""  # comma-separated web origins of browser front ends allowed to call the API

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
REFRESH_SESSION_LIFETIME = timedelta(days=settings.refresh_token_expire_days)


# --- Database and tables --------------------------------------------------------------------


def create_db_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url)  # PostgreSQL and friends need nothing special
    # FastAPI serves requests from several threads; wait up to 30 s for another writer to finish.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def configure_sqlite(dbapi_connection, _connection_record) -> None:  # noqa: ANN001 (DB-API objects)
        # WAL: readers don't wait for the writer. foreign_keys: SQLite leaves them off unless asked.
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    return engine


engine = create_db_engine(settings.database_url)

# What each role may do. A token carries at most these scopes, and only while the user keeps the role.
ROLE_SCOPES = {"user": ["me"], "admin": ["me", "admin"]}


MAX_ID = 2**31 - 1  # ids are INTEGER, 32 bits on PostgreSQL: a larger number is nobody's id


class User(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=254)  # stored trimmed and lower-cased
    hashed_password: str
    is_active: bool = True
    role: str = "user"  # a key of ROLE_SCOPES


class LoginSession(SQLModel, table=True):
    """One login. Its refresh tokens rotate; revoking the session ends all of them at once."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, primary_key=True)
    user_id: int = Field(foreign_key="user.id", ondelete="CASCADE", index=True)
    scopes: str  # granted at login, space-separated; refreshing never widens them
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))  # refreshing never extends it
    revoked: bool = False  # by logout, by a replayed token, or by deactivating the user


class RefreshToken(SQLModel, table=True):
    token_hash: str = Field(primary_key=True)  # SHA-256 of the token; the token itself is never stored
    session_id: str = Field(foreign_key="loginsession.id", ondelete="CASCADE", index=True)
    used: bool = False  # each refresh token works once


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


class UserCreate(SQLModel):
    email: EmailStr
    password: str = Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)

    @field_validator("email", mode="before")
    @classmethod
    def normalize(cls, value: object) -> object:
        return normalize_email(value) if isinstance(value, str) else value


class UserPublic(SQLModel):  # what the API shows of a user: never the password hash
    id: int
    email: str
    is_active: bool


class UserWithRole(UserPublic):  # who is calling (CurrentUser), and what admins see of users
    role: str


class UserUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # a typo must not look like a successful change

    is_active: bool | None = None
    role: Literal["user", "admin"] | None = None


class RefreshRequest(SQLModel):
    refresh_token: str = Field(min_length=1, max_length=256)


class TokenResponse(SQLModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int  # seconds until the access token expires
    scope: str  # the scopes granted, space-separated


# --- Password hashing ------------------------------------------------------------------------

# argon2id, one step above OWASP's minimum (19 MiB of memory, 2 passes, 1 lane): 3 passes.
# Hashes made with weaker parameters are upgraded at the user's next login.
password_hasher = PasswordHasher(memory_cost=19 * 1024, time_cost=3, parallelism=1)


def lower_thread_priority() -> None:
    # When the CPU is busy, let request handling go first: logins wait a little, the API stays fast.
    if sys.platform == "linux":  # where setpriority applies to a single thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


# Hashing is slow on purpose (tens of ms of CPU and 19 MiB each). It runs on a pool of its own with
# one thread per core: the event loop stays free, and memory stays bounded however many log in at once
# (each thread that has hashed keeps its 19 MiB buffer, so the same few threads should do all of it).
hash_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="argon2",
                               initializer=lower_thread_priority)

# Unknown emails are checked against this, so they take as long as a wrong password (no user enumeration).
DUMMY_HASH = password_hasher.hash(secrets.token_urlsafe(16))


def _hash(password: str) -> str:
    # NFKC: the same password typed on different devices gives the same bytes (NIST SP 800-63B).
    return password_hasher.hash(unicodedata.normalize("NFKC", password))


def _verify(password: str, password_hash: str) -> bool:
    try:
        return password_hasher.verify(password_hash, unicodedata.normalize("NFKC", password))
    except (VerificationError, InvalidHashError):
        return False


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(hash_pool, _hash, password)


async def verify_password(password: str, password_hash: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(hash_pool, _verify, password, password_hash)


# --- Tokens ------------------------------------------------------------------------------------

ALGORITHM = "HS256"  # pinned: the algorithm named in a token's header is never trusted (RFC 8725)


def create_access_token(user_id: int, scopes: list[str]) -> str:
    now = datetime.now(timezone.utc)
    claims = {
        "sub": str(user_id),
        "type": "access",  # so no other kind of token can pass for an access token
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ACCESS_TOKEN_LIFETIME,
        "jti": uuid.uuid4().hex,  # every token unique, even two issued in the same second
    }
    return jwt.encode(claims, SECRET_KEY, algorithm=ALGORITHM)


class AccessTokenClaims(BaseModel):
    sub: int = Field(gt=0, le=MAX_ID)  # the user id
    type: Literal["access"]
    scope: str


def decode_access_token(token: str) -> AccessTokenClaims | None:
    """The token's claims if it is a valid, unexpired access token signed with our key; else None."""
    try:
        claims = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM], options={"require": ["exp", "iat", "sub", "type"]})
        return AccessTokenClaims.model_validate(claims)
    except (jwt.InvalidTokenError, ValidationError):
        return None


def hash_refresh_token(token: str) -> str:
    # Refresh tokens are long random strings, so a fast hash is enough: a leaked table can't be reversed.
    return hashlib.sha256(token.encode()).hexdigest()


def add_refresh_token(session: Session, login_session_id: str) -> str:
    """Store a new refresh token (its hash) for a login session and return the token itself."""
    token = secrets.token_urlsafe(32)
    session.add(RefreshToken(token_hash=hash_refresh_token(token), session_id=login_session_id))
    return token


def revoke_login_session(session: Session, login_session_id: str) -> None:
    session.exec(update(LoginSession).where(LoginSession.id == login_session_id).values(revoked=True))


def token_response(response: Response, user_id: int, scopes: list[str], refresh_token: str) -> TokenResponse:
    response.headers["Cache-Control"] = "no-store"  # tokens must never be cached (RFC 6749 §5.1)
    return TokenResponse(
        access_token=create_access_token(user_id, scopes),
        refresh_token=refresh_token,
        expires_in=int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        scope=" ".join(scopes),
    )


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --- Dependencies ----------------------------------------------------------------------------


def get_session() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def unauthorized(detail: str) -> HTTPException:
    # A new exception each time: re-raising a shared one would grow its traceback on every request.
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="auth/login",
    scopes={"me": "Read your own account.", "admin": "Manage all users."},
)


# Built once: it runs on every authenticated request.
SELECT_USER = select(User.id, User.email, User.is_active, User.role).where(User.id == bindparam("user_id"))


async def get_current_user(
    security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]
) -> UserWithRole:
    """The user behind a valid access token, read fresh so deactivation and demotion apply at once.

    This runs on every authenticated request, so it is kept cheap: one primary-key read of just the
    columns needed, run right here on the event loop. It takes less time than handing it to a worker
    thread would (measured: see README, Performance).
    """
    claims = decode_access_token(token)
    row = None
    if claims is not None:
        with engine.connect() as connection:
            row = connection.execute(SELECT_USER, {"user_id": claims.sub}).first()
    if row is None or not row.is_active:
        raise unauthorized("Could not validate credentials")
    user = UserWithRole.model_validate(row, from_attributes=True)
    # A scope counts only while the user's role still holds it.
    scopes = set(claims.scope.split()) & set(ROLE_SCOPES.get(user.role, []))
    if not set(security_scopes.scopes) <= scopes:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Not enough permissions: this needs the scope '{security_scopes.scope_str}'",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{security_scopes.scope_str}"'},
        )
    return user


CurrentUser = Annotated[UserWithRole, Security(get_current_user, scopes=["me"])]
AdminUser = Annotated[UserWithRole, Security(get_current_user, scopes=["admin"])]


# --- App and routes --------------------------------------------------------------------------


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
    errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


@app.get("/")
async def root() -> dict[str, str]:
    return {"message": "FastAPI JWT auth starter. Try the API at /docs"}


# Register and login hash passwords, so they are async: they wait for the hash pool without holding
# one of FastAPI's worker threads, and no database connection is held while a password is hashed.
# A quick indexed read runs right on the event loop; a write, which may have to wait for the
# database's lock, runs in FastAPI's thread pool (run_in_threadpool), in a short session of its own.


def create_user(email: str, hashed_password: str) -> User:
    with Session(engine) as session:
        user = User(email=email, hashed_password=hashed_password)
        session.add(user)
        try:
            session.commit()
        except IntegrityError:  # the unique email index: also right when two sign-ups race
            raise HTTPException(status.HTTP_409_CONFLICT, "An account with this email already exists")
        session.refresh(user)
        return user


@app.post("/auth/register", status_code=status.HTTP_201_CREATED, response_model=UserPublic, tags=["auth"])
async def register(user_in: UserCreate) -> User:
    hashed_password = await hash_password(user_in.password)
    return await run_in_threadpool(create_user, user_in.email, hashed_password)


def start_login_session(user_id: int, scopes: list[str], new_password_hash: str | None) -> str:
    """Store a new login session and its first refresh token (and an upgraded hash); return the token."""
    with Session(engine) as session:
        if new_password_hash:
            session.exec(update(User).where(User.id == user_id).values(hashed_password=new_password_hash))
        login_session = LoginSession(user_id=user_id, scopes=" ".join(scopes),
                                     expires_at=utc_now() + REFRESH_SESSION_LIFETIME)
        session.add(login_session)
        refresh_token = add_refresh_token(session, login_session.id)
        session.commit()
        return refresh_token


def forget_finished_sessions(user_id: int) -> None:
    """Delete the user's expired login sessions (their tokens go with them), so tables don't grow forever."""
    with Session(engine) as session:
        session.exec(delete(LoginSession).where(LoginSession.user_id == user_id, LoginSession.expires_at <= utc_now()))
        session.commit()


def grant_scopes(role: str, requested: list[str]) -> list[str]:
    """Scopes come from the role: asking can narrow them, never widen them (RFC 6749 §3.3)."""
    held = ROLE_SCOPES.get(role, [])
    return [scope for scope in held if not requested or scope in requested]


@app.post("/auth/login", tags=["auth"])
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], response: Response, background_tasks: BackgroundTasks
) -> TokenResponse:
    """OAuth2 password flow: `username` is the email. The Authorize button in /docs uses this."""
    if len(form.password) > PASSWORD_MAX_LENGTH:
        raise HTTPException(422, f"Password must be at most {PASSWORD_MAX_LENGTH} characters")
    email = normalize_email(form.username)
    user = None
    if "\x00" not in email:  # no stored email has one, and PostgreSQL refuses NUL in text
        with engine.connect() as connection:  # a plain connection: one quick read needs no ORM session
            user = connection.execute(select(User).where(User.email == email)).first()
    # An unknown email is checked against a dummy hash, so it takes as long as a wrong password.
    password_ok = await verify_password(form.password, user.hashed_password if user else DUMMY_HASH)
    if user is None or not password_ok:
        raise unauthorized("Incorrect email or password")
    if not user.is_active:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "This account has been deactivated")
    new_hash = None
    if password_hasher.check_needs_rehash(user.hashed_password):  # stored with older, weaker parameters
        new_hash = await hash_password(form.password)
    scopes = grant_scopes(user.role, form.scopes)
    refresh_token = await run_in_threadpool(start_login_session, user.id, scopes, new_hash)
    background_tasks.add_task(forget_finished_sessions, user.id)  # runs after the response is sent
    return token_response(response, user.id, scopes, refresh_token)


@app.post("/auth/refresh", tags=["auth"])
def refresh(body: RefreshRequest, session: SessionDep, response: Response) -> TokenResponse:
    """Trade a refresh token for new tokens. Each refresh token works once (rotation)."""
    token_hash = hash_refresh_token(body.refresh_token)
    # Use the token up with one conditional UPDATE rather than read-then-write: when two requests
    # race with the same token, the database lets exactly one of them change the row.
    used_up_now = session.exec(
        update(RefreshToken).where(RefreshToken.token_hash == token_hash, not_(RefreshToken.used)).values(used=True)
    ).rowcount == 1
    token = session.get(RefreshToken, token_hash)
    if token is None:
        raise unauthorized("Invalid or expired refresh token")
    if not used_up_now:
        # A used token came back: the client or a thief replayed it, and we can't tell which. End the
        # whole login session, so the thief's fresh token dies too (RFC 9700 §4.14.2).
        revoke_login_session(session, token.session_id)
        session.commit()
        raise unauthorized("Invalid or expired refresh token")
    # The session is checked at every use, so a logout that raced this refresh still ends it.
    login_session = session.exec(select(LoginSession).where(
        LoginSession.id == token.session_id, not_(LoginSession.revoked), LoginSession.expires_at > utc_now())).first()
    user = session.get(User, login_session.user_id) if login_session else None
    if login_session is None or user is None or not user.is_active:
        raise unauthorized("Invalid or expired refresh token")
    new_token = add_refresh_token(session, login_session.id)
    session.commit()
    return token_response(response, user.id, login_session.scopes.split(), new_token)


@app.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"])
def logout(body: RefreshRequest, session: SessionDep) -> None:
    """End the login session this refresh token belongs to. Other logins stay signed in.

    An unknown or already revoked token is not an error: it can't be used either way (RFC 7009 §2.2).
    Access tokens are not stored anywhere, so the client discards its own; it expires within minutes.
    """
    token = session.get(RefreshToken, hash_refresh_token(body.refresh_token))
    if token is not None:
        revoke_login_session(session, token.session_id)
        session.commit()


@app.get("/users/me", tags=["users"])
async def read_me(user: CurrentUser) -> UserPublic:
    return user


MAX_PAGE_SIZE = 100


@app.get("/users", response_model=list[UserWithRole], tags=["admin"])
def list_users(
    admin: AdminUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, description=f"at most {MAX_PAGE_SIZE}")] = MAX_PAGE_SIZE,
) -> list[User]:
    statement = select(User).order_by(User.id).offset(offset).limit(min(limit, MAX_PAGE_SIZE))
    return list(session.exec(statement).all())


def get_other_user(session: Session, user_id: int, admin: UserWithRole) -> User:
    user = session.get(User, user_id) if 0 < user_id <= MAX_ID else None
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "User not found")
    if user.id == admin.id:  # so the last admin can't lock everyone out by accident
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Admins cannot change or delete their own account here")
    return user


@app.patch("/users/{user_id}", response_model=UserWithRole, tags=["admin"])
def update_user(user_id: int, changes: UserUpdate, admin: AdminUser, session: SessionDep) -> User:
    """Deactivate or reactivate a user, or change their role. Takes effect on their very next request."""
    user = get_other_user(session, user_id, admin)
    if changes.is_active is not None:
        user.is_active = changes.is_active
    if changes.role is not None:
        user.role = changes.role
    if not user.is_active:  # their access tokens already fail; end their login sessions too
        session.exec(update(LoginSession).where(LoginSession.user_id == user.id).values(revoked=True))
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


@app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["admin"])
def delete_user(user_id: int, admin: AdminUser, session: SessionDep) -> None:
    """Delete a user; their login sessions and refresh tokens go with them (ON DELETE CASCADE)."""
    session.delete(get_other_user(session, user_id, admin))
    session.commit()


# --- Command line: python main.py make-admin EMAIL ----------------------------------------------


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

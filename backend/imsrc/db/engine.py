"""Engine creation: resolve the database (embedded or IMSRC_DATABASE_URL), check pgvector, apply migrations."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session

from imsrc.config import Settings
from imsrc.db import vectors
from imsrc.db.revisions import MIN_PGVECTOR, PGVECTOR_VERSION_SQL, linear_head, parse_version
from imsrc.errors import ConfigurationError, DatabaseUnavailableError, SchemaNotReadyError
from imsrc.resources import alembic_ini, migrations_dir

if TYPE_CHECKING:  # alembic costs ~0.3 s to import: only commands that migrate (or find the schema behind) load it
    from alembic.config import Config

log = logging.getLogger(__name__)


def _sqlalchemy_url(url: str) -> str:
    """Accept plain libpq URLs (postgres://, postgresql://) and point SQLAlchemy at psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(f"IMSRC_DATABASE_URL is not a valid database URL: {url!r}") from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"IMSRC_DATABASE_URL must be a postgresql:// URL, got scheme {parsed.drivername!r}")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def resolve_database_url(settings: Settings) -> str:
    """The libpq URL to use, starting the embedded server when no URL is configured."""
    if settings.database_url:
        _sqlalchemy_url(settings.database_url)  # validate early with a clear message
        return settings.database_url
    from imsrc.db.embedded import server_for

    return server_for(settings).start().url()


# psycopg prepares a statement server-side on its sixth run on a connection, and PostgreSQL may then switch it to
# a generic plan, which knows nothing of the query vector: a per-category walk repeated on a pooled connection got
# ~1.5x slower on one node (stage 2 p50 8.6 vs 5.8 ms, 20k real Fashion-MNIST embeddings, interleaved blocks) and
# ~3x on a Citus worker. Every statement is planned for its own parameters instead; parsing is the only saving
# given up, and no prepared statement is left for a transaction-pooling proxy to trip over.
CONNECT_ARGS: dict[str, Any] = {"connect_timeout": 10, "application_name": "imsrc", "prepare_threshold": None}


# A pooled connection that has sat unused this long is pinged before it is handed out (a server restarted
# meanwhile dropped it); one back in use sooner is not. pool_pre_ping pinged every checkout: one more round trip
# on each request, however busy the pool. A restart takes longer than this, so a connection that was in the pool
# across one is always pinged; one that fails a statement anyway invalidates the pool (the request gets its 503
# and the next one reconnects: tests/test_faults_outage.py).
PING_AFTER_IDLE_S = 1.0


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    vectors.register()  # before any connection: each copies psycopg's adapters when it is made
    engine = create_engine(
        _sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=20,
        connect_args=dict(CONNECT_ARGS),
    )
    event.listen(engine, "connect", _citus_session_defaults)
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", lambda conn, record, _proxy: _ping_if_idle(engine, conn, record))
    return engine


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(engine: Engine, dbapi_connection: Any, record: Any) -> None:
    """Pool checkout: ping a connection idle for PING_AFTER_IDLE_S or more; a dead one is replaced (the pool
    retries the checkout with a new connection when this raises DisconnectionError)."""
    since = record.info.get("checked_in")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
        return  # new (just connected), or back in use at once
    try:
        alive = engine.dialect.do_ping(dbapi_connection)
    except Exception as exc:
        raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc
    if not alive:
        raise DisconnectionError("pooled connection failed its ping")


_SIDE_POOLS: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_SIDE_GUARD = threading.Lock()
SIDE_POOL_SIZE = 8  # idle connections kept; more are opened when needed and closed after use


def side_engine(engine: Engine) -> Engine:
    """A second pool beside `engine`'s, for statements a unit of work runs on connections of their own while it
    holds its session's (Citus stage 2: one per category, search/pg_queries.citus_read). Drawn from the same
    pool, N searches holding N of its connections could all wait for the ones they still need once pool_size +
    max_overflow are out, until the pool timeout. This pool never makes them wait (no overflow limit; the server's
    max_connections is the bound). No ping before each checkout: its callers run a read that changes nothing and
    run it again when the connection turns out to be dropped (pg_queries._side_read). Made on first use, disposed
    with `engine`."""
    with _SIDE_GUARD:
        side = _SIDE_POOLS.get(engine)
        if side is None:
            side = create_engine(
                engine.url,
                pool_pre_ping=False,
                pool_size=SIDE_POOL_SIZE,
                max_overflow=-1,
                connect_args=dict(CONNECT_ARGS),
            )
            event.listen(engine, "engine_disposed", lambda _conn, side=side: side.dispose())
            _SIDE_POOLS[engine] = side
        return side


def _citus_session_defaults(dbapi_connection: Any, _record: Any) -> None:
    """On a Citus coordinator, transactions touch the shards over one connection per worker unless a statement
    asks otherwise (the stage-2 searches do, db/citus.py). Citus refuses to write a table that has a foreign key
    to a reference table (images, ingest_jobs) after the same transaction read the shards over several
    connections per worker, and every catalog write reads vectors first. No-op elsewhere (no row)."""
    with dbapi_connection.cursor() as cur:
        cur.execute(
            "SELECT set_config('citus.multi_shard_modify_mode', 'sequential', false)"
            " FROM pg_extension WHERE extname = 'citus'"
        )
    dbapi_connection.commit()


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def check_server(engine: Engine) -> str:
    """Connect and verify pgvector >= 0.8 is available. Returns the pgvector version."""
    where = describe_url(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            row = conn.execute(text(PGVECTOR_VERSION_SQL)).scalar()
    except OperationalError as exc:
        reason = _one_line(str(exc.orig) if exc.orig else str(exc))
        raise DatabaseUnavailableError(
            f"cannot connect to the database at {where} (IMSRC_DATABASE_URL): {reason}"
        ) from exc
    if row is None:
        raise ConfigurationError(
            f"the PostgreSQL server at {where} has no pgvector extension; install pgvector >= 0.8 "
            "(e.g. the postgresql-NN-pgvector package) or unset IMSRC_DATABASE_URL to use the embedded server"
        )
    version = parse_version(str(row))
    if version < MIN_PGVECTOR:
        raise ConfigurationError(
            f"pgvector {row} on {where} is too old; imsrc needs pgvector >= 0.8 "
            "(iterative index scans). Upgrade the extension package and run ALTER EXTENSION vector UPDATE"
        )
    return str(row)


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return lines[0] if lines else message


# ---------------------------------------------------------------------------- migrations
def alembic_config(url: str) -> Config:
    """The migrations shipped with this installation (the checkout's, or the wheel's copy), for `url`."""
    from alembic.config import Config

    ini = alembic_ini()
    cfg = Config(str(ini)) if ini is not None else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["database_url"] = _sqlalchemy_url(url)
    return cfg


def head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


@lru_cache(maxsize=1)
def shipped_head() -> str | None:
    """The newest migration this installation ships, read once (for probes that run every few seconds)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def round_trip_ms(conn: Connection | Session) -> float:
    """Milliseconds for one trivial query on an open connection: the database's round trip."""
    start = time.perf_counter()
    conn.execute(text("SELECT 1"))
    return round((time.perf_counter() - start) * 1000, 3)


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)
    from imsrc.db import citus

    citus.forget()  # the catalog's shape may have changed under this process's cached answers


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
    from imsrc.db import citus

    citus.forget()


def ensure_schema(engine: Engine, url: str, *, auto_migrate: bool) -> str:
    """Bring the schema to head (or refuse clearly). Returns the revision in force."""
    current = current_revision(engine)
    if current is not None and current == linear_head():
        return current
    head = head_revision(url)
    if current == head:
        return current or ""
    if not auto_migrate:
        raise SchemaNotReadyError(
            f"the database schema is at {current or 'nothing'} but imsrc needs {head}; run `imsrc migrate`"
        )
    log.info("migrating database schema %s -> %s", current, head)
    upgrade(url)
    return head or ""

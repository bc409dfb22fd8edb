"""The Database object: one engine and session factory per process, created once and injected."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from imsrc.config import Settings
from imsrc.db.engine import check_server, ensure_schema, make_engine, resolve_database_url
from imsrc.timings import stage


@dataclass
class Database:
    url: str
    engine: Engine
    settings: Settings
    revision: str = ""
    pgvector_version: str = ""
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits once at the end, rolls back on any error."""
        with self.sessions() as session:
            try:
                yield session
                commit(session)
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


def commit(session: Session) -> None:
    with stage("commit"):
        session.commit()


def end_unit_of_work(session: Session, ok: bool) -> None:
    """What Database.session does at the end of its block: commit (ok) or roll back, then close."""
    try:
        if ok:
            commit(session)
        else:
            session.rollback()
    finally:
        session.close()


def open_database(
    settings: Settings, *, migrate: bool | None = None, pool_size: int = 10, url: str | None = None
) -> Database:
    """Resolve (and if embedded, start) the server, check pgvector and bring the schema to head. `url`: one
    already resolved (a server worker's, from the parent that started the embedded server), used as it is."""
    url = url or resolve_database_url(settings)
    engine = make_engine(url, pool_size=pool_size)
    try:
        version = check_server(engine)
        revision = ensure_schema(engine, url, auto_migrate=settings.auto_migrate if migrate is None else migrate)
    except BaseException:
        engine.dispose()
        raise
    return Database(url=url, engine=engine, settings=settings, revision=revision, pgvector_version=version)

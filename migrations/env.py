"""Alembic environment. The URL comes from the caller (imsrc.db.engine) or, for plain `alembic`
commands, from imsrc's own settings, so both paths migrate the same database."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from imsrc.db.base import Base
from imsrc.db.citus import after_migrations

config = context.config
target_metadata = Base.metadata

# One migrator at a time, even when the CLI and the web server start together.
MIGRATION_LOCK = 727_001


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    from imsrc.config import get_settings
    from imsrc.db.engine import _sqlalchemy_url, resolve_database_url

    return _sqlalchemy_url(resolve_database_url(get_settings()))


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
                # On Citus, SQL functions any revision (re)created must become PL/pgSQL (imsrc/db/citus.py).
                after_migrations(connection)
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""Per-invocation state for CLI commands: settings now, the database on first use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imsrc.errors import ConfigurationError

if TYPE_CHECKING:  # the CLI starts without torch (and the database layer); commands import what they use
    from imsrc.catalog.reader import CatalogReader
    from imsrc.config import Settings
    from imsrc.db.direct import DirectConnection
    from imsrc.db.session import Database
    from imsrc.embeddings import Embedder


class CliContext:
    def __init__(self) -> None:
        # Imported here, not at the top: `imsrc --help` never builds a context and so never pays for pydantic.
        from pydantic import ValidationError

        from imsrc.config import Settings

        try:
            self.settings: Settings = Settings()
        except ValidationError as exc:
            err = exc.errors()[0]
            name = "IMSRC_" + str(err["loc"][0]).upper() if err.get("loc") else "a setting"
            raise ConfigurationError(f"{name}: {err['msg']}") from exc
        self._db: Database | None = None

    def embedder(self, model: str | None) -> tuple[str, Embedder]:
        """The model a command should use (explicit, else the catalog's active one, else IMSRC_MODEL), loaded;
        its one warning (e.g. 'auto' fell back to an image-only model) goes to stderr."""
        from imsrc.cli.output import err_console
        from imsrc.services.models import choose_and_load

        with self.database().session() as session:
            loaded = choose_and_load(session, self.settings, model)
        if loaded.choice.warning:
            err_console.print(f"[yellow]warning:[/yellow] {loaded.choice.warning}", soft_wrap=True)
        return loaded.name, loaded.embedder

    def database(self, *, migrate: bool | None = None) -> Database:
        from imsrc.db.session import open_database

        if self._db is None:
            self._db = open_database(self.settings, migrate=migrate)
        return self._db

    @contextmanager
    def direct(self) -> Iterator[DirectConnection]:
        """For commands that only read: one plain psycopg connection, without SQLAlchemy, the ORM or NumPy
        (imports that would be most of such a command's time). Same server, same schema checks."""
        from imsrc.db.direct import connect_current

        with connect_current(self.settings) as direct:
            yield direct

    @contextmanager
    def reader(self) -> Iterator[CatalogReader]:
        from imsrc.catalog.reader import CatalogReader

        with self.direct() as direct:
            yield CatalogReader(direct.conn)

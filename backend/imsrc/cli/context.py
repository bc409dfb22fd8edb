"""Per-invocation state for CLI commands: settings now, the database on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from imsrc.config import Settings
from imsrc.errors import ConfigurationError

if TYPE_CHECKING:  # the CLI starts without torch (and the database layer); commands import what they use
    from imsrc.db.session import Database
    from imsrc.embeddings import Embedder


class CliContext:
    def __init__(self) -> None:
        try:
            self.settings = Settings()
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

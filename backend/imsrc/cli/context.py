"""Per-invocation state for CLI commands: settings now, the database on first use."""

from __future__ import annotations

from pydantic import ValidationError

from imsrc.config import Settings
from imsrc.db.session import Database, open_database
from imsrc.errors import ConfigurationError


class CliContext:
    def __init__(self) -> None:
        try:
            self.settings = Settings()
        except ValidationError as exc:
            err = exc.errors()[0]
            name = "IMSRC_" + str(err["loc"][0]).upper() if err.get("loc") else "a setting"
            raise ConfigurationError(f"{name}: {err['msg']}") from exc
        self._db: Database | None = None

    def database(self, *, migrate: bool | None = None) -> Database:
        if self._db is None:
            self._db = open_database(self.settings, migrate=migrate)
        return self._db

"""FastAPI dependencies. Heavy objects live on app.state (created once in lifespan) and are injected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.search.service import SearchRuntime


def get_database(request: Request) -> Database:
    db: Database = request.app.state.database
    return db


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(db: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One unit of work per request: the request boundary commits once, or rolls back on error."""
    with db.session() as session:
        yield session


def get_runtime(request: Request) -> SearchRuntime:
    runtime: SearchRuntime = request.app.state.search_runtime
    return runtime


SessionDep = Annotated[Session, Depends(get_session)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RuntimeDep = Annotated[SearchRuntime, Depends(get_runtime)]

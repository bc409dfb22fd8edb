"""FastAPI dependencies. Heavy objects live on app.state (created once in lifespan) and are injected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from imsrc.api.admission import SearchAdmission
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.search.service import SearchRuntime


# The dependencies that only read app.state are coroutines: FastAPI runs a plain `def` dependency in the
# threadpool, so each request took a thread (and, under load, a wait for one behind the searches) per dependency
# just to look up an attribute.
async def get_database(request: Request) -> Database:
    db: Database = request.app.state.database
    return db


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(db: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One unit of work per request: the request boundary commits once, or rolls back on error."""
    with db.session() as session:
        yield session


async def get_runtime(request: Request) -> SearchRuntime:
    runtime: SearchRuntime = request.app.state.search_runtime
    return runtime


async def get_admission(request: Request) -> SearchAdmission:
    admission: SearchAdmission = request.app.state.search_admission
    return admission


SessionDep = Annotated[Session, Depends(get_session)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RuntimeDep = Annotated[SearchRuntime, Depends(get_runtime)]
AdmissionDep = Annotated[SearchAdmission, Depends(get_admission)]

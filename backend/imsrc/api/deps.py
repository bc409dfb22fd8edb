"""FastAPI dependencies. Heavy objects live on app.state (created once in lifespan) and are injected."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, ParamSpec, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from imsrc.api.admission import SearchAdmission
from imsrc.config import Settings
from imsrc.db.session import Database, commit, end_unit_of_work
from imsrc.search.service import SearchRuntime

P = ParamSpec("P")
T = TypeVar("T")


# The dependencies that only read app.state are coroutines: FastAPI runs a plain `def` dependency in the
# threadpool, so each request took a thread (and, under load, a wait for one behind the searches) per dependency
# just to look up an attribute.
async def get_database(request: Request) -> Database:
    db: Database = request.app.state.database
    return db


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# Marks a session that get_session made (a test may inject its own): only such a one is committed early by
# in_unit_of_work.
REQUEST_UNIT = "imsrc_request_unit"


async def get_session(db: Annotated[Database, Depends(get_database)]) -> AsyncIterator[Session]:
    """One unit of work per request: the request boundary commits once, or rolls back on error (as
    Database.session). A coroutine, so that making the session (no I/O: it connects on its first statement) takes
    no trip through the threadpool; ending it does, unless the endpoint ended it already in its own thread
    (in_unit_of_work, which the searches use: two thread hops fewer per search)."""
    session = db.sessions()
    session.info[REQUEST_UNIT] = True
    try:
        yield session
    except BaseException:
        with anyio.CancelScope(shield=True):  # a cancelled request still gives its connection back
            await run_in_threadpool(end_unit_of_work, session, False)
        raise
    if session.in_transaction():
        await run_in_threadpool(end_unit_of_work, session, True)
    else:
        session.close()  # nothing to end: the endpoint committed (or never touched the database)


def in_unit_of_work(session: Session, func: Callable[P, T]) -> Callable[P, T]:
    """func, then the request's commit in the same thread (the request boundary, moved into the threadpool call
    that ran the work): get_session then has nothing left to do in another thread. A session the request did
    not make (a test's) is left as it is."""

    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        result = func(*args, **kwargs)
        if session.info.get(REQUEST_UNIT) and session.in_transaction():
            commit(session)
        return result

    return run


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

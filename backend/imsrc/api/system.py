"""Health and status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from imsrc import __version__
from imsrc.api.deps import DatabaseDep, SessionDep
from imsrc.catalog.repository import StatsRepository
from imsrc.db.engine import current_revision, head_revision

router = APIRouter(tags=["system"])


class Health(BaseModel):
    status: str
    version: str


class ModelStatus(BaseModel):
    name: str
    dimension: int
    family: str
    supports_text: bool
    is_active: bool
    embedded_images: int


class Status(BaseModel):
    version: str
    database: dict[str, Any]
    schema_revision: str | None
    schema_head: str | None
    counts: dict[str, int]
    models: list[ModelStatus]
    active_model: str | None


@router.get("/health", response_model=Health)
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/api/status", response_model=Status)
def status(session: SessionDep, db: DatabaseDep) -> Status:
    stats = StatsRepository(session)
    models = [ModelStatus(**m) for m in stats.models()]
    return Status(
        version=__version__,
        database={
            "reachable": True,
            "embedded": db.settings.embedded,
            "pgvector": db.pgvector_version,
        },
        schema_revision=current_revision(db.engine),
        schema_head=head_revision(db.url),
        counts={k: int(v) for k, v in stats.counts().items()},
        models=models,
        active_model=next((m.name for m in models if m.is_active), None),
    )

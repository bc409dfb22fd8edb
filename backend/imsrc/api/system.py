"""Health and status."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from imsrc import __version__
from imsrc.api.deps import DatabaseDep, SessionDep, SettingsDep
from imsrc.api.security import holds_key
from imsrc.catalog.repository import ModelRepository, StatsRepository
from imsrc.config import Settings
from imsrc.db.citus import distributed, node_statuses
from imsrc.db.engine import current_revision, head_revision, round_trip_ms, shipped_head
from imsrc.db.errors import DATABASE_ERRORS
from imsrc.embeddings import ModelError
from imsrc.embeddings.registry import inference_label
from imsrc.ingest.repository import JobRepository
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.services.models import ModelService

router = APIRouter(tags=["system"])
log = logging.getLogger(__name__)
RECENT_JOBS = 5


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    version: str
    database: Literal["ok", "unreachable"]
    migrations: Literal["current", "out_of_date", "unknown"] = Field(
        description="'out_of_date': the schema is not the revision this version of imsrc ships (run imsrc migrate)"
    )
    schema_revision: str | None
    schema_head: str | None
    round_trip_ms: float | None = Field(description="one trivial query on a pooled connection")
    search_warm: bool | None = Field(
        default=None,
        description="whether the background search warm-up after start "
        "has finished (None when IMSRC_SEARCH_WARMUP is off); readiness does not wait "
        "for it, a balancer may",
    )


class ModelStatus(BaseModel):
    name: str
    dimension: int
    family: str
    supports_text: bool
    is_active: bool
    embedded_images: int


class SearchModel(BaseModel):
    name: str
    supports_text: bool
    inference: str = Field(
        default="torch",
        description="the engine computing query vectors (IMSRC_INFERENCE): "
        "'torch', 'onnx', 'onnx-int8', per tower when they differ ('image onnx, text torch')",
    )
    source: str = Field(
        description="'catalog' (the active model in the database) or 'settings' (IMSRC_MODEL, "
        "used once the first image is indexed)"
    )


class JobStatus(BaseModel):
    id: int
    kind: str
    status: str
    model_name: str | None
    files_total: int | None
    new: int
    duplicates: int
    linked: int
    skipped: int
    failed: int
    message: str | None
    started_at: datetime
    finished_at: datetime | None


class IndexStatus(BaseModel):
    backend: str = Field(description="stage-2 backend searches use by default (IMSRC_SEARCH_BACKEND)")
    model: str = Field(description="the model whose vectors are indexed")
    vectors: int
    hnsw: bool = Field(description="whether the model's catalog-wide HNSW index exists")
    category_indexes: int = Field(
        description="categories large enough to have their own HNSW index; smaller ones are scanned exactly"
    )
    state: str = Field(description="'ready', or 'empty' before the first image is embedded")


class ClusterNode(BaseModel):
    node: str = Field(description="host:port as the coordinator knows it")
    role: Literal["coordinator", "worker"]
    active: bool
    reachable: bool = Field(description="whether the coordinator reached it just now")
    shards: int = Field(description="shards of the embeddings table placed on it")


class ClusterStatus(BaseModel):
    kind: Literal["citus"] = "citus"
    distribution: str = Field(description="how the vectors are spread: 'embeddings by category_id'")
    nodes: list[ClusterNode]


class Status(BaseModel):
    version: str
    database: dict[str, Any]
    schema_revision: str | None
    schema_head: str | None
    counts: dict[str, int]
    models: list[ModelStatus]
    active_model: str | None
    search_model: SearchModel | None = Field(description="the model searches use now")
    text_search: bool = Field(description="whether text queries work with that model")
    index: IndexStatus | None = Field(description="the active model's search index; none before any model")
    jobs: list[JobStatus] = Field(description="the most recent indexing jobs, newest first")
    max_upload_bytes: int = Field(description="largest file POST /api/images accepts (IMSRC_MAX_UPLOAD_BYTES)")
    worker_pid: int = Field(
        description="the server process that answered (with `imsrc serve --workers N` they "
        "differ from one connection to another)"
    )
    cluster: ClusterStatus | None = Field(
        default=None,
        description="the Citus cluster's nodes when the catalog is distributed (None on one server); "
        "with a worker down, the figures that need its shards are left out (zero)",
    )


@router.get("/health", response_model=Health, summary="Liveness: the process answers (touches nothing else)")
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get(
    "/health/ready",
    response_model=Readiness,
    summary="Readiness: the database answers and its schema is the one this version needs",
    responses={
        503: {
            "model": Readiness,
            "description": "not ready: database unreachable or schema out of date (the body says which)",
        }
    },
)
def ready(request: Request, db: DatabaseDep, response: Response) -> Readiness:
    head = shipped_head()
    warming = getattr(request.app.state, "search_warmup", None)
    warm = None if warming is None else warming.done.is_set()
    try:
        with db.engine.connect() as conn:
            trip = round_trip_ms(conn)
    except DATABASE_ERRORS as exc:
        # The reason is for the operator's log; the public answer says only what failed.
        log.warning("not ready: the database cannot be reached: %s", str(exc).strip().splitlines()[0])
        response.status_code = 503
        return Readiness(
            status="unavailable",
            version=__version__,
            database="unreachable",
            migrations="unknown",
            schema_revision=None,
            schema_head=head,
            round_trip_ms=None,
            search_warm=warm,
        )
    revision = current_revision(db.engine)
    current = revision is not None and revision == head
    if not current:
        response.status_code = 503
    return Readiness(
        status="ready" if current else "unavailable",
        version=__version__,
        database="ok",
        migrations="current" if current else "out_of_date",
        schema_revision=revision,
        schema_head=head,
        round_trip_ms=trip,
        search_warm=warm,
    )


@router.get("/api/status", response_model=Status)
def status(request: Request, session: SessionDep, db: DatabaseDep, settings: SettingsDep) -> Status:
    stats = StatsRepository(session)
    cluster = _cluster(session)
    if cluster is not None and not all(n.reachable for n in cluster.nodes):
        # A worker is down: what needs every shard (vector counts) would fail the whole status; the rest is shown.
        models = [ModelStatus(**{**m, "embedded_images": 0}) for m in stats.models(count_vectors=False)]
        counts = {k: int(v) for k, v in stats.counts(count_vectors=False).items()}
        index = None
    else:
        models = [ModelStatus(**m) for m in stats.models()]
        counts = {k: int(v) for k, v in stats.counts().items()}
        index = _index(session, settings)
    trip = round_trip_ms(session)  # after a first query, so the connection is open and this is one round trip
    search_model = _search_model(session, settings)
    return Status(
        version=__version__,
        database={
            "reachable": True,
            "round_trip_ms": trip,
            "embedded": db.settings.embedded,
            "pgvector": db.pgvector_version,
        },
        schema_revision=current_revision(db.engine),
        schema_head=head_revision(db.url),
        counts=counts,
        models=models,
        active_model=next((m.name for m in models if m.is_active), None),
        search_model=search_model,
        text_search=bool(search_model and search_model.supports_text),
        index=index,
        # A job's message can carry server paths (a failed job's error): for key holders only, when a key is set.
        jobs=[
            _job(j, with_message=holds_key(request.headers, settings.api_key))
            for j in JobRepository(session).recent(RECENT_JOBS)
        ],
        max_upload_bytes=settings.max_upload_bytes,
        worker_pid=os.getpid(),
        cluster=cluster,
    )


def _cluster(session: Session) -> ClusterStatus | None:
    if not distributed(session):
        return None
    return ClusterStatus(
        distribution="embeddings by category_id; categories, models and prototypes on every node",
        nodes=[ClusterNode(**vars(n)) for n in node_statuses(session)],
    )


def _index(session: Session, settings: Settings) -> IndexStatus | None:
    models = ModelRepository(session)
    active = models.active()
    if active is None:
        return None
    vectors = models.embedded_count(active.id)
    return IndexStatus(
        backend=settings.search_backend,
        model=active.name,
        vectors=vectors,
        hnsw=models.has_index(active.id),
        category_indexes=len(NeighbourRepository(session).category_indexes(active.id)),
        state="ready" if vectors else "empty",
    )


def _job(row: dict[str, Any], *, with_message: bool) -> JobStatus:
    return JobStatus(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        model_name=row["model_name"],
        files_total=row["files_total"],
        new=row["new_count"],
        duplicates=row["duplicate_count"],
        linked=row["linked_count"],
        skipped=row["skipped_count"],
        failed=row["failed_count"],
        message=row["message"] if with_message else None,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _search_model(session: Session, settings: Settings) -> SearchModel | None:
    try:
        choice = ModelService(session, settings).choose()
        text_ok = choice.supports_text
        engine = inference_label(choice.name, text_ok, settings.inference, settings.model_cache_dir)
        return SearchModel(
            name=choice.name,
            supports_text=text_ok,
            source="catalog" if choice.source == "catalog" else "settings",
            inference=engine,
        )
    except ModelError:
        return None  # a misconfigured model is reported by the commands that need it

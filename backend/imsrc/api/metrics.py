"""Prometheus metrics at /metrics: what the server did (requests, searches, uploads) and what the catalog holds.

Counters and histograms are prometheus_client's usual process-wide metrics (one set per process, however many apps
it creates). With PROMETHEUS_MULTIPROC_DIR set, as `imsrc serve --workers N` needs, the client keeps them in files
in that folder and /metrics adds up every worker's; the folder must exist, be empty at start, and be the same for
all workers. Catalog gauges are never kept: each scrape reads them from the database, so every worker reports the
same numbers and a restart loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from imsrc.api.deps import get_session
from imsrc.catalog.repository import StatsRepository
from imsrc.db.errors import DATABASE_ERRORS
from imsrc.search.schemas import SearchResponse

router = APIRouter(tags=["system"])

# Request latency from a cached thumbnail (~1 ms) to a cold model load or a big upload (tens of seconds).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Search stages: FAISS stage 2 is well under a millisecond, a CPU embedding a few hundred.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HTTP_REQUESTS = Counter(
    "imsrc_http_requests", "HTTP requests answered, by route template and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "imsrc_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
)
SEARCH_STAGE = Histogram(
    "imsrc_search_stage_seconds",
    "Search time per stage (embed, stage1, stage2, rerank, total), by mode and stage-2 backend",
    ["stage", "mode", "backend"],
    buckets=STAGE_BUCKETS,
)
INGEST_FILES = Counter("imsrc_ingest_files", "Files uploaded through this server's API, by outcome", ["outcome"])
INGEST_OUTCOMES = ("new", "duplicate", "failed")
for _outcome in INGEST_OUTCOMES:
    INGEST_FILES.labels(_outcome)  # present (at 0) from the start, so rate() works before the first upload


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)


def observe_search(response: SearchResponse) -> SearchResponse:
    backend = response.backend or "none"  # exact search has no stage-2 backend
    timings = response.timings_ms.model_dump()
    if not response.rerank:
        timings.pop("rerank", None)  # a stage only when a comparator ran, so its histogram is not all zeros
    for stage, ms in timings.items():
        SEARCH_STAGE.labels(stage, response.mode, backend).observe(ms / 1000.0)
    return response


def observe_uploads(outcomes: Iterable[str]) -> None:
    for outcome in outcomes:
        if outcome in INGEST_OUTCOMES:
            INGEST_FILES.labels(outcome).inc()


class CatalogCollector(Collector):
    """Gauges read from the catalog at scrape time. A database that cannot be reached gives imsrc_database_up 0
    instead of a failed scrape, so the server's own metrics still arrive."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("imsrc_database_up", "1 when the catalog database answered this scrape")
        try:
            stats = StatsRepository(self.session)
            counts = stats.counts()
            models = stats.models()
        except DATABASE_ERRORS:
            self.session.rollback()
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, help_text in (
            ("images", "Images in the catalog"),
            ("duplicates", "Images that are near-duplicates of another (non-canonical)"),
            ("categories", "Categories, automatic ones included"),
            ("embeddings", "Stored vectors, all models"),
        ):
            yield GaugeMetricFamily(f"imsrc_catalog_{name}", help_text, value=int(counts[name]))
        yield GaugeMetricFamily(
            "imsrc_database_size_bytes", "Size of the catalog database", value=int(counts["database_bytes"])
        )
        vectors = GaugeMetricFamily(
            "imsrc_catalog_vectors", "Images with a vector, per embedding model", labels=["model", "active"]
        )
        for m in models:
            vectors.add_metric([m["name"], "true" if m["is_active"] else "false"], int(m["embedded_images"]))
        yield vectors


class _Scrape(Collector):
    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def _process_metrics() -> Collector:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # every worker's files, summed
        return registry
    return REGISTRY


def render(session: Session) -> bytes:
    return generate_latest(_Scrape(_process_metrics(), CatalogCollector(session)))


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics (text exposition format)",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
def metrics(session: Annotated[Session, Depends(get_session)]) -> Response:
    return Response(render(session), media_type=CONTENT_TYPE_LATEST)

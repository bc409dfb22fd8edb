"""Alternatives measured beside the shipped design, to choose it by measurement:
- LIST partitions by category, each with its own HNSW (a copy of the vectors in a partitioned table);
- per category, an exact scan vs a partial HNSW index (calibrates settings.search_exact_max_rows)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.search.pg_queries import NeighbourRepository

PARTITIONED = "bench_embeddings_by_category"


def build_partitions(session: Session, model_id: int, dim: int, categories: list[int]) -> dict[str, float]:
    """A LIST-partitioned copy of the model's vectors, one partition + HNSW per category."""
    started = time.perf_counter()
    session.execute(text(f"DROP TABLE IF EXISTS {PARTITIONED}"))
    session.execute(
        text(
            f"CREATE TABLE {PARTITIONED} (image_id bigint NOT NULL, category_id bigint NOT NULL,"
            f" embedding vector({dim}) NOT NULL) PARTITION BY LIST (category_id)"
        )
    )
    for c in categories:
        session.execute(text(f"CREATE TABLE {PARTITIONED}_c{c} PARTITION OF {PARTITIONED} FOR VALUES IN ({c})"))
        session.execute(text(f"ALTER TABLE {PARTITIONED}_c{c} ALTER COLUMN embedding SET STORAGE MAIN"))
    session.execute(
        text(
            f"INSERT INTO {PARTITIONED} SELECT image_id, category_id, embedding::vector({dim}) "
            f"FROM embeddings WHERE model_id = {int(model_id)}"
        )
    )
    copied = time.perf_counter() - started
    session.execute(text("SET LOCAL maintenance_work_mem = '6GB'"))
    started = time.perf_counter()
    session.execute(text(f"CREATE INDEX ON {PARTITIONED} USING hnsw (embedding vector_ip_ops)"))
    built = time.perf_counter() - started
    session.execute(text(f"ANALYZE {PARTITIONED}"))
    size = session.execute(
        text(
            "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            f" WHERE c.relname LIKE '{PARTITIONED}_c%'"
        )
    ).scalar_one()
    return {"partition_copy_s": copied, "partition_hnsw_build_s": built, "partition_hnsw_bytes": float(size)}


def query_partitions(session: Session, dim: int, query: str, categories: list[int], k: int, ef: int) -> list[int]:
    """A plain filtered query on the partitioned table: pruning + Merge Append of per-partition HNSW scans."""
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(ef, k)}"))
    session.execute(text("SET LOCAL enable_sort = off"))
    session.execute(text("SET LOCAL enable_seqscan = off"))
    rows = session.execute(
        text(
            f"SELECT image_id FROM {PARTITIONED} WHERE category_id = ANY(:c) "
            f"ORDER BY embedding <#> CAST(:q AS vector({dim})) LIMIT {int(k)}"
        ),
        {"q": query, "c": categories},
    ).all()
    for name in ("hnsw.ef_search", "enable_sort", "enable_seqscan"):
        session.execute(text(f"SET LOCAL {name} TO DEFAULT"))
    return [int(r[0]) for r in rows]


def drop_partitions(session: Session) -> None:
    session.execute(text(f"DROP TABLE IF EXISTS {PARTITIONED}"))


def ensure_calibration_indexes(session: Session, model_id: int, dim: int, categories: list[int]) -> None:
    nb = NeighbourRepository(session)
    session.execute(text("SET LOCAL maintenance_work_mem = '1GB'"))
    for c in categories:
        nb.create_category_index(model_id, dim, c)


def calibration_pair(
    nb: NeighbourRepository, model_id: int, dim: int, query: str, category: int, k: int, ef: int
) -> dict[str, Any]:
    """The same single-category query through the exact branch and through the HNSW branch."""
    out: dict[str, Any] = {}
    for label, indexed in (("exact", False), ("hnsw", True)):
        started = time.perf_counter()
        hits = nb.per_category(model_id, dim, query, [(category, indexed)], k, ef)
        out[label] = ((time.perf_counter() - started) * 1000, [h[0] for h in hits])
    return out

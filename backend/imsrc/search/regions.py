"""Region search (issue 18, item 2): vectors of a fixed set of windows per image, so a query that shows only
part of an indexed image (a crop, a logo on a product photo) can find it.

Windows are boxes in fractions of the image's width and height (x0, y0, x1, y1). The set was chosen on
bench/robustness (BENCHMARKS.md, "Robustness", window sets): half-size windows at quarter-side steps (3x3
positions: the four quadrants, the centre and the middle of each edge) and central windows of 0.7 and 0.85 of
the side, 11 in all. The whole image is not a
window: its vector is already in `embeddings`, and a partial search merges both (an image scores its best
window or its whole vector, whichever is closer).

Region vectors live in `region_embeddings` (one row per image and window) with one partial HNSW index per
model on half-precision copies, like the per-category indexes of pg_queries.py; results are re-scored at
full precision. All SQL for the table is here (RegionRepository).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.errors import ConflictError
from imsrc.search.pg_queries import EF_SEARCH_MAX, HNSW_EF_CONSTRUCTION, HNSW_M, local_settings, query_as

Box = tuple[float, float, float, float]
# Windows are cut from a copy at most this many pixels a side: a 1/3 window is then still >= 224 px wide.
WORK_SIDE = 768


def _grid(n: int) -> list[Box]:
    s = 1.0 / n
    return [
        (round(c * s, 4), round(r * s, 4), round((c + 1) * s, 4), round((r + 1) * s, 4))
        for r in range(n)
        for c in range(n)
    ]


def _centred(side: float, cx: float = 0.5, cy: float = 0.5) -> Box:
    h = side / 2
    return (round(cx - h, 4), round(cy - h, 4), round(cx + h, 4), round(cy + h, 4))


def _half_stride() -> list[Box]:
    """Half-size windows at a quarter-side stride (3x3 positions): the 2x2 grid, the centre and each edge."""
    return [(x, y, x + 0.5, y + 0.5) for y in (0.0, 0.25, 0.5) for x in (0.0, 0.25, 0.5)]


# Named sets, compared by bench/robustness/run.py --windows-only (BENCHMARKS.md, "Robustness"); WINDOWS is the one
# indexed. Every set is a subset of "dense", so one pass over the dense windows scores them all.
WINDOW_SETS: dict[str, list[Box]] = {
    "grid2": _grid(2),
    "grid2+centre": [*_grid(2), _centred(0.5), _centred(0.7)],
    "half-stride": _half_stride(),
    "half-stride+centre": [*_half_stride(), _centred(0.7), _centred(0.85)],
    "grid": _grid(2) + _grid(3),
    "grid+centre": _grid(2) + _grid(3) + [_centred(0.5), _centred(0.7)],
    "dense": _grid(2)
    + _grid(3)
    + [_centred(0.5), _centred(0.7), _centred(0.85)]
    + [_centred(0.5, cx, cy) for cx, cy in ((0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75))],
}
# 11 windows: on bench/robustness's crops (25-50 % of the area) as good at rank 1 as all 20 of "dense" (the 3x3 grid
# added nothing there) and better than the 13-15 of the grids; 11 rows per image instead of 20.
WINDOWS: list[Box] = WINDOW_SETS["half-stride+centre"]


class RegionsMissingError(ConflictError):
    code = "no_region_vectors"


def window_images(image: Image.Image, boxes: Sequence[Box] = WINDOWS) -> list[Image.Image]:
    """The windows of an RGB image, cut from a copy at most WORK_SIDE a side (the model sees 224 px)."""
    work = image
    if max(image.size) > WORK_SIDE:
        work = image.copy()
        work.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BILINEAR)
    w, h = work.size
    out = []
    for x0, y0, x1, y1 in boxes:
        left, top = round(x0 * w), round(y0 * h)
        box = (left, top, max(round(x1 * w), left + 1), max(round(y1 * h), top + 1))
        out.append(work.crop(box))
    return out


def embed_windows(embedder: object, image: Image.Image, boxes: Sequence[Box] = WINDOWS) -> np.ndarray:
    """(len(boxes), d) unit vectors, one forward pass."""
    tensors = [embedder.preprocess(w) for w in window_images(image, boxes)]  # type: ignore[attr-defined]
    batch = np.stack([np.asarray(t, dtype=np.float32) for t in tensors])  # NumPy or torch pixels alike
    return np.asarray(embedder.encode_images(batch), dtype=np.float32)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RegionHit:
    image_id: int
    score: float
    box: Box


def index_name(model_id: int) -> str:
    return f"ix_region_embeddings_hv_m{int(model_id)}"


def _halfvec(dimension: int) -> str:
    return f"halfvec({int(dimension)})"


class RegionRepository:
    """SQL for region_embeddings. Never commits."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def has_any(self, model_id: int) -> bool:
        return bool(
            self.session.execute(
                text("SELECT EXISTS (SELECT 1 FROM region_embeddings WHERE model_id = :m)"), {"m": model_id}
            ).scalar()
        )

    def require(self, model_id: int, model_name: str) -> None:
        if not self.has_any(model_id):
            raise RegionsMissingError(
                f"match=partial needs region vectors, and model {model_name} has none in this catalog: run "
                "`imsrc embed --regions` to add them (set IMSRC_REGIONS=true to add them while indexing)"
            )

    def counts(self, model_id: int) -> tuple[int, int]:
        """(images with region vectors, region rows) of one model."""
        row = self.session.execute(
            text("SELECT count(DISTINCT image_id), count(*) FROM region_embeddings WHERE model_id = :m"),
            {"m": model_id},
        ).one()
        return int(row[0]), int(row[1])

    def write(self, model_id: int, rows: Sequence[tuple[int, Sequence[Box], np.ndarray]]) -> None:
        """(image_id, boxes, vectors) per image; an image's earlier windows are replaced."""
        if not rows:
            return
        self.session.execute(
            text("DELETE FROM region_embeddings WHERE model_id = :m AND image_id = ANY(:ids)"),
            {"m": model_id, "ids": [int(r[0]) for r in rows]},
        )
        # COPY (text format, rows streamed): a million images are tens of millions of rows.
        raw = self.session.connection().connection.driver_connection
        assert raw is not None
        with (
            raw.cursor() as cur,
            cur.copy(
                "COPY region_embeddings (model_id, image_id, region, x0, y0, x1, y1, embedding) FROM STDIN"
            ) as copy,
        ):
            for image_id, boxes, vectors in rows:
                for n, (box, vec) in enumerate(zip(boxes, vectors, strict=True)):
                    copy.write_row(
                        (
                            model_id,
                            int(image_id),
                            n,
                            *box,
                            "[" + ",".join(map(repr, np.asarray(vec, np.float32).tolist())) + "]",
                        )
                    )

    def missing_page(
        self, model_id: int, after_id: int, limit: int, image_ids: Sequence[int] | None = None
    ) -> list[tuple[int, bytes | None, str | None]]:
        """(id, stored bytes or None, a source path or None) of images that have the model's vector but no
        region vectors yet, in id order after `after_id` (keyset: a resumed run starts where work is left);
        image_ids: only among these."""
        only = "" if image_ids is None else " AND i.id = ANY(:ids)"
        # No join with embeddings, only an uncorrelated IN: on Citus, embeddings is distributed and images is
        # not, and a correlated subquery or join between them is refused (helpers' coordination note).
        rows = self.session.execute(
            text(
                "SELECT i.id, b.data, coalesce(i.source_path,"
                " (SELECT s.path FROM image_sources s WHERE s.image_id = i.id ORDER BY s.id LIMIT 1))"
                " FROM images i LEFT JOIN image_blobs b ON b.image_id = i.id"
                " WHERE i.id > :a AND i.id IN (SELECT image_id FROM embeddings WHERE model_id = :m)"
                " AND NOT EXISTS (SELECT 1 FROM region_embeddings r WHERE r.model_id = :m AND r.image_id = i.id)"
                f"{only} ORDER BY i.id LIMIT :n"
            ),
            {"m": model_id, "a": after_id, "n": limit, "ids": [int(i) for i in image_ids or []]},
        )
        return [(int(r[0]), None if r[1] is None else bytes(r[1]), r[2]) for r in rows]

    def missing_count(self, model_id: int) -> int:
        """Images with the model's vector but no windows. Two counts, not an anti-join with embeddings (Citus,
        as above); windows are only ever written for images that have the vector, and go with the image."""
        vectors = int(
            self.session.execute(
                text("SELECT count(*) FROM embeddings WHERE model_id = :m"), {"m": model_id}
            ).scalar_one()
        )
        return max(0, vectors - self.counts(model_id)[0])

    # ------------------------------------------------------------------ the index
    def ensure_index(self, model_id: int, dimension: int) -> bool:
        """One HNSW graph per model over its region vectors (half precision, inner product: the vectors are
        unit length). Built after a bulk pass, not before, so the rows go in without graph upkeep."""
        exists = self.session.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": index_name(model_id)}).scalar()
        if exists:
            return False
        self.session.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS {index_name(model_id)} ON region_embeddings USING hnsw "
                f"((embedding::{_halfvec(dimension)}) halfvec_ip_ops) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) WHERE model_id = {int(model_id)}"
            )
        )
        return True

    def drop_index(self, model_id: int) -> None:
        name = index_name(model_id)
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(name)
        self.session.execute(text(f"DROP INDEX IF EXISTS {name}"))

    def sizes(self, model_id: int) -> dict[str, int]:
        """Bytes: the table (heap + TOAST) and the model's region index."""
        row = self.session.execute(
            text("SELECT pg_table_size('region_embeddings'), coalesce(pg_relation_size(to_regclass(:n)), 0)"),
            {"n": index_name(model_id)},
        ).one()
        return {"table_bytes": int(row[0]), "index_bytes": int(row[1])}

    # ------------------------------------------------------------------ queries
    def ann(self, model_id: int, dimension: int, query: str, limit: int, ef_search: int) -> list[RegionHit]:
        """The `limit` nearest windows through the model's graph, re-scored at full precision."""
        half = query_as("halfvec", dimension)
        sql = (
            f"SELECT image_id, x0, y0, x1, y1, 1 - (embedding <=> {query_as('vector')}) FROM "
            f"(SELECT image_id, x0, y0, x1, y1, embedding FROM region_embeddings WHERE model_id = "
            f"{int(model_id)} ORDER BY (embedding::{_halfvec(dimension)}) <#> {half} LIMIT {int(limit)}) s"
        )
        ef = str(min(EF_SEARCH_MAX, max(ef_search, limit)))
        with local_settings(
            self.session,
            {
                "hnsw.ef_search": ef,
                "hnsw.iterative_scan": "relaxed_order",
                "enable_seqscan": "off",
                "enable_sort": "off",
            },
        ):
            rows = self.session.execute(text(sql), {"q": query}).all()
        return _hits(rows)

    def exact(self, model_id: int, query: str, limit: int, category_ids: Sequence[int] | None) -> list[RegionHit]:
        """Brute force over the windows (optionally of images in some categories): the ground truth."""
        where = f"r.model_id = {int(model_id)}"
        join = ""
        if category_ids is not None:
            join = " JOIN images i ON i.id = r.image_id"
            where += f" AND i.category_id IN ({','.join(str(int(c)) for c in category_ids) or 'NULL'})"
        sql = (
            f"SELECT r.image_id, r.x0, r.y0, r.x1, r.y1, 1 - (r.embedding <=> CAST(:q AS vector)) AS s "
            f"FROM region_embeddings r{join} WHERE {where} "
            f"ORDER BY (r.embedding <=> CAST(:q AS vector)) + 0, r.image_id LIMIT {int(limit)}"
        )
        return _hits(self.session.execute(text(sql), {"q": query}).all())


def _hits(rows: Sequence[Sequence[Any]]) -> list[RegionHit]:
    out = [RegionHit(int(r[0]), float(r[5]), (float(r[1]), float(r[2]), float(r[3]), float(r[4]))) for r in rows]
    return sorted(out, key=lambda h: (-h.score, h.image_id))


def best_per_image(hits: Sequence[RegionHit]) -> dict[int, RegionHit]:
    """Each image's best window (hits come best first)."""
    best: dict[int, RegionHit] = {}
    for h in hits:
        if h.image_id not in best:
            best[h.image_id] = h
    return best

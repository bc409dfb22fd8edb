"""Near-duplicates of a query: catalog images whose perceptual hash is within the duplicate threshold.

They go first in every search mode, whatever stage 1 picks: a recompressed or resized copy of an indexed
image must find its original at rank 1 (issue 18), and an embedding alone does not guarantee that (stage 1
can route the edited copy to another category). The look-up uses the band indexes of migration
0006_phash_bands (see its docstring for the pigeonhole argument); the exact distance decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.db.citus import UNCATEGORISED, distributed, local_relations
from imsrc.db.vectors import QueryVector, query_text

BANDS = 4
PHASH_MASK = (1 << 64) - 1  # a pHash as the unsigned 64 bits stored in bit(64)
BAND_BITS = 16
# Past this radius per band the probe lists grow fast (radius 3: 697 values per band) and a sequential
# check of bit_count over the images table is the cheaper plan; thresholds 0-11 stay on the indexes.
MAX_BAND_RADIUS = 2


def to_signed(value: int) -> int:
    """Unsigned 64-bit hash -> the bigint PostgreSQL casts to bit(64) with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def band_sql(i: int) -> str:
    """The indexed expression of band i (most significant first); identical to the migration's."""
    return f"(((phash::bigint >> {48 - 16 * i}) & 65535)::int)"


def band_values(phash: int, i: int) -> int:
    return (phash >> (48 - 16 * i)) & 0xFFFF


def within(value: int, radius: int) -> list[int]:
    """Every 16-bit value within `radius` bits of `value` (value itself first)."""
    out = [value]
    for r in range(1, radius + 1):
        for bits in combinations(range(BAND_BITS), r):
            flip = 0
            for b in bits:
                flip |= 1 << b
            out.append(value ^ flip)
    return out


@dataclass(frozen=True)
class NearDuplicate:
    image_id: int
    distance: int  # Hamming distance of the pHash to the query's
    score: float  # cosine similarity of its embedding to the query vector


def _candidates(phash: int, threshold: int) -> tuple[str, dict[str, object]]:
    """WHERE clause and parameters of the images within `threshold` of `phash`: band probes (served by the
    band indexes) while the radius per band is small, then the exact distance."""
    params: dict[str, object] = {"p": to_signed(phash), "t": threshold}
    where = "phash IS NOT NULL AND bit_count(phash # CAST(:p AS bigint)::bit(64)) <= :t"
    radius = threshold // BANDS
    if radius <= MAX_BAND_RADIUS:
        probes = []
        for i in range(BANDS):
            params[f"b{i}"] = within(band_values(phash, i), radius)
            probes.append(f"{band_sql(i)} = ANY(CAST(:b{i} AS int[]))")
        where += f" AND ({' OR '.join(probes)})"
    return where, params


class DuplicateSearchRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def near(
        self,
        phash: int,
        threshold: int,
        *,
        model_id: int,
        query: str | QueryVector,
        limit: int,
        categories: Sequence[int] | None = None,
        exclude: int | None = None,
        include_duplicates: bool = False,
    ) -> list[NearDuplicate]:
        """Images within `threshold` of the unsigned 64-bit `phash` that have an embedding for the model,
        closest first (then by cosine score). Without include_duplicates a near copy that is itself a
        duplicate stands for its canonical image, as stage 2 shows groups by their canonical member."""
        where, params = _candidates(phash, threshold)
        params.update({"m": model_id, "q": query, "x": exclude if exclude is not None else 0})
        target = "id" if include_duplicates else "coalesce(canonical_id, id)"
        if distributed(self.session):
            return self._near_citus(where, params, query, target, limit, categories)
        in_categories = ""
        if categories is not None:
            in_categories = f" AND e.category_id IN ({','.join(str(int(c)) for c in categories) or 'NULL'})"
        sql = (
            f"SELECT t.target, t.d, 1 - (e.embedding <=> CAST(:q AS vector)) AS score FROM "
            f"(SELECT {target} AS target, min(bit_count(phash # CAST(:p AS bigint)::bit(64))) AS d "
            f" FROM images WHERE {where} GROUP BY 1) t "
            f"JOIN embeddings e ON e.image_id = t.target AND e.model_id = :m "
            f"WHERE t.target <> :x{in_categories} ORDER BY t.d, score DESC, t.target LIMIT {int(limit)}"
        )
        rows = self.session.execute(text(sql), params).all()
        return [NearDuplicate(int(r[0]), int(r[1]), float(r[2])) for r in rows]

    def _near_citus(
        self,
        where: str,
        params: dict[str, object],
        query: str | QueryVector,
        target: str,
        limit: int,
        categories: Sequence[int] | None,
    ) -> list[NearDuplicate]:
        """near() on Citus, in two steps: the candidates from the images (on the coordinator), then the vectors
        of just those, from the shards of their categories only. One join would ask every shard, so a search
        would fail while any worker is down even when no near-duplicate lives there. The candidates are read from
        the coordinator's own shard of images (db.citus.local_relations; searches are read-only units of work)."""
        images = local_relations(self.session).get("images", "images")
        found = {
            int(r[0]): (int(r[1]), int(r[2]))
            for r in self.session.execute(
                text(
                    f"SELECT t.target, t.d, coalesce(i.category_id, {UNCATEGORISED}) FROM (SELECT {target} AS target,"
                    f" min(bit_count(phash # CAST(:p AS bigint)::bit(64))) AS d FROM {images} WHERE {where} GROUP BY 1)"
                    f" t JOIN {images} i ON i.id = t.target WHERE t.target <> :x"
                ),
                params,
            )
        }
        if categories is not None:
            found = {i: v for i, v in found.items() if v[1] in set(categories)}
        if not found:
            return []
        shards = ",".join(str(c) for c in sorted({c for _, c in found.values()}))
        rows = self.session.execute(
            text(
                "SELECT image_id, 1 - (embedding <=> CAST(:q AS vector)) FROM embeddings WHERE model_id = :m"
                f" AND category_id IN ({shards}) AND image_id = ANY(:ids)"
            ),
            {"q": query_text(query), "m": params["m"], "ids": sorted(found)},
        ).all()
        hits = sorted(
            ((int(i), found[int(i)][0], float(score)) for i, score in rows), key=lambda h: (h[1], -h[2], h[0])
        )
        return [NearDuplicate(i, d, score) for i, d, score in hits[:limit]]

    def explain(self, phash: int, threshold: int) -> str:
        """The plan of the candidate look-up alone (tests check the band indexes are used)."""
        where, params = _candidates(phash, threshold)
        rows = self.session.execute(text(f"EXPLAIN SELECT id FROM images WHERE {where}"), params).scalars()
        return "\n".join(rows)

    def stored_phash(self, image_id: int) -> int | None:
        value = self.session.execute(text("SELECT phash::bigint FROM images WHERE id = :i"), {"i": image_id}).scalar()
        return None if value is None else int(value) & PHASH_MASK

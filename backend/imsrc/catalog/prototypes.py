"""SQL for category prototypes: one repository for the category_prototypes table. Repositories never commit;
the caller's unit of work does. Computing prototypes (k-means, text prompts) is search's job (search/prototypes.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import vector_literal
from imsrc.db.citus import categorised_condition, local_relations


@dataclass(frozen=True)
class PrototypeRow:
    category_id: int
    kind: str
    ordinal: int
    vector: np.ndarray
    member_count: int


class PrototypeRepository:
    """category_prototypes: mean, k-means 'cluster' and zero-shot 'text' vectors per (category, model)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def replace(self, model_id: int, category_id: int, kinds: Iterable[str], rows: Sequence[PrototypeRow]) -> None:
        """Swap one category's prototypes of the given kinds for `rows` (in the caller's transaction)."""
        self.session.execute(
            text("DELETE FROM category_prototypes WHERE model_id = :m AND category_id = :c AND kind = ANY(:k)"),
            {"m": model_id, "c": category_id, "k": list(kinds)},
        )
        for r in rows:
            self.session.execute(
                text(
                    "INSERT INTO category_prototypes (category_id, model_id, kind, ordinal, vector, member_count)"
                    " VALUES (:c, :m, :k, :o, CAST(:v AS vector), :n)"
                ),
                {
                    "c": r.category_id,
                    "m": model_id,
                    "k": r.kind,
                    "o": r.ordinal,
                    "v": vector_literal(r.vector),
                    "n": r.member_count,
                },
            )

    def load(self, model_id: int, kinds: Sequence[str]) -> list[PrototypeRow]:
        rows = self.session.execute(
            text(
                "SELECT category_id, kind, ordinal, vector::text AS v, member_count FROM category_prototypes"
                " WHERE model_id = :m AND kind = ANY(:k) ORDER BY category_id, kind, ordinal"
            ),
            {"m": model_id, "k": list(kinds)},
        )
        return [
            PrototypeRow(
                int(r.category_id), r.kind, int(r.ordinal), np.asarray(json.loads(r.v), np.float32), int(r.member_count)
            )
            for r in rows
        ]

    def version(self, model_id: int, state_key: str = "") -> tuple[Any, ...]:
        """Changes whenever a prototype or a category name changes, or the search_state row `state_key` (the
        stage-1 calibration) is rewritten: the in-memory matrix reloads then. One statement, run per search (or
        folded into the search's first statement: prototype_version_sql). Read-only units of work only (stage 1's
        PrototypeCache): on Citus it reads the coordinator's own shards (db.citus.local_relations)."""
        sql = prototype_version_sql(":m", ":k", local_relations(self.session))
        return (self.session.execute(text(f"SELECT {sql}"), {"m": model_id, "k": state_key}).scalar(),)

    def member_counts(self, model_id: int) -> dict[int, int]:
        rows = self.session.execute(
            text("SELECT category_id, member_count FROM category_prototypes WHERE model_id = :m AND kind = 'mean'"),
            {"m": model_id},
        )
        return {int(r[0]): int(r[1]) for r in rows}

    def recompute_means(self, category_ids: Iterable[int] | None, model_id: int | None = None) -> int:
        """Set each category's 'mean' prototype (ordinal 0) to the L2-normalised average of its members'
        embeddings, for one model or every model; drop it where the category has no members any more.

        category_ids=None means every category. Returns how many prototypes were written. Runs entirely
        in PostgreSQL (pgvector's avg()), so no vectors travel to the client."""
        ids = None if category_ids is None else sorted({int(c) for c in category_ids})
        if ids is not None and not ids:
            return 0
        where = [categorised_condition(self.session, "e")]
        params: dict[str, object] = {}
        if ids is not None:
            where.append("e.category_id = ANY(:c)")
            params["c"] = ids
        if model_id is not None:
            where.append("e.model_id = :m")
            params["m"] = int(model_id)
        written = self.session.execute(
            text(
                "INSERT INTO category_prototypes (category_id, model_id, kind, ordinal, vector, member_count,"
                " updated_at)"
                " SELECT e.category_id, e.model_id, 'mean', 0, l2_normalize(avg(e.embedding)), count(*), now()"
                f" FROM embeddings e WHERE {' AND '.join(where)}"
                " GROUP BY e.category_id, e.model_id"
                " ON CONFLICT (category_id, model_id, kind, ordinal) DO UPDATE"
                " SET vector = EXCLUDED.vector, member_count = EXCLUDED.member_count, updated_at = EXCLUDED.updated_at"
                " RETURNING category_id, model_id"
            ),
            params,
        ).all()
        stale = ["p.kind = 'mean'"]
        if ids is not None:
            stale.append("p.category_id = ANY(:c)")
        if model_id is not None:
            stale.append("p.model_id = :m")
        # The means just written are exactly the (category, model) pairs that still have members; the others in
        # scope are stale. (A NOT EXISTS over embeddings said the same, but Citus cannot correlate a reference
        # table with the distributed vectors.)
        self.session.execute(
            text(
                f"DELETE FROM category_prototypes p WHERE {' AND '.join(stale)} AND NOT EXISTS"
                " (SELECT 1 FROM unnest(CAST(:kc AS bigint[]), CAST(:km AS int[])) k(c, m)"
                "  WHERE k.c = p.category_id AND k.m = p.model_id)"
            ),
            {**params, "kc": [int(r[0]) for r in written], "km": [int(r[1]) for r in written]},
        )
        return len(written)

    def summary(self, category_id: int) -> list[dict[str, Any]]:
        """Per model and kind: how many prototypes a category has and how many members they cover."""
        rows = self.session.execute(
            text(
                "SELECT m.name AS model, p.kind, count(*) AS count, "
                # cluster prototypes split the members between them; a mean prototype covers them all
                "CASE WHEN p.kind = 'cluster' THEN sum(p.member_count) ELSE max(p.member_count) END AS member_count, "
                "max(p.updated_at) AS updated_at FROM category_prototypes p "
                "JOIN embedding_models m ON m.id = p.model_id WHERE p.category_id = :c "
                "GROUP BY m.name, p.kind ORDER BY m.name, p.kind"
            ),
            {"c": category_id},
        )
        return [dict(r._mapping) for r in rows]


def prototype_version_sql(model_id: str, state_key: str, local: Mapping[str, str] | None = None) -> str:
    """The SQL expression (text) of PrototypeRepository.version, for a model id and a search_state key given as SQL
    expressions (bind parameters, or columns of an outer query that folds it in). `local`: db.citus.local_relations
    (on Citus, the coordinator's own shards of the reference tables read; read-only units of work only)."""
    local = local or {}
    return (
        "(SELECT ROW(count(*), max(p.updated_at), coalesce(sum(p.id), 0), coalesce(sum(hashtext(c.name)), 0),"
        f" (SELECT s.updated_at FROM search_state s WHERE s.key = {state_key}))::text"
        f" FROM {local.get('category_prototypes', 'category_prototypes')} p"
        f" JOIN {local.get('categories', 'categories')} c ON c.id = p.category_id WHERE p.model_id = {model_id})"
    )

"""SQL for category prototypes. Repositories never commit; the caller's unit of work does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


class PrototypeRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def recompute_means(self, category_ids: Iterable[int] | None, model_id: int | None = None) -> int:
        """Set each category's 'mean' prototype (ordinal 0) to the L2-normalised average of its members'
        embeddings, for one model or every model; drop it where the category has no members any more.

        category_ids=None means every category. Returns how many prototypes were written. Runs entirely
        in PostgreSQL (pgvector's avg()), so no vectors travel to the client."""
        ids = None if category_ids is None else sorted({int(c) for c in category_ids})
        if ids is not None and not ids:
            return 0
        where = ["e.category_id IS NOT NULL"]
        params: dict[str, object] = {}
        if ids is not None:
            where.append("e.category_id = ANY(:c)")
            params["c"] = ids
        if model_id is not None:
            where.append("e.model_id = :m")
            params["m"] = int(model_id)
        written: Any = self.session.execute(
            text(
                "INSERT INTO category_prototypes (category_id, model_id, kind, ordinal, vector, member_count,"
                " updated_at)"
                " SELECT e.category_id, e.model_id, 'mean', 0, l2_normalize(avg(e.embedding)), count(*), now()"
                f" FROM embeddings e WHERE {' AND '.join(where)}"
                " GROUP BY e.category_id, e.model_id"
                " ON CONFLICT (category_id, model_id, kind, ordinal) DO UPDATE"
                " SET vector = EXCLUDED.vector, member_count = EXCLUDED.member_count, updated_at = now()"
            ),
            params,
        )
        stale = ["p.kind = 'mean'"]
        if ids is not None:
            stale.append("p.category_id = ANY(:c)")
        if model_id is not None:
            stale.append("p.model_id = :m")
        self.session.execute(
            text(
                f"DELETE FROM category_prototypes p WHERE {' AND '.join(stale)} AND NOT EXISTS"
                " (SELECT 1 FROM embeddings e WHERE e.category_id = p.category_id AND e.model_id = p.model_id)"
            ),
            params,
        )
        return int(getattr(written, "rowcount", 0) or 0)

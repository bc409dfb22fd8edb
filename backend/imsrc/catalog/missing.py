"""Which images lack a model's vector: shared by `imsrc embed` (ingest) and the model service (services).

It lives in the catalog layer so that services need not import ingest (tests/test_layers.py).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.db.citus import distributed

_MISSING = "NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id AND e.model_id = :m)"
# On Citus the vectors are distributed and images stay on the coordinator, and Citus cannot plan a correlated
# subquery between the two; an uncorrelated one is planned first (its ids gathered on the coordinator).
_MISSING_CITUS = "i.id NOT IN (SELECT e.image_id FROM embeddings e WHERE e.model_id = :m)"


def missing_filter(session: Session) -> str:
    """A WHERE condition on `images i` true for images without a vector of model `:m`."""
    return _MISSING_CITUS if distributed(session) else _MISSING


def missing_embedding_count(session: Session, model_id: int) -> int:
    return int(
        session.execute(
            text(f"SELECT count(*) FROM images i WHERE {missing_filter(session)}"), {"m": model_id}
        ).scalar_one()
    )

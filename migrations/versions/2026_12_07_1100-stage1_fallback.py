"""imsrc.search / imsrc.stage1: a query stage 1 is not sure of within the cap searches the whole model, as the
service does.

Revision ID: 0014_stage1_fallback
Revises: 0013_category_vectors
Create Date: 2026-12-07 11:00

Why: the score-mass rule was cut at the cap (imsrc.categories, 3). On real overlapping categories (Fashion-MNIST
through EfficientNet-Lite0) the cut missed the query's own category for ~2 % of queries: two-stage recall stayed
near 0.97 and label precision fell below exact search's. The service now answers a default two-stage query whose
rule wants more than the cap with `ann` over the whole model (IMSRC_SEARCH_STAGE1_FALLBACK, default on; the
calibration is fitted for that rule, search/calibration.py). The SQL functions do the same, so both keep
returning the same ids: imsrc._sure(scores, temperature) says whether the rule (no cap) fits within the cap, or
the custom setting imsrc.stage1_fallback is 0; imsrc._search searches everything (mode ann) otherwise, and
imsrc.stage1 returns no rows for such a query (stage 1 picks nothing; everything is searched).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0014_stage1_fallback"
down_revision: str | None = "0013_category_vectors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _migration_0012() -> ModuleType:
    path = Path(__file__).with_name("2026_12_07_0900-stage1_calibrated.py")
    spec = importlib.util.spec_from_file_location("m0012", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SURE = r"""
-- Whether stage 1 may narrow a default query: the score-mass rule without the cap fits within imsrc.categories
-- (service: stage1.sure), or the fallback is off (imsrc.stage1_fallback = 0, IMSRC_SEARCH_STAGE1_FALLBACK=false).
CREATE FUNCTION imsrc._sure(p_scores double precision[], p_temperature double precision) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT imsrc._setting('stage1_fallback', 1) = 0
        OR imsrc._setting('categories', 3) = 0
        OR imsrc._pick_count(p_scores, 0, p_temperature) <= imsrc._setting('categories', 3)
$$;
"""

OLD_PICK = """                searched := imsrc._pick_count(ranked_scores, p_requested, imsrc._temperature(p_model_id));
                chosen := ranked_ids[1:searched];
                near := chosen;
"""
NEW_PICK = """                searched := imsrc._pick_count(ranked_scores, p_requested, imsrc._temperature(p_model_id));
                IF p_requested IS NULL AND NOT imsrc._sure(ranked_scores, imsrc._temperature(p_model_id)) THEN
                    mode := 'ann';  -- stage 1 is not sure within the cap: search the whole model (service._stage1)
                ELSE
                    chosen := ranked_ids[1:searched];
                    near := chosen;
                END IF;
"""
OLD_STAGE1 = """        imsrc._temperature((imsrc._model(model)).id))
     ORDER BY r.rank;"""
NEW_STAGE1 = """        imsrc._temperature((imsrc._model(model)).id))
       AND (stage1.categories IS NOT NULL
            OR imsrc._sure(ARRAY(SELECT r2.score FROM r r2 ORDER BY r2.rank),
                           imsrc._temperature((imsrc._model(model)).id)))
     ORDER BY r.rank;"""


def upgrade() -> None:
    m0012 = _migration_0012()
    sql = m0012._search_and_stage1(calibrated=True)
    assert sql.count(OLD_PICK) == 1 and sql.count(OLD_STAGE1) == 1
    op.execute(SURE)
    op.execute(sql.replace(OLD_PICK, NEW_PICK).replace(OLD_STAGE1, NEW_STAGE1))
    op.execute(m0012.GRANTS)


def downgrade() -> None:
    m0012 = _migration_0012()
    op.execute(m0012._search_and_stage1(calibrated=True))
    op.execute("DROP FUNCTION imsrc._sure(double precision[], double precision)")

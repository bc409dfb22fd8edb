"""imsrc.search / imsrc.stage1: a query stage 1 is not sure of within the cap searches the categories its rule
wants while they are few, as the service does.

Revision ID: 0017_fallback_categories
Revises: 0016_ann_width
Create Date: 2026-12-07 14:00

Why: since 0014 a default two-stage query whose rule wants more than imsrc.categories (3) categories searches the
whole model (mode ann). At 1M real-calibrated vectors that was 37 % of queries, each walking the model's own graph,
whose pages (full-precision vectors) mostly lay beyond shared_buffers, beside the per-category graphs the other
queries walk. With IMSRC_SEARCH_FALLBACK_CATEGORIES N > 0 the service searches the categories the rule wants
(each at its calibrated width) while they are at most N, and the whole model only beyond that (default 0: as
0014). The SQL functions do the same, reading imsrc.fallback_categories (default 0), so both keep returning the
same ids. imsrc._stage1_count(scores, requested, temperature) is the one place that says how many of the
ranked categories stage 1 searches (0: the whole model); imsrc._search and imsrc.stage1 are taken as the database
holds them and only their stage-1 decision is replaced.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0017_fallback_categories"
down_revision: str | None = "0016_ann_width"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH = "imsrc._search(integer, integer, vector, integer, integer, bigint[], text, boolean, bigint)"
STAGE1 = "imsrc.stage1(vector, integer, text)"

SEARCH_OLD = """\
                searched := imsrc._pick_count(ranked_scores, p_requested, imsrc._temperature(p_model_id));
                IF p_requested IS NULL AND NOT imsrc._sure(ranked_scores, imsrc._temperature(p_model_id)) THEN
                    mode := 'ann';  -- stage 1 is not sure within the cap: search the whole model (service._stage1)
                ELSE
                    chosen := ranked_ids[1:searched];
                    near := chosen;
                END IF;
"""
SEARCH_NEW = """\
                -- service._stage1: 0 = stage 1 is not sure of this query within the cap, and its rule wants
                -- more than imsrc.fallback_categories categories: search the whole model
                searched := imsrc._stage1_count(ranked_scores, p_requested, imsrc._temperature(p_model_id));
                IF searched = 0 THEN
                    mode := 'ann';
                ELSE
                    chosen := ranked_ids[1:searched];
                    near := chosen;
                END IF;
"""
STAGE1_OLD = """\
     WHERE r.rank <= imsrc._pick_count(ARRAY(SELECT r2.score FROM r r2 ORDER BY r2.rank), stage1.categories,
        imsrc._temperature((imsrc._model(model)).id))
       AND (stage1.categories IS NOT NULL
            OR imsrc._sure(ARRAY(SELECT r2.score FROM r r2 ORDER BY r2.rank),
                           imsrc._temperature((imsrc._model(model)).id)))
"""
STAGE1_NEW = """\
     WHERE r.rank <= imsrc._stage1_count(ARRAY(SELECT r2.score FROM r r2 ORDER BY r2.rank), stage1.categories,
        imsrc._temperature((imsrc._model(model)).id))
"""

STAGE1_COUNT = """
-- How many of the ranked categories stage 1 searches (service._stage1); 0: none, the whole model is searched.
-- A requested count, or the rule cut at the cap when it fits there (or the fallback is off); else the rule's own
-- count while it is at most imsrc.fallback_categories.
CREATE FUNCTION imsrc._stage1_count(p_scores double precision[], p_requested int, p_temperature double precision)
RETURNS int LANGUAGE plpgsql STABLE AS $$
DECLARE
    wanted int;
BEGIN
    IF p_requested IS NOT NULL OR imsrc._sure(p_scores, p_temperature) THEN
        RETURN imsrc._pick_count(p_scores, p_requested, p_temperature);
    END IF;
    wanted := imsrc._pick_count(p_scores, 0, p_temperature);
    RETURN CASE WHEN wanted <= imsrc._setting('fallback_categories', 0) THEN wanted ELSE 0 END;
END
$$;
"""


def _migration_0016() -> ModuleType:
    path = Path(__file__).with_name("2026_12_07_1300-ann_width.py")
    spec = importlib.util.spec_from_file_location("m0016", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    m0016 = _migration_0016()
    op.execute(STAGE1_COUNT)
    m0016.swap(SEARCH, SEARCH_OLD, SEARCH_NEW)
    m0016.swap(STAGE1, STAGE1_OLD, STAGE1_NEW)
    m0016.grant("imsrc._stage1_count(double precision[], integer, double precision)")


def downgrade() -> None:
    m0016 = _migration_0016()
    m0016.swap(STAGE1, STAGE1_NEW, STAGE1_OLD)
    m0016.swap(SEARCH, SEARCH_NEW, SEARCH_OLD)
    op.execute("DROP FUNCTION imsrc._stage1_count(double precision[], integer, double precision)")

"""imsrc.search / imsrc.stage1 pick categories with the model's calibrated stage-1 temperature, as the service does.

Revision ID: 0012_stage1_calibrated
Revises: 0011_caption_tsvector
Create Date: 2026-12-07 09:00

Why: stage 1's score-mass rule used a fixed softmax temperature of 0.05 (0005's imsrc._pick_count). The service
now fits the temperature per model at sync time on the catalog's own members (search/calibration.py) and keeps
it in search_state under 'stage1:m<model id>'. The SQL functions must pick the same categories, so
imsrc._temperature(model) reads the same value: the custom setting `imsrc.temperature` when it is > 0 (like
IMSRC_SEARCH_STAGE1_TEMPERATURE), else the calibrated one, else 0.05. _pick_count takes it as an argument;
_search and stage1 (0005's text, otherwise unchanged) pass it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0012_stage1_calibrated"
down_revision: str | None = "0011_caption_tsvector"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _functions_0005() -> str:
    spec = importlib.util.spec_from_file_location("m0005", Path(__file__).with_name("2026_12_02_0200-sql_search.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.FUNCTIONS)


def _block(sql: str, head: str) -> str:
    """One `CREATE FUNCTION ... $$;` statement of 0005, as CREATE OR REPLACE."""
    start = sql.index(head)
    end = sql.index("\n$$;\n", start) + len("\n$$;\n")
    return sql[start:end].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _swap(block: str, old: str, new: str) -> str:
    assert block.count(old) >= 1, old
    return block.replace(old, new)


NEW_HELPERS = r"""
-- The stage-1 temperature of a model: imsrc.temperature when > 0, else the one calibrated at sync time
-- (search/calibration.py, search_state 'stage1:m<id>'), else the rule's old fixed 0.05.
CREATE FUNCTION imsrc._temperature(p_model_id int) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(imsrc._setting('temperature', 0), 0)::double precision,
                    (SELECT (s.value ->> 'temperature')::double precision FROM search_state s
                      WHERE s.key = 'stage1:m' || p_model_id),
                    0.05)
$$;

-- stage1.pick: how many of the ranked categories to search. p_requested NULL: the score-mass rule up to the
-- cap (imsrc.categories); 0: the score-mass rule alone ('auto'); n > 0: exactly n.
CREATE FUNCTION imsrc._pick_count(p_scores double precision[], p_requested int, p_temperature double precision)
RETURNS int
LANGUAGE plpgsql STABLE AS $$
DECLARE
    total int := coalesce(cardinality(p_scores), 0);
    mass double precision := imsrc._setting('score_mass', 0.9);
    cap int := CASE WHEN p_requested = 0 THEN total ELSE imsrc._setting('categories', 3)::int END;
    n int;
BEGIN
    IF total = 0 THEN
        RETURN 0;
    END IF;
    IF p_requested > 0 THEN
        RETURN least(p_requested, total);
    END IF;
    IF mass >= 1 THEN  -- all of the mass: every category up to the cap, whatever the temperature
        RETURN least(total, coalesce(nullif(cap, 0), total));
    END IF;
    -- Softmax at the model's temperature; n = the first position where the cumulative weight reaches the mass.
    -- exp() raises on underflow here (NumPy's gives 0): below e^-700 a weight is nothing next to the first's 1.
    WITH w AS (
        SELECT o, exp(greatest(-700, (s - p_scores[1]) / p_temperature)) AS w
          FROM unnest(p_scores) WITH ORDINALITY u(s, o)
    ), c AS (
        SELECT o, sum(w) OVER (ORDER BY o) / sum(w) OVER () AS cum FROM w
    )
    SELECT count(*) + 1 INTO n FROM c WHERE cum < mass - 1e-12;
    RETURN greatest(1, least(n, total, coalesce(nullif(cap, 0), total)));
END
$$;
"""

GRANTS = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imsrc_reader') THEN
        EXECUTE 'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA imsrc TO imsrc_reader';
    END IF;
END
$$;
"""


def _search_and_stage1(calibrated: bool) -> str:
    sql = _functions_0005()
    search = _block(sql, "CREATE FUNCTION imsrc._search(")
    stage1 = _block(sql, "CREATE FUNCTION imsrc.stage1(")
    if not calibrated:
        return search + stage1
    search = _swap(search, "imsrc._pick_count(ranked_scores, NULL)",
                   "imsrc._pick_count(ranked_scores, NULL, imsrc._temperature(p_model_id))")
    search = _swap(search, "imsrc._pick_count(ranked_scores, p_requested)",
                   "imsrc._pick_count(ranked_scores, p_requested, imsrc._temperature(p_model_id))")
    stage1 = _swap(stage1, "stage1.categories)",
                   "stage1.categories,\n        imsrc._temperature((imsrc._model(model)).id))")
    return search + stage1


def upgrade() -> None:
    op.execute("DROP FUNCTION imsrc._pick_count(double precision[], int)")
    op.execute(NEW_HELPERS)
    op.execute(_search_and_stage1(calibrated=True))
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP FUNCTION imsrc._pick_count(double precision[], int, double precision)")
    op.execute("DROP FUNCTION imsrc._temperature(int)")
    op.execute(_block(_functions_0005(), "CREATE FUNCTION imsrc._pick_count(").replace(
        "CREATE OR REPLACE FUNCTION", "CREATE FUNCTION"))
    op.execute(_search_and_stage1(calibrated=False))

"""All catalog SQL. Repositories take a Session and never commit; the caller's unit of work does."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from imsrc.catalog.models import Category, EmbeddingModel, Image
from imsrc.catalog.reader import CATEGORIES_SQL, COUNTS_SQL, MODELS_SQL
from imsrc.db.citus import sequential_shard_commands
from imsrc.db.vectors import vector_literal as vector_literal  # its home before db.vectors: importers keep it
from imsrc.errors import ConflictError, NotFoundError

# HNSW indexes `vector` up to 2,000 dimensions and `halfvec` up to 4,000.
HNSW_MAX_VECTOR_DIM = 2000


def embedding_expr(dimension: int) -> str:
    """The expression of a model's graph over every image (mode `ann`), as a query must write it to walk that
    graph: half precision at every dimension. A walk reads one graph element per visited neighbour, and the graph
    is the biggest thing a 1M-image catalog holds besides the vectors themselves (1280-d: 7.8 GB on vector,
    ~3.9 GB on halfvec), so halving it keeps twice as much of it in memory; the walk only ranks, scores are
    computed from the full-precision row (legacy_global_expr: catalogs indexed before this)."""
    return f"(embedding::halfvec({int(dimension)}))"


def legacy_global_expr(dimension: int) -> str:
    """What the graph over every image was built on before it was half precision everywhere (full precision up to
    HNSW_MAX_VECTOR_DIM dimensions); search sync rebuilds such a graph on embedding_expr."""
    if dimension <= HNSW_MAX_VECTOR_DIM:
        return f"(embedding::vector({int(dimension)}))"
    return embedding_expr(dimension)


GLOBAL_OPCLASS = "halfvec_cosine_ops"


def global_index_ddl(
    model_id: int,
    dimension: int,
    *,
    name: str | None = None,
    options: str = "",
    concurrently: bool = False,
    if_not_exists: bool = False,
) -> str:
    """CREATE INDEX of a model's graph over every image on embedding_expr (`name`: default global_index_name;
    `options`: a storage clause such as "m = 32, ef_construction = 80"), for ModelRepository.ensure_index,
    rebuild_legacy_global_index and the benchmarks' builds alike."""
    return (
        f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}{'IF NOT EXISTS ' if if_not_exists else ''}"
        f"{name or global_index_name(model_id)} ON embeddings "
        f"USING hnsw ({embedding_expr(dimension)} {GLOBAL_OPCLASS}){f' WITH ({options})' if options else ''} "
        f"WHERE model_id = {int(model_id)}"
    )


_GLOBAL_INDEXDEF = "SELECT indexdef FROM pg_indexes WHERE tablename = 'embeddings' AND indexname = :n"


def _global_index_half(conn: Session | Connection, model_id: int) -> bool | None:
    """ModelRepository.global_index_half on a session or a connection."""
    definition = conn.execute(text(_GLOBAL_INDEXDEF), {"n": global_index_name(model_id)}).scalar()
    return None if definition is None else "halfvec" in str(definition)


def global_index_name(model_id: int) -> str:
    """The per-model HNSW index over every image of a model (mode `ann`)."""
    return f"ix_embeddings_hnsw_m{int(model_id)}"


class CategoryRepository:
    """The categories table: named ones people made, automatic ones search made, and images' labels."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, category_id: int) -> Category:
        category = self.session.get(Category, category_id)
        if category is None:
            raise NotFoundError(f"category {category_id} does not exist")
        return category

    def by_name(self, name: str) -> Category | None:
        stmt = select(Category).where(func.lower(Category.name) == name.strip().lower())
        return self.session.scalars(stmt).first()

    def resolve(self, name_or_id: str) -> int | None:
        """A category's id by name (any case) or, failing that, by numeric id."""
        value = name_or_id.strip()
        found = self.by_name(value)
        if found is None and value.isascii() and value.isdigit() and len(value) < 19:  # isdigit: also '²'
            found = self.session.get(Category, int(value))
        return None if found is None else found.id

    def get_or_create(self, name: str, *, description: str | None = None, automatic: bool = False) -> Category:
        """Race-safe: a concurrent creator of the same name wins and we return its row."""
        clean = name.strip()
        row = self.session.execute(
            text(
                "INSERT INTO categories (name, description, is_automatic) VALUES (:n, :d, :a) "
                "ON CONFLICT ((lower(name))) DO NOTHING RETURNING id"
            ),
            {"n": clean, "d": description, "a": automatic},
        ).first()
        if row is not None:
            return self.get(int(row[0]))
        existing = self.by_name(clean)
        assert existing is not None
        return existing

    def list_with_counts(self) -> list[dict[str, Any]]:
        rows = self.session.execute(text(CATEGORIES_SQL))
        return [dict(r._mapping) for r in rows]

    def with_counts(self, category_id: int) -> dict[str, Any]:
        row = self.session.execute(text("SELECT * FROM catalog_categories WHERE id = :i"), {"i": category_id}).first()
        if row is None:
            raise NotFoundError(f"category {category_id} does not exist")
        return dict(row._mapping)

    def create(self, name: str, *, description: str | None = None) -> Category:
        """A new named (not automatic) category; an existing name, in any letter case, is a conflict."""
        row = self.session.execute(
            text(
                "INSERT INTO categories (name, description, is_automatic) VALUES (:n, :d, false) "
                "ON CONFLICT ((lower(name))) DO NOTHING RETURNING id"
            ),
            {"n": name.strip(), "d": description},
        ).first()
        if row is None:
            raise ConflictError(f"a category named {name.strip()!r} already exists")
        return self.get(int(row[0]))

    def update(
        self,
        category: Category,
        *,
        name: str | None = None,
        description: str | None = None,
        set_description: bool = False,
    ) -> Category:
        """Rename and/or describe. Renaming an automatic category makes it a real one: a person named it."""
        if name is not None and name != category.name:
            clash = self.by_name(name)
            if clash is not None and clash.id != category.id:
                raise ConflictError(f"a category named {name!r} already exists")
            try:
                with self.session.begin_nested():
                    self.session.execute(
                        text("UPDATE categories SET name = :n, is_automatic = false WHERE id = :i"),
                        {"n": name, "i": category.id},
                    )
            except IntegrityError as exc:  # a concurrent rename won the name
                raise ConflictError(f"a category named {name!r} already exists") from exc
        if set_description:
            self.session.execute(
                text("UPDATE categories SET description = :d WHERE id = :i"), {"d": description, "i": category.id}
            )
        self.session.refresh(category)
        return category

    def names(self, category_ids: Iterable[int] | None = None) -> dict[int, str]:
        if category_ids is None:
            rows = self.session.execute(text("SELECT id, name FROM categories"))
        else:
            rows = self.session.execute(
                text("SELECT id, name FROM categories WHERE id = ANY(:c)"), {"c": list(category_ids)}
            )
        return {int(r[0]): str(r[1]) for r in rows}

    def of_images(self, image_ids: Iterable[int]) -> dict[int, tuple[int, str]]:
        """image id -> (category id, name), for those of the images that are in a category."""
        rows = self.session.execute(
            text(
                "SELECT i.id, c.id, c.name FROM images i JOIN categories c ON c.id = i.category_id WHERE i.id = ANY(:i)"
            ),
            {"i": sorted(set(image_ids))},
        )
        return {int(r[0]): (int(r[1]), str(r[2])) for r in rows}

    def automatic_ids(self) -> list[int]:
        return [int(r[0]) for r in self.session.execute(text("SELECT id FROM categories WHERE is_automatic"))]

    def real_ids(self) -> list[int]:
        return [int(r[0]) for r in self.session.execute(text("SELECT id FROM categories WHERE NOT is_automatic"))]

    def create_automatic(self, name: str, description: str) -> int:
        """A group made by clustering (search/autogroup.py picks a free name under the catalog write lock)."""
        return int(
            self.session.execute(
                text("INSERT INTO categories (name, description, is_automatic) VALUES (:n, :d, true) RETURNING id"),
                {"n": name, "d": description},
            ).scalar_one()
        )

    def delete(self, category_ids: Sequence[int]) -> None:
        # images.category_id is ON DELETE SET NULL; the sync trigger clears embeddings.category_id too.
        self.session.execute(text("DELETE FROM categories WHERE id = ANY(:c)"), {"c": list(category_ids)})

    def assign(self, image_ids: np.ndarray, category_ids: np.ndarray) -> None:
        if len(image_ids) == 0:
            return
        self.session.execute(
            text(
                "UPDATE images i SET category_id = v.c FROM unnest(CAST(:i AS bigint[]), CAST(:c AS bigint[]))"
                " AS v(i, c) WHERE i.id = v.i AND i.category_id IS DISTINCT FROM v.c"
            ),
            {"i": [int(x) for x in image_ids], "c": [int(x) for x in category_ids]},
        )

    def set_predictions(self, image_ids: np.ndarray, category_ids: np.ndarray, scores: np.ndarray) -> None:
        if len(image_ids) == 0:
            return
        self.session.execute(
            text(
                "UPDATE images i SET predicted_category_id = v.c, predicted_score = v.s"
                " FROM unnest(CAST(:i AS bigint[]), CAST(:c AS bigint[]), CAST(:s AS float8[])) AS v(i, c, s)"
                " WHERE i.id = v.i"
            ),
            {"i": [int(x) for x in image_ids], "c": [int(x) for x in category_ids], "s": [float(x) for x in scores]},
        )


class ModelRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def by_name(self, name: str) -> EmbeddingModel | None:
        return self.session.scalars(select(EmbeddingModel).where(EmbeddingModel.name == name)).first()

    def active(self) -> EmbeddingModel | None:
        return self.session.scalars(select(EmbeddingModel).where(EmbeddingModel.is_active)).first()

    def list(self) -> list[EmbeddingModel]:
        return list(self.session.scalars(select(EmbeddingModel).order_by(EmbeddingModel.id)))

    def register(
        self, *, name: str, dimension: int, family: str, params: dict[str, Any], supports_text: bool
    ) -> EmbeddingModel:
        """Insert the model if new (race-safe) and make sure its HNSW index exists."""
        self.session.execute(
            text(
                "INSERT INTO embedding_models (name, dimension, family, params, supports_text) "
                "VALUES (:n, :d, :f, CAST(:p AS jsonb), :t) ON CONFLICT (name) DO NOTHING"
            ),
            {"n": name, "d": dimension, "f": family, "p": _json(params), "t": supports_text},
        )
        model = self.by_name(name)
        assert model is not None
        self.ensure_index(model)
        return model

    def ensure_index(self, model: EmbeddingModel) -> None:
        # A partial index per model: each model's vectors get their own HNSW graph of the right dimension.
        name = global_index_name(model.id)
        # CREATE INDEX IF NOT EXISTS takes a SHARE lock on embeddings before it notices the index exists, and
        # holds it to commit: two concurrent uploads then each wait for the other's lock to COPY their
        # vectors (deadlock). So look first, and let only one transaction at a time try to create it.
        if self.session.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
            return
        self.session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})
        if self.session.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
            return  # created by the transaction we waited for
        sequential_shard_commands(self.session)
        self.session.execute(text(global_index_ddl(model.id, model.dimension, if_not_exists=True)))

    def set_active(self, model: EmbeddingModel) -> None:
        self.session.execute(
            text("UPDATE embedding_models SET is_active = false WHERE is_active AND id <> :i"), {"i": model.id}
        )
        self.session.execute(text("UPDATE embedding_models SET is_active = true WHERE id = :i"), {"i": model.id})
        # The UPDATEs bypass the ORM: make every loaded model re-read its flag.
        for obj in list(self.session.identity_map.values()):
            if isinstance(obj, EmbeddingModel):
                self.session.expire(obj, ["is_active"])

    def remove(self, model: EmbeddingModel) -> None:
        """Drop one model's vectors, prototypes and catalog-wide index (its per-category indexes belong to
        search: services.models.ModelService.remove drops them first)."""
        sequential_shard_commands(self.session)
        self.session.execute(text(f"DROP INDEX IF EXISTS {global_index_name(model.id)}"))
        self.session.execute(text("DELETE FROM embedding_models WHERE id = :i"), {"i": model.id})

    def has_index(self, model_id: int) -> bool:
        """Whether the model's catalog-wide HNSW index exists (it is built by ensure_index)."""
        return bool(
            self.session.execute(
                text("SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE tablename = 'embeddings' AND indexname = :n)"),
                {"n": global_index_name(model_id)},
            ).scalar()
        )

    def global_index_half(self, model_id: int) -> bool | None:
        """Whether the model's catalog-wide graph is on halfvec (embedding_expr), False for a legacy one on
        full-precision vectors (legacy_global_expr), None without one."""
        return _global_index_half(self.session, model_id)

    def embedded_count(self, model_id: int) -> int:
        return int(
            self.session.execute(
                text("SELECT count(*) FROM embeddings WHERE model_id = :m"), {"m": model_id}
            ).scalar_one()
        )


class StatsRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def counts(self, *, count_vectors: bool = True) -> dict[str, Any]:
        """count_vectors=False: 0 embeddings without reading them (a Citus worker holding some is down)."""
        sql = COUNTS_SQL if count_vectors else COUNTS_SQL.replace("(SELECT count(*) FROM embeddings)", "0::bigint")
        row = self.session.execute(text(sql)).one()
        return dict(row._mapping)

    def models(self, *, count_vectors: bool = True) -> list[dict[str, Any]]:
        sql = (
            MODELS_SQL
            if count_vectors
            else (
                "SELECT name, dimension, family, supports_text, is_active, 0::bigint AS embedded_images"
                " FROM embedding_models ORDER BY id"
            )
        )
        rows = self.session.execute(text(sql))
        return [dict(r._mapping) for r in rows]

    def image_count(self) -> int:
        return int(self.session.scalar(select(func.count()).select_from(Image)) or 0)


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def rebuild_legacy_global_index(engine: Engine, model_id: int, dimension: int, *, settle_s: float) -> bool:
    """Rebuild a model's legacy full-precision graph over every image (legacy_global_expr) on embedding_expr, with
    the same storage options (m, ef_construction); whether one was rebuilt. On a connection of its own, in
    autocommit: CREATE INDEX CONCURRENTLY, so uploads and searches go on meanwhile (about 20 minutes at 1M 1280-d
    rows on 2 cores). The new graph then takes the name and the old one is kept `settle_s` longer under another
    name before it is dropped: a server that read "legacy" just before (SearchRuntime caches it for a few seconds)
    still finds a graph in the expression it writes. Plain PostgreSQL only: the caller leaves a Citus coordinator
    alone (its distributed DDL is rebuilt by hand there, db/README.md). An interrupted rebuild leaves <name>_half
    (perhaps INVALID), dropped by the next one. DDL that commits as it goes, unlike the repositories above."""
    name = global_index_name(model_id)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(hashtext(:n))"), {"n": f"rebuild {name}"})  # one rebuild at a time
        try:
            if _global_index_half(conn, model_id) is not False:
                return False
            options = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = :n AND relkind = 'i'"), {"n": name}
            ).scalar()
            pairs = [str(o).split("=", 1) for o in options or []]
            if any(len(p) != 2 or not p[0].isidentifier() or not p[1].replace(".", "").isalnum() for p in pairs):
                raise ValueError(f"unexpected storage options on {name}: {options!r}")
            storage = ", ".join(f"{k} = {v}" for k, v in pairs)
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}_half"))
            conn.execute(
                text(global_index_ddl(model_id, dimension, name=f"{name}_half", options=storage, concurrently=True))
            )
            conn.execute(text(f"DROP INDEX IF EXISTS {name}_legacy"))
            conn.execute(text(f"ALTER INDEX {name} RENAME TO {name}_legacy"))
            conn.execute(text(f"ALTER INDEX {name}_half RENAME TO {name}"))
            time.sleep(settle_s)
            conn.execute(text(f"DROP INDEX CONCURRENTLY {name}_legacy"))
            return True
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(hashtext(:n))"), {"n": f"rebuild {name}"})

"""SQL for search bookkeeping: reading vectors in bulk, search state, the change log.

Stage-2 neighbour queries and per-category index DDL live in pg_queries.py; categories and their prototypes
are catalog tables (catalog/repository.py, catalog/prototypes.py). Repositories never commit.
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, cast, column, exists, literal_column, select, text
from sqlalchemy import table as table_clause
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from imsrc.catalog.models import EmbeddingModel, Image
from imsrc.catalog.prototypes import prototype_version_sql
from imsrc.db.citus import UNCATEGORISED, distributed, local_relations, uncategorised_condition

# search_state key of a model's stage-1 calibration: this prefix and the model id (calibration.state_key).
STATE_KEY_PREFIX = "stage1:m"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = len(_COPY_SIGNATURE) + 8  # signature, flags, header-extension length (always 0 here)


@dataclass(frozen=True)
class VectorBatch:
    image_ids: np.ndarray  # int64 (n,)
    category_ids: np.ndarray  # int64 (n,), -1 = no category
    vectors: np.ndarray  # float32 (n, d)

    def __len__(self) -> int:
        return len(self.image_ids)


def _copy_row(dimension: int, *int8_columns: str) -> np.dtype:
    """One row of a binary COPY of int8 columns then a `dimension`-d vector: the field count, each field's length
    before it, and pgvector's binary vector (int16 dimension, int16 unused, big-endian float4s)."""
    fields: list[tuple[Any, ...]] = [("nf", ">i2")]
    for n, name in enumerate(int8_columns, start=1):
        fields += [(f"l{n}", ">i4"), (name, ">i8")]
    fields += [(f"l{len(int8_columns) + 1}", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dimension,))]
    return np.dtype(fields)


def _parse_binary_copy(data: bytes, dimension: int) -> VectorBatch:
    """Parse COPY (image_id int8, category_id int8 NOT NULL, embedding vector) TO STDOUT (FORMAT BINARY).

    Every row has the same layout, so NumPy reads it as one structured array instead of a Python loop:
    1M rows of 512-d parse in well under a second.
    """
    if not data.startswith(_COPY_SIGNATURE):
        raise ValueError("not a binary COPY stream")
    body = memoryview(data)[_HEADER : len(data) - 2]  # trailer: int16 -1
    row = _copy_row(dimension, "id", "cat")
    if len(body) % row.itemsize:
        raise ValueError(f"vectors are not all {dimension}-dimensional")
    rows = np.frombuffer(body, dtype=row)
    if len(rows) and (rows["dim"] != dimension).any():
        raise ValueError(f"vectors are not all {dimension}-dimensional")
    return VectorBatch(
        rows["id"].astype(np.int64),
        rows["cat"].astype(np.int64),
        np.ascontiguousarray(rows["vec"], dtype=np.float32).reshape(len(rows), dimension),
    )


def vector_from_send(raw: bytes) -> np.ndarray:
    """A vector from pgvector's binary form (vector_send: int16 dimension, int16 unused, big-endian float4s).
    One stored vector read as text cost ~0.3 ms in PostgreSQL's float output and ~0.6 ms in json.loads at
    1280-d (a "more like this" query's source vector): this way, microseconds."""
    dimension = int.from_bytes(raw[:2], "big")
    if len(raw) != 4 + 4 * dimension:
        raise ValueError(f"not a vector_send value ({len(raw)} bytes for {dimension} dimensions)")
    return np.frombuffer(raw, dtype=">f4", offset=4).astype(np.float32)


def copy_batches(
    chunks: Iterable[bytes | bytearray | memoryview], dimension: int, batch_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, float32 vectors) batches of a COPY (image_id int8, embedding vector) TO STDOUT (FORMAT BINARY) stream
    given in chunks cut anywhere: each batch holds the whole rows received so far once there are `batch_rows`."""
    row = _copy_row(dimension, "id")
    buf = bytearray()
    header = False

    def take(n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.frombuffer(bytes(buf[: n * row.itemsize]), dtype=row)
        del buf[: n * row.itemsize]
        if (rows["nf"] != 2).any() or (rows["dim"] != dimension).any():
            raise ValueError(f"vectors are not all {dimension}-dimensional")
        return rows["id"].astype(np.int64), rows["vec"].astype(np.float32)

    for chunk in chunks:
        buf += chunk
        if not header:
            if len(buf) < _HEADER:
                continue
            if not buf.startswith(_COPY_SIGNATURE):
                raise ValueError("not a binary COPY stream")
            del buf[:_HEADER]
            header = True
        if len(buf) >= batch_rows * row.itemsize + 2:  # never the trailer alone left behind
            yield take((len(buf) - 2) // row.itemsize)
    if not header:
        if buf:
            raise ValueError("not a binary COPY stream")
        return
    if buf[-2:] != b"\xff\xff" or (len(buf) - 2) % row.itemsize:
        raise ValueError(f"vectors are not all {dimension}-dimensional (or the stream was cut short)")
    del buf[-2:]
    if buf:
        yield take(len(buf) // row.itemsize)


class VectorRepository:
    """Bulk reads of stored embeddings, through binary COPY (fast, no per-row Python objects)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def fetch(
        self,
        model_id: int,
        dimension: int,
        *,
        category_ids: Sequence[int] | None = None,
        uncategorised: bool = False,
        image_ids: Sequence[int] | None = None,
        unpredicted: bool = False,
    ) -> VectorBatch:
        where = [f"model_id = {int(model_id)}"]
        if category_ids is not None:
            where.append(f"category_id IN ({','.join(str(int(c)) for c in category_ids) or 'NULL'})")
        if uncategorised:
            where.append(uncategorised_condition(self.session))
        if image_ids is not None:
            where.append(f"image_id IN ({','.join(str(int(i)) for i in image_ids) or 'NULL'})")
        if unpredicted:
            where.append("image_id IN (SELECT id FROM images WHERE predicted_category_id IS NULL)")
        # nullif: uncategorised vectors have category 0 on Citus (db/citus.py), NULL elsewhere.
        sql = (
            f"COPY (SELECT image_id, coalesce(nullif(category_id, 0), -1), embedding FROM embeddings "
            f"WHERE {' AND '.join(where)} ORDER BY image_id) TO STDOUT (FORMAT BINARY)"
        )
        raw = self.session.connection().connection.driver_connection
        assert raw is not None
        buf = bytearray()
        with raw.cursor() as cur, cur.copy(sql) as copy:
            for chunk in copy:
                buf += chunk
        if not buf:
            return VectorBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dimension), np.float32))
        return _parse_binary_copy(bytes(buf), dimension)

    def stream(self, model_id: int, dimension: int, batch_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image ids, float32 vectors) of every vector of the model, in batches of about `batch_rows`, through one
        binary COPY: memory stays a batch whatever the catalog's size (fetch() holds all of it: 5 GB at 1M x
        1280)."""
        sql = (
            f"COPY (SELECT image_id, embedding FROM embeddings WHERE model_id = {int(model_id)}) "
            "TO STDOUT (FORMAT BINARY)"
        )
        raw = self.session.connection().connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur, cur.copy(sql) as copy:
            yield from copy_batches(copy, dimension, batch_rows)

    def _vector_in(self, model_id: int, image_id: int, category_id: int | None) -> np.ndarray | None:
        """On Citus: the image's vector, read from its category's shard alone."""
        raw = self.session.execute(
            text(
                "SELECT vector_send(embedding) FROM embeddings WHERE model_id = :m AND image_id = :i"
                " AND category_id = :c"
            ),
            {"m": model_id, "i": image_id, "c": UNCATEGORISED if category_id is None else int(category_id)},
        ).scalar()
        return None if raw is None else vector_from_send(bytes(raw))

    def similar_source(
        self, model_name: str | None, image_id: int, *, prototype_version: bool = False
    ) -> tuple[EmbeddingModel | None, bool, np.ndarray | None, int | None, tuple[Any, ...] | None]:
        """What "more like this" needs, in one statement (the model row, the image's vector, its pHash, the model's
        prototype version for stage 1): (the named model, or the active one with no name; whether the image
        exists; its vector of that model; its stored pHash as a signed 64-bit integer; with `prototype_version`,
        PrototypeRepository.version of the model). On one node the function imsrc._search_source reads them (its
        plan is kept per connection: migration 0019). On Citus two statements: the same reads with the image's
        category instead of its vector, on the coordinator's own shards (read-only units of work:
        db.citus.local_relations), then the vector from the one shard that category names."""
        if not distributed(self.session):
            row = self._source(model_name, image_id, prototype_version)
            if row is None:
                return None, False, None, None, None
            value = row.vector
            return (
                _model_of(row),
                bool(row.image_exists),
                None if value is None else vector_from_send(bytes(value)),
                None if row.phash is None else int(row.phash),
                (row.version,) if prototype_version else None,
            )
        local = local_relations(self.session)
        models, images = _local_entity(EmbeddingModel, local), _local_entity(Image, local)
        # The category as a constant for the vector's statement (Citus prunes to one shard only on values it knows
        # when planning); the image's row is read once, in the same snapshot as the model.
        category = select(images.category_id).where(images.id == image_id).scalar_subquery()
        phash = select(cast(images.phash, BigInteger)).where(images.id == image_id).scalar_subquery()
        found = exists().where(images.id == image_id)
        version = _version_column(prototype_version, local)
        found_row = self.session.execute(
            select(models, found, category, phash, version).where(_chosen(models, model_name))
        ).first()
        if found_row is None:
            return None, False, None, None, None
        model, image_exists, category_id, stored, stamp = found_row
        return (
            model,
            bool(image_exists),
            self._vector_in(model.id, image_id, category_id) if image_exists else None,
            None if stored is None else int(stored),
            (stamp,) if prototype_version else None,
        )

    def model_and_version(
        self, model_name: str | None, *, prototype_version: bool
    ) -> tuple[EmbeddingModel | None, tuple[Any, ...] | None]:
        """The named model (or the active one with no name) and, with `prototype_version`, its
        PrototypeRepository.version, in one statement (a two-stage search by image or text read them in two). On
        Citus from the coordinator's own shards (read-only units of work: db.citus.local_relations)."""
        if not distributed(self.session):
            row = self._source(model_name, None, prototype_version)
            if row is None:
                return None, None
            return _model_of(row), (row.version,) if prototype_version else None
        local = local_relations(self.session)
        models = _local_entity(EmbeddingModel, local)
        found = self.session.execute(
            select(models, _version_column(prototype_version, local)).where(_chosen(models, model_name))
        ).first()
        if found is None:
            return None, None
        return found[0], (found[1],) if prototype_version else None

    def _source(self, model_name: str | None, image_id: int | None, prototype_version: bool) -> Any:
        return self.session.execute(
            _SEARCH_SOURCE, {"m": model_name or None, "i": image_id, "v": prototype_version}
        ).first()

    def has_unlabelled(self, model_id: int, *, unpredicted: bool) -> bool:
        """Whether there is an uncategorised image or a member of an automatic category (with unpredicted: one
        without a predicted label yet), with a vector of this model."""
        return bool(
            self.session.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM embeddings e JOIN images i ON i.id = e.image_id"
                    " LEFT JOIN categories c ON c.id = e.category_id WHERE e.model_id = :m"
                    " AND (NOT :u OR i.predicted_category_id IS NULL) AND (e.category_id IS NULL OR c.is_automatic))"
                ),
                {"m": model_id, "u": unpredicted},
            ).scalar()
        )

    def id_range(self, model_id: int) -> tuple[int | None, int | None]:
        """Smallest and largest image id with a vector of the model (two primary-key probes)."""
        row = self.session.execute(
            text(
                "SELECT (SELECT min(image_id) FROM embeddings WHERE model_id = :m),"
                " (SELECT max(image_id) FROM embeddings WHERE model_id = :m)"
            ),
            {"m": model_id},
        ).one()
        return (None if row[0] is None else int(row[0])), (None if row[1] is None else int(row[1]))

    def category_counts(self, model_id: int) -> dict[int | None, int]:
        rows = self.session.execute(
            text("SELECT nullif(category_id, 0), count(*) FROM embeddings WHERE model_id = :m GROUP BY 1"),
            {"m": model_id},
        )
        return {(None if r[0] is None else int(r[0])): int(r[1]) for r in rows}


# Bound as a text() statement built once: building the ORM select per search cost more than the read itself.
_SEARCH_SOURCE = text("SELECT * FROM imsrc._search_source(CAST(:m AS text), CAST(:i AS bigint), CAST(:v AS boolean))")
_MODEL_COLUMNS = ("id", "name", "dimension", "family", "params", "supports_text", "is_active", "created_at")


def _model_of(row: Any) -> EmbeddingModel:
    """The model of an imsrc._search_source row, as an object of no session (searches only read its columns)."""
    return EmbeddingModel(**{name: getattr(row, name) for name in _MODEL_COLUMNS})


def _chosen(models: Any, model_name: str | None) -> ColumnElement[bool]:
    """The model a search names, or the active one (ModelRepository.by_name / active)."""
    return typing.cast("ColumnElement[bool]", models.name == model_name if model_name else models.is_active)


def _local_entity(entity: Any, local: Mapping[str, str]) -> Any:
    """`entity` (an ORM class), read from its table's local shard where `local` (db.citus.local_relations) names
    one: the shard aliased as the table, so SQL that names the table's columns (the version column) still reads."""
    shard = local.get(entity.__table__.name)
    return entity if shard is None else _shard_entity(entity, shard)


@functools.cache
def _shard_entity(entity: Any, shard: str) -> Any:
    """Made once per shard: building an ORM alias costs more than the statement it serves."""
    table = entity.__table__
    columns = [column(c.name, c.type) for c in table.columns]
    return aliased(entity, table_clause(shard, *columns).alias(table.name), adapt_on_names=True)


def _version_column(wanted: bool, local: Mapping[str, str]) -> ColumnClause[Any]:
    """PrototypeRepository.version of the selected embedding_models row, folded into its statement (or NULL)."""
    return literal_column(
        prototype_version_sql("embedding_models.id", f"'{STATE_KEY_PREFIX}' || embedding_models.id", local)
        if wanted
        else "NULL"
    )


class SearchStateRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, key: str) -> dict[str, Any]:
        value = self.session.execute(text("SELECT value FROM search_state WHERE key = :k"), {"k": key}).scalar()
        return dict(value) if value else {}

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.session.execute(
            text(
                "INSERT INTO search_state (key, value) VALUES (:k, CAST(:v AS jsonb)) ON CONFLICT (key)"
                " DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
            ),
            {"k": key, "v": json.dumps(value)},
        )

    def put_if_absent(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """Store `value` unless the key is set; the value stored either way. A concurrent writer of the same key
        makes this wait for its commit, and then its value is the one returned (the second statement reads with a
        new snapshot), so two transactions never both believe their own value was kept."""
        stored = self.session.execute(
            text(
                "INSERT INTO search_state (key, value) VALUES (:k, CAST(:v AS jsonb)) ON CONFLICT (key) DO NOTHING"
                " RETURNING value"
            ),
            {"k": key, "v": json.dumps(value)},
        ).scalar()
        return dict(stored) if stored else self.get(key)


@dataclass(frozen=True)
class Watermark:
    """What an in-process index has seen: every transaction below xmax and not in xip (in progress at the
    time) was committed and visible then. Our own open transaction is tracked separately by seq, because a
    snapshot never lists its own transaction as in progress, yet it can keep writing."""

    xmax: int
    xip: tuple[int, ...] = ()
    own_xid: int | None = None
    own_seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"xmax": self.xmax, "xip": list(self.xip), "own_xid": self.own_xid, "own_seq": self.own_seq}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Watermark:
        return cls(
            int(value["xmax"]),
            tuple(int(x) for x in value.get("xip", ())),
            None if value.get("own_xid") is None else int(value["own_xid"]),
            int(value.get("own_seq", 0)),
        )


# Changes not visible when a Watermark was taken (plus a few re-reads); parameters from _since_params.
_SINCE = (
    "model_id = :m AND ((xid >= CAST(:xmax AS xid8) AND xid IS DISTINCT FROM CAST(:own AS xid8))"
    " OR xid = ANY(CAST(:xip AS xid8[])) OR (xid = CAST(:own AS xid8) AND seq > :own_seq))"
)


def _since_params(model_id: int, mark: Watermark) -> dict[str, Any]:
    return {
        "m": model_id,
        "xmax": str(mark.xmax),
        "xip": [str(x) for x in mark.xip],
        "own": None if mark.own_xid is None else str(mark.own_xid),
        "own_seq": mark.own_seq,
    }


class ChangeLogRepository:
    """embedding_changes, written by triggers: what in-process indexes must catch up on."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def snapshot(self) -> Watermark:
        row = self.session.execute(
            text(
                "SELECT pg_snapshot_xmax(s)::text, coalesce((SELECT array_agg(x::text) FROM pg_snapshot_xip(s) x),"
                " '{}'), pg_current_xact_id_if_assigned()::text FROM pg_current_snapshot() s"
            )
        ).one()
        own = None if row[2] is None else int(row[2])
        # The own transaction is tracked by seq (own_seq), not re-read wholesale as "in progress".
        return Watermark(int(row[0]), tuple(int(x) for x in row[1] if int(x) != own), own)

    def snapshot_and_since(self, model_id: int, mark: Watermark) -> tuple[Watermark, list[tuple[int, int, int]]]:
        """A new watermark (as snapshot()) and the (seq, xid, image_id) of the changes not visible when `mark`
        was taken (plus a few re-reads), in one statement: one round trip under a FAISS index's lock per search
        (it was two). The changes are read with the very snapshot returned."""
        row = self.session.execute(
            text(
                f"WITH c AS (SELECT seq, xid::text AS xid, image_id FROM embedding_changes WHERE {_SINCE})"
                " SELECT pg_snapshot_xmax(s)::text, coalesce((SELECT array_agg(x::text) FROM pg_snapshot_xip(s) x),"
                " '{}'), pg_current_xact_id_if_assigned()::text, (SELECT array_agg(seq ORDER BY seq) FROM c),"
                " (SELECT array_agg(xid ORDER BY seq) FROM c), (SELECT array_agg(image_id ORDER BY seq) FROM c)"
                " FROM pg_current_snapshot() s"
            ),
            _since_params(model_id, mark),
        ).one()
        own = None if row[2] is None else int(row[2])
        now = Watermark(int(row[0]), tuple(int(x) for x in row[1] if int(x) != own), own)
        changes = list(zip(row[3] or [], row[4] or [], row[5] or [], strict=True))
        return now, [(int(seq), int(xid), int(image_id)) for seq, xid, image_id in changes]

    def own_max_seq(self, model_id: int, own_xid: int | None) -> int:
        if own_xid is None:
            return 0
        return int(
            self.session.execute(
                text(
                    "SELECT coalesce(max(seq), 0) FROM embedding_changes WHERE model_id = :m AND xid = CAST(:x AS xid8)"
                ),
                {"m": model_id, "x": str(own_xid)},
            ).scalar_one()
        )

"""Embeddings are stored uncompressed in the row (migration 0004), so exact scans do not decompress them.

Real CNN features are full of exact zeros and pglz compressed them: an exact scan of 3,000 EfficientNet-Lite0
vectors then took ~40-60 ms instead of ~4 ms (issue 14). Timing is the benchmark's job; these tests assert
the storage that decides it."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from imsrc.catalog.repository import ModelRepository, global_index_name, vector_literal
from imsrc.db.vectors import QueryVector
from imsrc.search.pg_queries import NeighbourRepository, query_as
from imsrc.search.repository import VectorRepository, vector_from_send


def _sparse(n: int, dim: int, seed: int) -> np.ndarray:
    """ReLU-like features: about 70 % exact zeros, like pooled CNN activations."""
    x = np.maximum(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) - 0.5, 0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _insert(session: Session, dim: int, vectors: np.ndarray, *, graph: bool = True) -> tuple[int, list[int]]:
    model = ModelRepository(session).register(
        name=f"storage-test-{dim}", dimension=dim, family="test", params={}, supports_text=False
    )
    if not graph:  # without the model's graph over every image (on halfvec: no component beyond 65504)
        session.execute(text(f"DROP INDEX {global_index_name(model.id)}"))
    ids = []
    for i, v in enumerate(vectors):
        image_id = int(
            session.execute(
                text(
                    "INSERT INTO images (sha256, width, height, format, byte_size) VALUES (:s, 8, 8, 'PNG', 100) "
                    "RETURNING id"
                ),
                {"s": bytes([dim % 256, i]) * 16},
            ).scalar_one()
        )
        session.execute(
            text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, CAST(:v AS vector))"),
            {"m": model.id, "i": image_id, "v": vector_literal(v)},
        )
        ids.append(image_id)
    return model.id, ids


def test_sparse_1280d_embeddings_are_stored_plain_in_the_row(session: Session) -> None:
    vectors = _sparse(20, 1280, seed=1)
    model_id, ids = _insert(session, 1280, vectors)
    rows = session.execute(
        text("SELECT pg_column_compression(embedding), pg_column_size(embedding) FROM embeddings WHERE model_id = :m"),
        {"m": model_id},
    ).all()
    assert len(rows) == 20
    # Without toast_tuple_target these were pglz-compressed (~2.1 KB each instead of 5,128 bytes).
    assert {r[0] for r in rows} == {None}
    assert {int(r[1]) for r in rows} == {8 + 4 * 1280}
    # ... and the exact scan still returns them in true cosine order.
    query = vectors[3]
    hits = NeighbourRepository(session).exact(model_id, vector_literal(query), 5, None)
    expected = [ids[i] for i in np.argsort(-(vectors @ query), kind="stable")[:5]]
    assert [h[0] for h in hits] == expected


def test_the_table_keeps_whole_vectors_in_the_row_up_to_a_page(session: Session) -> None:
    options = session.execute(text("SELECT reloptions FROM pg_class WHERE oid = 'embeddings'::regclass")).scalar()
    assert "toast_tuple_target=8160" in (options or [])
    storage = session.execute(
        text("SELECT attstorage FROM pg_attribute WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding'")
    ).scalar()
    assert storage == "m"  # in the row; out of line only when a row cannot fit a page


def test_a_stored_vector_is_read_back_in_binary_bit_for_bit(session: Session) -> None:
    # "More like this" reads its source vector with vector_send: the very float32 values stored, any dimension.
    vectors = _sparse(3, 1280, seed=2)
    vectors[1, :4] = [1e-30, -3.4e38, 1.17549435e-38, 0.1]
    # -3.4e38 is beyond halfvec's range, which the model's graph indexes (migration 0018): such a row could not be
    # indexed. Every embedder stores unit-length vectors; this test is about the row and its binary read.
    _, ids = _insert(session, 1280, vectors, graph=False)
    for i, image_id in enumerate(ids):
        _, exists, got, _, _ = VectorRepository(session).similar_source("storage-test-1280", image_id)
        assert exists and got is not None
        assert got.dtype == np.float32 and got.shape == (1280,)
        assert np.array_equal(got, vectors[i])
    _, exists, missing, _, _ = VectorRepository(session).similar_source("storage-test-1280", max(ids) + 1000)
    assert (exists, missing) == (False, None)


def test_a_binary_vector_of_the_wrong_length_is_refused() -> None:
    raw = (3).to_bytes(2, "big") + b"\0\0" + np.array([1, 2], dtype=">f4").tobytes()
    with pytest.raises(ValueError, match="3 dimensions"):
        vector_from_send(raw)
    assert vector_from_send(raw + np.array([3], dtype=">f4").tobytes()).tolist() == [1.0, 2.0, 3.0]


def test_a_query_vector_binds_in_binary_as_the_same_vector_as_its_text(session: Session) -> None:
    """QueryVector (db.vectors) skips formatting and parsing the text form; PostgreSQL must read the very same
    vector and halfvec from it, through query_as's casts, at any scale, and refuse a wrong dimension."""
    rng = np.random.default_rng(11)
    for scale in (1e-8, 1e-3, 1.0, 1e4):
        v = (rng.standard_normal(1280) * scale).astype(np.float32)
        same = session.execute(
            text(
                f"SELECT {query_as('vector', 1280)}::text = CAST(CAST(:t AS text) AS vector(1280))::text,"
                f" {query_as('halfvec', 1280)}::text = CAST(CAST(:t AS text) AS halfvec(1280))::text,"
                f" {query_as('vector')} <=> CAST(CAST(:t AS text) AS vector)"
            ),
            {"q": QueryVector(v), "t": vector_literal(v)},
        ).one()
        assert same[0] and same[1] and abs(same[2]) < 1e-12, scale
    assert QueryVector(v).text == vector_literal(v)
    with pytest.raises(DBAPIError, match="expected 3 dimensions, not 1280"):
        session.execute(text(f"SELECT {query_as('vector', 3)}"), {"q": QueryVector(v)})

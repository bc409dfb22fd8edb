"""`imsrc embed` (a second model's vectors from stored bytes and referenced files) and `imsrc demo` data."""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from imsrc.db.session import Database
from imsrc.embeddings.registry import get_embedder
from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, FASHION_CLASSES, load_fashion_mnist
from imsrc.ingest.embed_missing import embed_missing
from imsrc.ingest.pipeline import JobSpec, run_index_job, run_job
from tests.helpers import run_cli
from tests.ingest_support import TEST_MODEL, make_image, open_test_database, write

# The same tiny architecture and seed under another name: a second model whose vectors must equal the first's.
TWIN = "open_clip:imsrc-tiny-test:none"


@pytest.fixture()
def db(create_database, scratch: Path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    database = open_test_database(create_database("imsrc_cmds"), scratch / "data")
    yield database
    database.dispose()


def _vectors(db: Database, model: str) -> dict[int, str]:
    with db.engine.connect() as conn:
        return dict(
            conn.execute(
                text(
                    "SELECT e.image_id, e.embedding::text"
                    " FROM embeddings e JOIN embedding_models m ON m.id = e.model_id"
                    " WHERE m.name = :n"
                ),
                {"n": model},
            ).all()
        )


def test_embed_fills_a_second_model_from_bytes_and_files(db: Database, scratch: Path) -> None:
    first = get_embedder(TEST_MODEL)
    for i in range(3):
        write(scratch / "ref" / f"r{i}.png", make_image(400 + i, (80, 60)))
        write(scratch / "copy" / f"c{i}.png", make_image(500 + i, (80, 60)))
    run_index_job(db, first, [str(scratch / "ref")], category="ref", workers=1)
    run_index_job(db, first, [str(scratch / "copy")], category="copy", store="copy", workers=1)
    (scratch / "copy" / "c0.png").unlink()  # stored bytes are used, the file is not needed
    (scratch / "ref" / "r2.png").write_bytes(make_image(999, (80, 60)))  # content changed since indexing

    summary = embed_missing(db, get_embedder(TWIN), workers=1, batch_size=4)
    assert (summary.embedded, summary.failed, summary.remaining) == (5, 1, 1)
    assert summary.failures[0]["reason"] == "the file changed since it was indexed (different content)"
    assert summary.failures[0]["image"].endswith("r2.png")
    a, b = _vectors(db, TEST_MODEL), _vectors(db, TWIN)
    assert len(a) == 6 and len(b) == 5 and all(b[k] == a[k] for k in b)  # same pixels, same vectors
    with db.engine.connect() as conn:
        active = conn.execute(text("SELECT name FROM embedding_models WHERE is_active")).scalar()
        protos = conn.execute(
            text(
                "SELECT c.name, p.member_count FROM category_prototypes p JOIN categories c ON c.id = p.category_id"
                " JOIN embedding_models m ON m.id = p.model_id WHERE m.name = :n AND p.kind = 'mean' ORDER BY 1"
            ),
            {"n": TWIN},
        ).all()
    assert active == TEST_MODEL  # adding a model does not switch the catalog to it
    assert [tuple(r) for r in protos] == [("copy", 3), ("ref", 2)]
    # Resumable: a second run only retries what is still missing.
    again = embed_missing(db, get_embedder(TWIN), workers=1, batch_size=4)
    assert (again.embedded, again.failed, again.remaining) == (0, 1, 1)


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_demo_loads_idx_files_with_class_names(db: Database, scratch: Path) -> None:
    folder = scratch / "fmnist"
    folder.mkdir()
    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(make_image(600 + i, (28, 28)))).convert("L")) for i in range(12)]
    )
    labels = np.array([i % 4 for i in range(12)], dtype=np.uint8)
    _idx(folder / "t10k-images-idx3-ubyte.gz", images)
    _idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    data = load_fashion_mnist(scratch / "cache", folder)
    assert data.images.shape == (12, 28, 28) and list(data.labels) == list(labels)
    spec = JobSpec(
        kind="demo",
        paths=["fashion-mnist"],
        options={"limit": 10},
        items=lambda: data.items(10),
        count=lambda: 10,
        store_bytes=True,
        workers=1,
        batch_size=4,
    )
    summary = run_job(db, get_embedder(TEST_MODEL), spec)
    assert summary.run_counts["new"] + summary.run_counts["duplicate"] == 10
    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.name, count(*) FROM images i JOIN categories c ON c.id = i.category_id"
                " JOIN image_blobs b ON b.image_id = i.id GROUP BY 1 ORDER BY 1"
            )
        ).all()
    assert [tuple(r) for r in rows] == sorted((FASHION_CLASSES[k], n) for k, n in [(0, 3), (1, 3), (2, 2), (3, 2)])


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_read() -> None:
    data = load_fashion_mnist(Path("/nonexistent"))
    assert data.images.shape == (10_000, 28, 28) and sorted(set(data.labels.tolist())) == list(range(10))


def test_demo_unknown_dataset_is_one_line_error() -> None:
    result = run_cli("demo", "--dataset", "imagenet")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown dataset 'imagenet'; choose one of: fashion-mnist, cifar10"

"""Models side by side in one catalog: add, use (only when complete), remove, choose."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.config import Settings
from imsrc.embeddings import UnknownModelError, load_embedder
from imsrc.errors import ConflictError, NotFoundError
from imsrc.services.models import ModelService


def _image(session: Session, n: int) -> int:
    return int(
        session.execute(
            text(
                "INSERT INTO images (sha256, width, height, format, byte_size) VALUES (:s, 8, 8, 'PNG', 1) RETURNING id"
            ),
            {"s": (5000 + n).to_bytes(32, "big")},
        ).scalar_one()
    )


def _embed(session: Session, model_id: int, image_id: int, vec: np.ndarray) -> None:
    session.execute(
        text("INSERT INTO embeddings (model_id, image_id, embedding) VALUES (:m, :i, :e)"),
        {"m": model_id, "i": image_id, "e": str(vec.tolist())},
    )


def test_first_model_becomes_active_and_second_waits(session: Session, settings: Settings) -> None:
    service = ModelService(session, settings)
    tiny = load_embedder("open_clip-tiny-test", settings)
    first = service.register(tiny)
    assert first.is_active and first.dimension == tiny.dimension == 64
    images = [_image(session, n) for n in range(3)]
    rng = np.random.default_rng(0)
    for image_id in images:
        _embed(session, first.id, image_id, rng.normal(size=64))
    before = session.execute(
        text("SELECT image_id, embedding::text FROM embeddings WHERE model_id = :m ORDER BY 1"), {"m": first.id}
    ).all()

    second = service.add("efficientnet-lite0")
    assert second.dimension == 1280 and not second.is_active
    assert service.choose().name == "open_clip-tiny-test"  # the catalog's active model wins over IMSRC_MODEL
    # Adding the second model left the first model's vectors exactly as they were.
    after = session.execute(
        text("SELECT image_id, embedding::text FROM embeddings WHERE model_id = :m ORDER BY 1"), {"m": first.id}
    ).all()
    assert after == before

    with pytest.raises(ConflictError, match="has not embedded 3 image"):
        service.use("efficientnet-lite0")
    for image_id in images[:2]:
        _embed(session, second.id, image_id, rng.normal(size=1280))
    with pytest.raises(ConflictError, match="has not embedded 1 image"):
        service.use("efficientnet-lite0")
    _embed(session, second.id, images[2], rng.normal(size=1280))
    assert service.use("efficientnet-lite0").is_active
    assert service.choose().name == "efficientnet-lite0"

    # Removing the old model drops only its vectors.
    service.remove("open_clip-tiny-test")
    counts = dict(session.execute(text("SELECT model_id, count(*) FROM embeddings GROUP BY 1")).all())  # type: ignore[arg-type]
    assert counts == {second.id: 3}
    assert session.execute(text("SELECT count(*) FROM images")).scalar_one() >= 3


def test_force_switch_and_errors(session: Session, settings: Settings) -> None:
    service = ModelService(session, settings)
    service.register(load_embedder("open_clip-tiny-test", settings))
    _image(session, 99)
    service.add("efficientnet-lite0")
    assert service.use("efficientnet-lite0", force=True).is_active
    with pytest.raises(ConflictError, match="active model"):
        service.remove("efficientnet-lite0")
    with pytest.raises(NotFoundError, match="imsrc models add"):
        service.use("resnet50")
    with pytest.raises(UnknownModelError, match="known models"):
        service.add("no-such-model")


def test_overview_lists_known_and_catalog_models(session: Session, settings: Settings) -> None:
    service = ModelService(session, settings)
    service.register(load_embedder("open_clip-tiny-test", settings))
    rows = {r["name"]: r for r in service.overview()}
    assert rows["efficientnet-lite0"]["weights_present"] is True and rows["efficientnet-lite0"]["text"] is False
    assert rows["clip-vit-b-32"]["text"] is True and rows["clip-vit-b-32"]["dimension"] == 512
    assert rows["open_clip-tiny-test"]["active"] is True and rows["open_clip-tiny-test"]["in_catalog"] is True

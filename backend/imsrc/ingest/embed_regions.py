"""`imsrc embed --regions` (and IMSRC_REGIONS=true while indexing or uploading): region vectors for images that
have the model's whole-image vector but no windows yet (search/regions.py says which windows and why).

Resumable by construction: each batch of images commits, and the next run asks again what is missing. The
model's region index is built once at the end of a pass (faster than keeping a graph up to date row by row);
later passes and uploads add to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imsrc import imaging
from imsrc.db.session import Database
from imsrc.embeddings.base import Embedder
from imsrc.ingest.service import ensure_model
from imsrc.search.regions import WINDOWS, RegionRepository, embed_windows

PAGE = 64


@dataclass
class RegionSummary:
    model: str
    images: int
    regions: int
    failed: int
    remaining: int
    windows_per_image: int
    status: str
    seconds: float
    index_built: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)


def embed_regions(
    database: Database,
    embedder: Embedder,
    *,
    batch_images: int = 8,
    stop: threading.Event | None = None,
    image_ids: Sequence[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RegionSummary:
    """Commits once per batch of images (call it from a command boundary). image_ids: only these (uploads)."""
    stop = stop or threading.Event()
    started = time.monotonic()
    settings = database.settings
    with database.session() as session:
        model = ensure_model(session, embedder, settings)
        model_id, dimension = model.id, model.dimension
        total = RegionRepository(session).missing_count(model_id) if image_ids is None else len(image_ids)
    done = failed = 0
    failures: list[dict[str, str]] = []
    after = 0
    while not stop.is_set():
        with database.session() as session:
            page = RegionRepository(session).missing_page(model_id, after, PAGE, image_ids)
        if not page:
            break
        after = page[-1][0]
        for start in range(0, len(page), batch_images):
            if stop.is_set():
                break
            rows: list[tuple[int, Sequence[tuple[float, float, float, float]], np.ndarray]] = []
            for image_id, data, path in page[start : start + batch_images]:
                try:
                    raw = data if data is not None else Path(path or "").read_bytes() if path else None
                    if raw is None:
                        raise ValueError("neither stored bytes nor a source file")
                    image = imaging.model_image(imaging.decode(raw, max_pixels=settings.max_pixels).image)
                    rows.append((image_id, WINDOWS, embed_windows(embedder, image)))
                except Exception as exc:  # one unreadable image must not stop the pass; reported per image
                    failed += 1
                    failures.append({"image": str(image_id), "reason": str(exc) or type(exc).__name__})
            with database.session() as session:
                RegionRepository(session).write(model_id, rows)
            done += len(rows)
            if on_progress:
                on_progress(done + failed, total)
    index_built = False
    with database.session() as session:
        repo = RegionRepository(session)
        if repo.has_any(model_id):
            index_built = repo.ensure_index(model_id, dimension)
        remaining = repo.missing_count(model_id) if image_ids is None else 0
    return RegionSummary(
        embedder.name,
        done,
        done * len(WINDOWS),
        failed,
        remaining,
        len(WINDOWS),
        "interrupted" if stop.is_set() else "completed",
        round(time.monotonic() - started, 3),
        index_built,
        failures,
    )

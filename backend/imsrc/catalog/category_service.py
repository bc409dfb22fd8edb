"""Categories: list with counts and sample thumbnails, create, rename/describe, detail with prototypes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from imsrc.catalog.image_repository import ImageRepository
from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.catalog.schemas import (
    CategoryCreate,
    CategoryDetail,
    CategorySummary,
    CategoryUpdate,
    PrototypeInfo,
    image_thumbnail_url,
)
from imsrc.config import Settings

SAMPLES_PER_CATEGORY = 4


class CategoryService:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.categories = CategoryRepository(session)
        self.images = ImageRepository(session)

    def _summaries(self, rows: list[dict[str, Any]]) -> list[CategorySummary]:
        samples = self.images.sample_thumbnails([int(r["id"]) for r in rows], SAMPLES_PER_CATEGORY)
        return [
            CategorySummary(
                id=r["id"],
                name=r["name"],
                description=r["description"],
                is_automatic=r["is_automatic"],
                image_count=r["image_count"],
                unique_image_count=r["unique_image_count"],
                prototype_count=r["prototype_count"],
                sample_thumbnail_urls=[image_thumbnail_url(i) for i in samples.get(int(r["id"]), [])],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def list(self) -> list[CategorySummary]:
        return self._summaries(self.categories.list_with_counts())

    def summary(self, category_id: int) -> CategorySummary:
        return self._summaries([self.categories.with_counts(category_id)])[0]

    def create(self, body: CategoryCreate, *, settings: Settings | None = None,
               embedder_for: Callable[[str], Any] | None = None) -> CategorySummary:
        """A new named category. With the settings, a CLIP model gives it a text prototype at once, so
        uncategorised images can be predicted into it before it holds any image."""
        category = self.categories.create(body.name, description=body.description)
        if settings is not None:
            self._sync(settings, embedder_for)
        return self.summary(category.id)

    def update(self, category_id: int, body: CategoryUpdate, *, settings: Settings | None = None,
               embedder_for: Callable[[str], Any] | None = None) -> CategorySummary:
        """Rename and/or describe. After a rename, search catches up in the same unit of work when given the
        settings: a CLIP model re-reads the new name (text prototype), and a category that just became a real
        one takes part in predictions. embedder_for(model name) supplies the (already loaded) embedder."""
        category = self.categories.get(category_id)
        old_name = category.name
        self.categories.update(category, name=body.name, description=body.description,
                               set_description="description" in body.model_fields_set)
        if settings is not None and category.name != old_name:
            self._sync(settings, embedder_for)
        return self.summary(category.id)

    def _sync(self, settings: Settings, embedder_for: Callable[[str], Any] | None) -> None:
        from imsrc.search.sync import sync_search  # search builds on the catalog, not the reverse

        active = ModelRepository(self.session).active()
        embedder = embedder_for(active.name) if active is not None and active.supports_text and embedder_for \
            else None
        sync_search(self.session, settings, embedder=embedder, autogroup_images=False)

    def detail(self, category_id: int) -> CategoryDetail:
        summary = self.summary(category_id)
        prototypes = [PrototypeInfo(**p) for p in self.categories.prototype_summary(category_id)]
        return CategoryDetail(**summary.model_dump(), prototypes=prototypes)

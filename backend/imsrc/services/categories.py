"""Categories: list with counts and sample thumbnails, create, rename/describe, detail with prototypes.

A write here keeps search in step in the same unit of work (search.sync.sync_search), which is why this
service lives above both the catalog and search. The API and the CLI both go through it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from imsrc.catalog.image_repository import ImageRepository
from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository
from imsrc.catalog.schemas import (
    CategoryCreate,
    CategoryDetail,
    CategorySummary,
    CategoryUpdate,
    PrototypeInfo,
    image_thumbnail_url,
)
from imsrc.config import Settings
from imsrc.errors import NotFoundError
from imsrc.search.sync import EmbedderFor, sync_search

SAMPLES_PER_CATEGORY = 4


class CategoryService:
    """settings: without them (read-only callers) writes do not re-sync search. embedders: the search
    runtime's embedder factory, for the text prototypes of CLIP-family models."""

    def __init__(
        self, session: Session, settings: Settings | None = None, embedders: EmbedderFor | None = None
    ) -> None:
        self.session = session
        self.settings = settings
        self.embedders = embedders
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

    def create(self, body: CategoryCreate) -> CategorySummary:
        """A new named category. A CLIP model gives it a text prototype at once, so uncategorised images
        can be predicted into it before it holds any image."""
        category = self.categories.create(body.name, description=body.description)
        self._sync()
        return self.summary(category.id)

    def update(self, category_id: int, body: CategoryUpdate) -> CategorySummary:
        """Rename and/or describe (a taken name is a ConflictError). After a rename search catches up in the
        same unit of work: a CLIP model re-reads the new name (text prototype), and a category that just
        became a real one takes part in predictions."""
        category = self.categories.get(category_id)
        old_name = category.name
        self.categories.update(
            category,
            name=body.name,
            description=body.description,
            set_description="description" in body.model_fields_set,
        )
        if category.name != old_name:
            self._sync()
        return self.summary(category.id)

    def resolve(self, name_or_id: str) -> int:
        """A category by name (any case) or, failing that, by id: how the CLI names categories."""
        found = self.categories.resolve(name_or_id)
        if found is None:
            raise NotFoundError(f"no category named {name_or_id!r}")
        return found

    def _sync(self) -> None:
        if self.settings is not None:
            sync_search(self.session, self.settings, embedders=self.embedders, autogroup_images=False)

    def detail(self, category_id: int) -> CategoryDetail:
        summary = self.summary(category_id)
        prototypes = [PrototypeInfo(**p) for p in PrototypeRepository(self.session).summary(category_id)]
        return CategoryDetail(**summary.model_dump(), prototypes=prototypes)

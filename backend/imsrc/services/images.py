"""Image writes that keep search in step: deleting an image (uploads go through ingest.uploads)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from imsrc.catalog.image_repository import ImageRepository
from imsrc.catalog.schemas import DeletedImage
from imsrc.config import Settings
from imsrc.search.sync import sync_search


def delete_image(session: Session, settings: Settings, image_id: int) -> DeletedImage:
    """Delete an image with its bytes, thumbnail and vectors (its oldest near-duplicate becomes canonical),
    then bring search up to date in the same unit of work: the category's prototypes, per-category indexes
    and predictions (in-process FAISS indexes follow through the change log). Never commits."""
    outcome = ImageRepository(session).delete(image_id)
    sync_search(session, settings, category_ids=[outcome.category_id] if outcome.category_id else [])
    return DeletedImage(id=outcome.image_id, new_canonical_id=outcome.new_canonical_id, repointed=outcome.repointed)

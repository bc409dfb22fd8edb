"""Which model a command embeds with: the catalog's policy lives in imsrc.catalog.model_service
(an explicit name, else the catalog's active model, else IMSRC_MODEL); these are thin wrappers."""

from __future__ import annotations

from sqlalchemy.orm import Session

from imsrc.catalog import model_service
from imsrc.config import Settings
from imsrc.embeddings.base import Embedder


def choose_model_name(session: Session, settings: Settings, requested: str | None = None) -> tuple[str, str | None]:
    """(name, warning or None)."""
    choice = model_service.ModelService(session, settings).choose(requested)
    return choice.name, choice.warning


def load_embedder(settings: Settings, name: str) -> Embedder:
    return model_service.load_embedder(name, settings)

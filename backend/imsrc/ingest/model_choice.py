"""Which model a command embeds with, and loading it with the settings' device/precision/checkpoint."""

from __future__ import annotations

from sqlalchemy.orm import Session

from imsrc.catalog.repository import ModelRepository
from imsrc.config import Settings
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.errors import ModelError
from imsrc.embeddings.registry import AUTO, get_embedder, resolve_model_name
from imsrc.errors import ImsrcError


def _as_domain_error(exc: ModelError) -> ImsrcError:
    err = ImsrcError(str(exc))
    err.status_code, err.code = exc.status_code, exc.code
    return err


def _paths(settings: Settings) -> tuple[str | None, str | None]:
    checkpoint = str(settings.model_checkpoint) if settings.model_checkpoint else None
    cache = str(settings.model_cache_dir) if settings.model_cache_dir else None
    return checkpoint, cache


def choose_model_name(session: Session, settings: Settings, requested: str | None = None) -> tuple[str, str | None]:
    """(name, warning or None). An explicit name wins, then IMSRC_MODEL unless it is 'auto', then the
    catalog's active model (so a catalog keeps one space unless asked), then 'auto' resolution."""
    checkpoint, cache = _paths(settings)
    wanted = requested or (settings.model if settings.model != AUTO else None)
    try:
        if wanted:
            return resolve_model_name(wanted, checkpoint, cache)
        active = ModelRepository(session).active()
        if active is not None:
            return active.name, None
        return resolve_model_name(AUTO, checkpoint, cache)
    except ModelError as exc:
        raise _as_domain_error(exc) from exc


def load_embedder(settings: Settings, name: str) -> Embedder:
    checkpoint, cache = _paths(settings)
    try:
        return get_embedder(name, device=None if settings.device == "auto" else settings.device,
                            checkpoint=checkpoint, precision=settings.precision, cache_dir=cache)
    except ModelError as exc:
        raise _as_domain_error(exc) from exc

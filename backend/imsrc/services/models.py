"""Which embedding model a catalog uses, and managing models side by side.

The active model is recorded in the catalog (embedding_models.is_active). IMSRC_MODEL only decides which model
a catalog starts with; after that the catalog's own record wins, so a CLI and a web server with different
environments still search the same space. Switching happens only through `use`.

`ModelService.choose` is the one place that decides which model a command or request uses, and
`choose_and_load` the one place that also loads it (through embeddings.load_embedder) and says the warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.orm import Session

from imsrc.catalog.missing import missing_embedding_count
from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import ModelRepository
from imsrc.config import Settings
from imsrc.embeddings import Embedder, load_embedder, model_info, resolve_model_name
from imsrc.embeddings.registry import inference_label, registered_names
from imsrc.errors import ConflictError, NotFoundError
from imsrc.search.pg_queries import NeighbourRepository
from imsrc.search.regions import RegionRepository


@dataclass
class ModelChoice:
    name: str
    warning: str | None  # e.g. IMSRC_MODEL=auto fell back to an image-only model; say it once to the user
    registered: EmbeddingModel | None
    # "request": named by the caller; "catalog": the catalog's active model; "settings": IMSRC_MODEL, used
    # until the first image is indexed.
    source: Literal["request", "catalog", "settings"]

    @property
    def supports_text(self) -> bool:
        if self.registered is not None:
            return self.registered.supports_text
        return model_info(self.name).supports_text


@dataclass
class LoadedModel:
    choice: ModelChoice
    embedder: Embedder

    @property
    def name(self) -> str:
        return self.choice.name


def choose_and_load(session: Session, settings: Settings, requested: str | None = None) -> LoadedModel:
    """The model to embed with (explicit, else the catalog's active one, else IMSRC_MODEL), loaded.

    Its warning travels with it (`choice.warning`): the CLI prints it, a server logs it."""
    choice = ModelService(session, settings).choose(requested)
    return LoadedModel(choice, load_embedder(choice.name, settings))


class ModelService:
    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self.models = ModelRepository(session)

    def choose(self, requested: str | None = None) -> ModelChoice:
        """An explicit name, else the catalog's active model, else IMSRC_MODEL (resolving 'auto')."""
        if requested and requested != "auto":
            name, warning = resolve_model_name(requested, self.settings.model_checkpoint, self.settings.model_cache_dir)
            return ModelChoice(name, warning, self.models.by_name(name), "request")
        active = self.models.active()
        if active is not None:
            return ModelChoice(active.name, None, active, "catalog")
        name, warning = resolve_model_name(
            requested or self.settings.model, self.settings.model_checkpoint, self.settings.model_cache_dir
        )
        return ModelChoice(name, warning, self.models.by_name(name), "settings")

    def register(self, embedder: Embedder, *, activate_if_none: bool = True) -> EmbeddingModel:
        """Record a model (and its HNSW index); the first model a catalog uses becomes its active model."""
        model = self.models.register(
            name=embedder.name,
            dimension=embedder.dimension,
            family=embedder.family,
            params=dict(embedder.params),
            supports_text=embedder.supports_text,
        )
        if activate_if_none and self.models.active() is None:
            self.models.set_active(model)
        return model

    def add(self, name: str) -> EmbeddingModel:
        """Register a model without activating it; `imsrc embed --model NAME` then fills in its vectors."""
        info = model_info(name, self.settings.model_checkpoint, self.settings.model_cache_dir)
        if info.dimension > 0 and info.weights_present:
            existing = self.models.by_name(name)
            if existing is not None:
                return existing
            return self.models.register(
                name=info.name,
                dimension=info.dimension,
                family=info.family,
                params={"description": info.description},
                supports_text=info.supports_text,
            )
        # Unknown dimension (generic hub ids) or weights still to download: load it once to learn the rest.
        return self.register(load_embedder(name, self.settings), activate_if_none=False)

    def use(self, name: str, *, force: bool = False) -> EmbeddingModel:
        model = self.get(name)
        missing = self.missing_count(model)
        if missing and not force:
            raise ConflictError(
                f"model {name!r} has not embedded {missing} image(s) yet; run `imsrc embed --model {name}` first, "
                "or pass --force to switch now (those images will not be found until embedded)"
            )
        self.models.set_active(model)
        return model

    def remove(self, name: str) -> None:
        """Drop a model's vectors, prototypes and every index built for it (catalog-wide and per category)."""
        model = self.get(name)
        if model.is_active and len(self.models.list()) > 1:
            raise ConflictError(f"model {name!r} is the active model; `imsrc models use` another one first")
        NeighbourRepository(self.session).drop_model_indexes(model.id)
        RegionRepository(self.session).drop_index(model.id)  # partial on model_id: would stay behind, empty
        self.models.remove(model)

    def get(self, name: str) -> EmbeddingModel:
        model = self.models.by_name(name)
        if model is None:
            known = [m.name for m in self.models.list()]
            raise NotFoundError(
                f"model {name!r} is not in this catalog (registered: {', '.join(known) or 'none'}); "
                f"add it with `imsrc models add {name}`"
            )
        return model

    def missing_count(self, model: EmbeddingModel) -> int:
        return missing_embedding_count(self.session, model.id)

    def overview(self) -> list[dict[str, object]]:
        """Known models merged with what this catalog holds, for `imsrc models list`."""
        in_catalog = {m.name: m for m in self.models.list()}
        rows: list[dict[str, object]] = []
        for name in [*registered_names(), *[n for n in in_catalog if n not in registered_names()]]:
            try:
                info = model_info(name, self.settings.model_checkpoint, self.settings.model_cache_dir)
                dimension, text_ok, present = info.dimension, info.supports_text, info.weights_present
            except Exception:  # a catalog model this version no longer knows: still list it
                old = in_catalog[name]
                dimension, text_ok, present = old.dimension, old.supports_text, False
            m = in_catalog.get(name)
            rows.append(
                {
                    "name": name,
                    "dimension": m.dimension if m else dimension,
                    "text": text_ok,
                    "weights_present": present,
                    "in_catalog": m is not None,
                    "active": bool(m and m.is_active),
                    "embedded": self.models.embedded_count(m.id) if m else 0,
                    "inference": inference_label(name, text_ok, self.settings.inference, self.settings.model_cache_dir),
                }
            )
        return rows

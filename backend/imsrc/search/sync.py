"""sync_search(): the one entry point that brings search up to date after any write.

Uploads, folder jobs, `imsrc embed`, deletes and category changes all end with it, and it owns the whole
sequence: the automatic grouping, mean prototypes (every model) and k-means centres of the touched categories,
zero-shot text prototypes of new or renamed categories, per-category pgvector indexes, and predicted labels
of uncategorised images. Callers do none of these steps themselves. It never commits; the caller's unit of
work does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.locks import WriteLocks
from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.prototypes import PrototypeRepository
from imsrc.catalog.repository import CategoryRepository, ModelRepository, rebuild_legacy_global_index
from imsrc.config import Settings
from imsrc.db.citus import distributed
from imsrc.search.autogroup import autogroup, plan
from imsrc.search.calibration import calibrate, needs_calibration
from imsrc.search.pg_queries import HALFVEC_MAX_DIM, NeighbourRepository
from imsrc.search.prototypes import predict, refresh_prototypes, stale_categories, text_prototype_rows
from imsrc.search.repository import SearchStateRepository, VectorRepository
from imsrc.search.walks import ann_due, ann_key, calibrate_ann, calibrate_walks
from imsrc.search.walks import due as walks_due
from imsrc.timings import stage

if TYPE_CHECKING:
    from imsrc.db.session import Database
    from imsrc.embeddings.base import Embedder

# Softmax scales turning cosine scores into a confidence: CLIP's own for text prototypes; image prototypes
# are closer together, and 50 spreads a 0.05 cosine lead into a clear (~92 %) preference.
TEXT_LOGIT_SCALE = 100.0
IMAGE_LOGIT_SCALE = 50.0

# Model name -> its loaded embedder, or None when it is not at hand. Asked only for a CLIP-family model,
# whose text tower turns category names into prototypes; a search runtime's factory loads on demand.
EmbedderFor = Callable[[str], Any]


def only(embedder: Embedder) -> EmbedderFor:
    """A lookup that knows just the model a write already loaded (ingest): sync never loads another."""
    return lambda name: embedder if name == embedder.name else None


@dataclass
class SyncReport:
    model: str | None = None
    prototypes_refreshed: list[int] = field(default_factory=list)
    automatic_touched: list[int] = field(default_factory=list)
    text_prototypes: list[int] = field(default_factory=list)
    indexes_created: list[int] = field(default_factory=list)
    indexes_dropped: list[int] = field(default_factory=list)
    predicted: int = 0
    stage1_temperature: float | None = None  # set when this sync (re)calibrated stage 1
    walks_calibrated: list[int] = field(default_factory=list)  # categories whose walk width was (re)fitted
    ann_calibrated: bool = False  # the model's own graph's walk width was (re)fitted
    # defer_derived: the calibration or the predicted labels of earlier images are out of date (refresh_derived)
    derived_due: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sync_search(
    session: Session,
    settings: Settings,
    *,
    model_id: int | None = None,
    category_ids: Iterable[int] = (),
    embedders: EmbedderFor | None = None,
    autogroup_images: bool = True,
    force_regroup: bool = False,
    defer_derived: bool = False,
) -> SyncReport:
    """Bring prototypes, automatic categories, indexes and predictions up to date after a change.

    model_id: the model whose search structures to refresh (default: the active one). category_ids:
    categories known to have changed (images added, removed or moved); others whose member count no longer
    matches their mean prototype are found too, so a caller may also pass nothing. embedders: where to get
    the model's embedder for text prototypes (see EmbedderFor; without it they are left as they are).
    defer_derived: leave the stage-1 calibration and the re-labelling of earlier images (both derived from the
    prototypes, both advisory) to a later refresh_derived, and say in derived_due whether one is needed; this
    unit of work still labels its own new images. An upload under load uses it (search/refresher.py): every
    upload into a named category changes that category's prototype, which re-labelled every uncategorised image
    and held the per-model predictions lock to the commit, so concurrent uploads took turns there; and several
    at once re-fitted the same calibration and queued on its row.
    """
    models = ModelRepository(session)
    model = models.active() if model_id is None else session.get(EmbeddingModel, model_id)
    report = SyncReport()
    if model is None:
        return report
    report.model = model.name
    cats = CategoryRepository(session)
    locks = WriteLocks(session)
    # The locks, always in this order (catalog.locks): automatic groups, categories, text prompts, indexes,
    # predictions. Automatic groups first and for every writer, shared unless a regroup is due: a regroup
    # rewrites every group's members, so it waits for the writers in flight and they wait for it.
    with stage("plan"):
        regroup = autogroup_images and plan(session, settings, model_id=model.id, force=force_regroup) == "regroup"
    locks.automatic_groups(model.id, regroup=regroup)
    if autogroup_images:
        with stage("autogroup"):
            report.automatic_touched = sorted(
                autogroup(
                    session,
                    settings,
                    model_id=model.id,
                    dimension=model.dimension,
                    force=force_regroup,
                    may_regroup=regroup,
                )
            )
    with stage("stale"):
        existing = set(cats.names())
        # Stale categories are found by comparing member counts with the stored means, so nothing may have
        # recomputed the means before this point.
        touched = (
            set(category_ids) | stale_categories(session, model.id, existing) | set(report.automatic_touched)
        ) & existing
    # Before the members are read: a writer adding to the same category recomputes after this one commits, with
    # both writers' images, instead of both computing from what each alone could see (a lost update).
    locks.categories(touched)
    with stage("prototypes"):
        report.prototypes_refreshed = refresh_prototypes(
            session, settings, model_id=model.id, dimension=model.dimension, category_ids=touched
        )
    embedder = embedders(model.name) if embedders is not None and model.supports_text else None
    if embedder is not None:
        report.text_prototypes = _refresh_text_prototypes(session, model.id, embedder)
    with stage("calibrate"):
        if defer_derived:
            report.derived_due = needs_calibration(session, settings, model)
        elif needs_calibration(session, settings, model):
            fitted = calibrate(session, settings, model)
            report.stage1_temperature = None if fitted is None else fitted.temperature
    with stage("category_indexes"):
        report.indexes_created, report.indexes_dropped = ensure_category_indexes(session, settings, model)
    with stage("walks"):
        # Derived like the stage-1 calibration: an upload under load leaves it to the background refresher.
        if defer_derived:
            report.derived_due = (
                report.derived_due or bool(walks_due(session, settings, model)) or ann_due(session, settings, model)
            )
        else:
            report.walks_calibrated = sorted(calibrate_walks(session, settings, model))
            report.ann_calibrated = calibrate_ann(session, settings, model) is not None
    real = set(cats.real_ids())
    labels_changed = bool((set(report.prototypes_refreshed) | set(report.text_prototypes)) & real)
    report.derived_due = report.derived_due or (defer_derived and labels_changed)
    with stage("predict"):
        report.predicted = predict_uncategorised(session, model, only_new=defer_derived or not labels_changed)
    return report


def refresh_derived(session: Session, settings: Settings, *, model_id: int) -> SyncReport:
    """What sync_search(defer_derived=True) left: the stage-1 calibration and the walk widths if they are due,
    and predicted labels of every unlabelled image from the current prototypes. Its own unit of work; the
    caller commits."""
    model = session.get(EmbeddingModel, model_id)
    report = SyncReport()
    if model is None:
        return report
    report.model = model.name
    if needs_calibration(session, settings, model):
        fitted = calibrate(session, settings, model)
        report.stage1_temperature = None if fitted is None else fitted.temperature
    report.walks_calibrated = sorted(calibrate_walks(session, settings, model))
    report.ann_calibrated = calibrate_ann(session, settings, model) is not None
    report.predicted = predict_uncategorised(session, model, only_new=False)
    return report


def _refresh_text_prototypes(session: Session, model_id: int, embedder: Any) -> list[int]:
    cats = CategoryRepository(session)
    state = SearchStateRepository(session)
    key = f"text_prompts:m{int(model_id)}"
    seen = state.get(key)
    names = {c: n for c, n in cats.names().items() if c in set(cats.real_ids())}
    todo = {c: n for c, n in names.items() if seen.get(str(c)) != n}
    if not todo:
        return []
    WriteLocks(session).text_prompts(model_id)  # read again under the lock: another writer may have done them
    seen = state.get(key)
    todo = {c: n for c, n in names.items() if seen.get(str(c)) != n}
    if not todo:
        return []
    protos = PrototypeRepository(session)
    for row in text_prototype_rows(todo, embedder.encode_texts):
        protos.replace(model_id, row.category_id, ("text",), [row])
    state.put(key, {str(c): n for c, n in names.items()})
    return sorted(todo)


# How long a rebuilt model's old graph is kept after the swap: longer than a server caches which graph a model has
# (search.service.INDEX_CACHE_SECONDS, 10 s).
LEGACY_GRAPH_SETTLE_S = 15.0


def rebuild_legacy_graphs(database: Database, *, settle_s: float = LEGACY_GRAPH_SETTLE_S) -> list[str]:
    """Rebuild every model's legacy full-precision graph over every image on halfvec (catalog.repository.
    rebuild_legacy_global_index: concurrently, on a connection of its own), and mark its calibrated width missing
    (an empty entry, to walks._stale and imsrc._ann_ef) so the sync that follows fits it again on the new graph;
    the names of the models rebuilt. `imsrc categories sync` runs it first; nothing else does (at 1M rows it takes
    ~20 minutes). Not on Citus (see rebuild_legacy_global_index)."""
    with database.session() as session:
        if distributed(session):
            return []
        models = ModelRepository(session)
        legacy = [(m.id, m.name, m.dimension) for m in models.list() if models.global_index_half(m.id) is False]
    rebuilt = []
    for model_id, name, dimension in legacy:
        if rebuild_legacy_global_index(
            database.engine,
            model_id,
            dimension,
            settle_s=settle_s,
        ):
            with database.session() as session:
                SearchStateRepository(session).put(ann_key(model_id), {})
            rebuilt.append(name)
    return rebuilt


def ensure_category_indexes(session: Session, settings: Settings, model: EmbeddingModel) -> tuple[list[int], list[int]]:
    """Per-category HNSW for categories of at least search_exact_max_rows vectors; dropped below half that
    (hysteresis, so a category hovering at the threshold is not rebuilt on every change)."""
    neighbours = NeighbourRepository(session)
    for name in neighbours.legacy_category_indexes(model.id):  # superseded by the halfvec ones built below
        neighbours.drop_index(name)
    counts = {c: n for c, n in VectorRepository(session).category_counts(model.id).items() if c is not None}
    if model.dimension > HALFVEC_MAX_DIM:
        counts = {}  # too wide for any pgvector index: every category is scanned exactly
    threshold = settings.search_exact_max_rows

    def plan() -> tuple[list[int], list[int]]:
        have = neighbours.category_indexes(model.id)
        return (
            sorted(c for c, n in counts.items() if n >= threshold and c not in have),
            sorted(c for c in have if counts.get(c, 0) < threshold // 2 or c not in counts),
        )

    create, drop = plan()
    if create or drop:  # another writer may be building the same index: decide again once it is done
        WriteLocks(session).indexes(model.id)
        create, drop = plan()
    for c in drop:
        neighbours.drop_category_index(model.id, c)
    created = [c for c in create if neighbours.create_category_index(model.id, model.dimension, c)]
    return created, drop


def predict_uncategorised(session: Session, model: EmbeddingModel, *, only_new: bool) -> int:
    """Predicted category + confidence for images without a user label (none, or an automatic one)."""
    cats = CategoryRepository(session)
    real = set(cats.real_ids())
    if not real:
        return 0
    vectors = VectorRepository(session)
    if not vectors.has_unlabelled(model.id, unpredicted=only_new):
        return 0  # nothing to label: no lock, so uploads into named categories only end without queueing
    # Before the prototypes are read: labels predicted by two writers at once could otherwise come from the
    # older of their two sets of prototypes (the lock is held to the commit, the last step of a unit of work).
    WriteLocks(session).predictions(model.id)
    protos = PrototypeRepository(session).load(model.id, ("mean", "cluster", "text"))
    image_protos = [p for p in protos if p.category_id in real and p.kind != "text"]
    text_protos = [p for p in protos if p.category_id in real and p.kind == "text"]
    chosen, scale = (image_protos, IMAGE_LOGIT_SCALE) if image_protos else (text_protos, TEXT_LOGIT_SCALE)
    if not chosen:
        return 0
    auto = cats.automatic_ids()
    parts = [vectors.fetch(model.id, model.dimension, uncategorised=True, unpredicted=only_new)]
    if auto:
        parts.append(vectors.fetch(model.id, model.dimension, category_ids=auto, unpredicted=only_new))
    ids = np.concatenate([p.image_ids for p in parts])
    if len(ids) == 0:
        return 0
    x = np.concatenate([p.vectors for p in parts])
    best, confidence = predict(x, chosen, logit_scale=scale)
    cats.set_predictions(ids, best, confidence)
    return len(ids)

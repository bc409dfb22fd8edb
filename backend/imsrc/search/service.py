"""SearchService: query -> vector -> stage 1 (categories) -> stage 2 (neighbours) -> results. Never commits.

Heavy objects (embedders, the prototype matrices, FAISS indexes) come from a SearchRuntime made once per
process; a service is cheap and lives for one request or command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from imsrc import imaging
from imsrc.catalog.image_repository import ImageRepository
from imsrc.catalog.models import EmbeddingModel
from imsrc.catalog.repository import CategoryRepository, ModelRepository, vector_literal
from imsrc.catalog.schemas import image_thumbnail_url
from imsrc.config import Settings
from imsrc.db.vectors import QueryVector
from imsrc.errors import InvalidInputError, NotFoundError
from imsrc.imaging import DecodeGate
from imsrc.search import rerank
from imsrc.search.duplicates import PHASH_MASK, DuplicateSearchRepository
from imsrc.search.errors import ModelUnavailableError, NoModelError, NotAnImageError
from imsrc.search.faiss_store import FaissStore
from imsrc.search.keywords import KeywordRepository
from imsrc.search.pg_queries import (
    EF_SEARCH_MAX,
    Hit,
    HitInfo,
    NeighbourRepository,
    WalkWidth,
    branch_plan,
)
from imsrc.search.regions import WINDOWS, RegionRepository, best_per_image
from imsrc.search.repository import SearchStateRepository, VectorRepository
from imsrc.search.rerank import ThumbnailRepository
from imsrc.search.schemas import (
    CategoriesResponse,
    CategoryHit,
    MatchType,
    SearchHit,
    SearchOptions,
    SearchResponse,
    Timings,
)
from imsrc.search.stage1 import STAGE1_TEMPERATURE, CategoryScore, PrototypeCache, PrototypeMatrix, pick
from imsrc.search.urlfetch import UrlFetcher
from imsrc.search.walks import ann_key, width, widths
from imsrc.search.walks import state_key as walks_key

EmbedderFactory = Callable[[str], object]
MAX_FETCH = 10_000  # most candidates one stage-2 round asks for while skipping duplicates
INDEX_CACHE_SECONDS = 10.0
T = TypeVar("T")


@contextmanager
def model_errors() -> Iterator[None]:
    """The model layer's errors carry status and code but are not ImsrcErrors: re-raise them as ones."""
    from imsrc.embeddings.errors import ModelError

    try:
        yield
    except ModelError as exc:
        raise ModelUnavailableError(str(exc), status_code=exc.status_code, code=exc.code) from exc


@dataclass
class SearchRuntime:
    """Per-process search state, created once (app lifespan / CLI context) and injected."""

    settings: Settings
    embedder_factory: EmbedderFactory
    prototypes: PrototypeCache
    faiss: FaissStore
    url_fetcher: UrlFetcher
    decode_gate: DecodeGate
    # Per (what, model id): (when read, value); see _cached.
    _cache: dict[tuple[str, int], tuple[float, Any]] = field(default_factory=dict)

    @classmethod
    def create(
        cls, settings: Settings, embedder_factory: EmbedderFactory | None = None, decode_gate: DecodeGate | None = None
    ) -> SearchRuntime:
        return cls(
            settings=settings,
            embedder_factory=embedder_factory or default_embedder_factory(settings),
            prototypes=PrototypeCache(),
            faiss=FaissStore(
                settings.resolved_data_dir,
                flat_max_rows=settings.faiss_flat_max_rows,
                resave_changes=settings.faiss_resave_changes,
            ),
            url_fetcher=UrlFetcher.from_settings(settings),
            decode_gate=decode_gate or DecodeGate.from_settings(settings),
        )

    def service(self, session: Session) -> SearchService:
        return SearchService(session, self)

    def _cached(self, what: str, model_id: int, read: Callable[[], T]) -> T:
        """`read()`, kept for INDEX_CACHE_SECONDS per model: catalog facts every search needs, which change only
        when search sync runs (a stale one costs speed for a few seconds, never a wrong answer)."""
        now = time.monotonic()
        hit = self._cache.get((what, model_id))
        if hit is None or now - hit[0] > INDEX_CACHE_SECONDS:
            hit = (now, read())
            self._cache[(what, model_id)] = hit
        return cast(T, hit[1])

    def small_catalog(self, session: Session, model_id: int) -> bool:
        """Whether the model has fewer vectors than IMSRC_SEARCH_TWO_STAGE_MIN_ROWS (the count stops at the
        threshold, so it costs the same on any catalog)."""
        threshold = self.settings.search_two_stage_min_rows
        if threshold <= 0:
            return False
        rows = self._cached("rows", model_id, lambda: NeighbourRepository(session).count_up_to(model_id, threshold))
        return rows < threshold

    def category_indexes(self, session: Session, model_id: int) -> dict[int, int]:
        """Which categories have a per-category HNSW index (and its rows). Without its index a branch is still
        an exact scan."""
        return self._cached("indexes", model_id, lambda: NeighbourRepository(session).category_indexes(model_id))

    def global_half(self, session: Session, model_id: int) -> bool:
        """Whether the model's graph over every image is on halfvec (a legacy one on vector until search sync
        rebuilds it): the walk must be written in the graph's own expression."""
        return self._cached(
            "global_half", model_id, lambda: ModelRepository(session).global_index_half(model_id) is not False
        )

    def walk_widths(self, session: Session, model_id: int) -> dict[int, WalkWidth]:
        """The categories' calibrated walk widths (search/walks.py); a stale width is still one that was
        measured."""
        return self._cached("walks", model_id, lambda: widths(SearchStateRepository(session).get(walks_key(model_id))))

    def ann_ef(self, session: Session, model_id: int) -> int:
        """hnsw.ef_search for the model's own graph: its calibrated width (search/walks.py; search sync fits it
        again once the model's rows have doubled or halved), IMSRC_SEARCH_EF_SEARCH until it is calibrated or
        while calibration is off (IMSRC_SEARCH_WALK_RECALL=0: the setting rules at once, before a sync drops the
        stored width). imsrc._ann_ef (migration 0016) reads the same."""
        if self.settings.search_walk_recall <= 0:
            return self.settings.search_ef_search

        def read() -> int:
            fit = width(SearchStateRepository(session).get(ann_key(model_id)))
            return self.settings.search_ef_search if fit is None else fit.ef

        return self._cached("ann_ef", model_id, read)


def default_embedder_factory(settings: Settings) -> EmbedderFactory:
    def factory(name: str) -> object:
        from imsrc.embeddings.loading import load_embedder  # torch loads with the first model, not at import

        with model_errors():
            return load_embedder(name, settings)

    return factory


def query_pixel_limit(settings: Settings) -> tuple[int, str]:
    """The most pixels a query image may have, and the setting that says so."""
    if settings.query_max_pixels <= settings.max_pixels:
        return settings.query_max_pixels, "IMSRC_QUERY_MAX_PIXELS"
    return settings.max_pixels, "IMSRC_MAX_PIXELS"


def decode_query(data: bytes, settings: Settings) -> Image.Image:
    """A query image as the model sees it: the catalog's own decoder (format allow-list, pixel limit, bounded
    memory), then RGB with transparency on white, exactly as indexed images are prepared."""
    if not data:
        raise NotAnImageError("the upload is empty")
    limit, setting = query_pixel_limit(settings)
    return imaging.model_image(imaging.decode(data, max_pixels=limit, setting=setting).image)


class SearchService:
    def __init__(self, session: Session, runtime: SearchRuntime) -> None:
        self.session = session
        self.runtime = runtime
        self.settings = runtime.settings
        self.keywords = KeywordRepository(session)  # parses each request's keywords once
        # Prototype versions this unit of work has read already (folded into its first statement), per model.
        self._versions: dict[int, tuple[Any, ...]] = {}

    # ------------------------------------------------------------------ queries
    def model(self, name: str | None) -> EmbeddingModel:
        models = ModelRepository(self.session)
        return self._model_or_error(models.by_name(name) if name else models.active(), name)

    def _search_model(self, options: SearchOptions) -> EmbeddingModel:
        """model(), with the prototype version a stage 1 will need read in the same statement."""
        found, version = VectorRepository(self.session).model_and_version(
            options.model, prototype_version=_uses_stage1(options)
        )
        model = self._model_or_error(found, options.model)
        if version is not None:
            self._versions[model.id] = version
        return model

    @staticmethod
    def _model_or_error(model: EmbeddingModel | None, name: str | None) -> EmbeddingModel:
        if model is None:
            if name:
                raise NotFoundError(f"model {name!r} has not indexed any images in this catalog")
            raise NoModelError("no embedding model is active yet: index some images first (imsrc index PATH)")
        return model

    def embed_image(self, model: EmbeddingModel, data: bytes) -> np.ndarray:
        return self.embed_and_hash(model, data)[0]

    def embed_and_hash(self, model: EmbeddingModel, data: bytes) -> tuple[np.ndarray, int, Image.Image]:
        """The query's vector and its 64-bit pHash, both from the one decoded image (the pixels ingest
        hashes and embeds for catalog images, so a copy of one hashes like it)."""
        # Decoded first, so a bad image is refused before a model is loaded; inside a gate slot, so a burst
        # of big queries decodes a few at a time (the working image that comes out is small).
        with self.runtime.decode_gate.slot():
            image = decode_query(data, self.settings)
        phash = imaging.phash64(image)
        with model_errors():
            embedder = self.runtime.embedder_factory(model.name)
            pixels = np.asarray(embedder.preprocess(image), dtype=np.float32)  # type: ignore[attr-defined]
            vector = np.asarray(embedder.encode_images(pixels[None])[0], dtype=np.float32)  # type: ignore[attr-defined]
        return vector, phash, image

    def embed_text(self, model: EmbeddingModel, query: str) -> np.ndarray:
        if not query.strip():
            raise InvalidInputError("the text query is empty")
        from imsrc.embeddings import encode_text_query

        with model_errors():
            embedder = self.runtime.embedder_factory(model.name)
            return np.asarray(encode_text_query(embedder, query.strip()), dtype=np.float32)  # type: ignore[arg-type]

    def search_image(self, data: bytes, options: SearchOptions) -> SearchResponse:
        return self._embed_and_search(options, lambda model: self.embed_and_hash(model, data))

    def search_url(self, url: str, options: SearchOptions) -> SearchResponse:
        # Fetch before the first query: a session holds its pooled connection from then on, and a slow remote
        # server must not hold database connections too.
        return self.search_image(self.runtime.url_fetcher.fetch(url), options)

    def search_text(self, query: str, options: SearchOptions) -> SearchResponse:
        return self._embed_and_search(options, lambda model: (self.embed_text(model, query), None, None))

    def search_keywords(self, keywords: str, options: SearchOptions) -> SearchResponse:
        """Keywords alone: images whose caption matches, ranked by ts_rank_cd (no model, no vectors)."""
        started = time.perf_counter()
        models = ModelRepository(self.session)
        model = models.by_name(options.model) if options.model else models.active()
        if options.model and model is None:
            raise NotFoundError(f"model {options.model!r} has not indexed any images in this catalog")
        chosen = self._explicit_categories(options.category) if options.category else None
        t2 = time.perf_counter()
        ranked = self.keywords.ranked(keywords, options.k or self.settings.search_k, chosen, options.include_duplicates)
        info = NeighbourRepository(self.session).hydrate([i for i, _ in ranked])
        hits = [_hit(i, s, info[i], keyword_match=True) for i, s in ranked if i in info]
        return SearchResponse(
            results=_at_least(hits, options.min_score),
            stage1=[],
            model=model.name if model else None,
            mode="keywords",
            backend=None,
            keywords=keywords.strip(),
            timings_ms=Timings(embed=0.0, stage1=0.0, stage2=_ms(t2), total=_ms(started)),
        )

    def _embed_and_search(
        self,
        options: SearchOptions,
        embed: Callable[[EmbeddingModel], tuple[np.ndarray, int | None, Image.Image | None]],
    ) -> SearchResponse:
        model = self._search_model(options)
        started = time.perf_counter()  # the embed time includes decoding and hashing the query
        vector, phash, image = embed(model)
        return self.search_vector(
            model, vector, options, embed_ms=_ms(started), started=started, phash=phash, query_image=image
        )

    def similar(self, image_id: int, options: SearchOptions) -> SearchResponse:
        """More like this: the stored vector of an indexed image, the image itself left out."""
        started = time.perf_counter()
        # The model row, the vector and the pHash in one round trip (two on Citus: the vector from its shard).
        found, image_exists, vector, stored, version = VectorRepository(self.session).similar_source(
            options.model, image_id, prototype_version=_uses_stage1(options)
        )
        model = self._model_or_error(found, options.model)
        if version is not None:
            self._versions[model.id] = version
        phash = None if stored is None else stored & PHASH_MASK
        if vector is None:
            if not image_exists:
                raise NotFoundError(f"image {image_id} does not exist")
            raise NotFoundError(f"image {image_id} has no embedding for model {model.name} yet")
        image = None
        if options.rerank:  # the comparator sees the image as it sees every candidate: its thumbnail
            image = ThumbnailRepository(self.session).images([image_id]).get(image_id)
            if image is None:
                raise InvalidInputError(f"image {image_id} has no thumbnail to compare with: search without rerank")
        return self.search_vector(
            model,
            vector,
            options,
            embed_ms=_ms(started),
            started=started,
            exclude=image_id,
            phash=phash,
            query_image=image,
        )

    def categories_for_url(
        self, url: str, *, model_name: str | None = None, limit: int | None = None, samples: int = 0
    ) -> CategoriesResponse:
        return self.categories_for_image(
            self.runtime.url_fetcher.fetch(url), model_name=model_name, limit=limit, samples=samples
        )

    def categories_for_image(
        self, data: bytes, *, model_name: str | None = None, limit: int | None = None, samples: int = 0
    ) -> CategoriesResponse:
        """Stage 1 alone: which categories is this image like, with scores."""
        model = self.model(model_name)
        started = time.perf_counter()
        vector = self.embed_image(model, data)
        embed_ms = _ms(started)
        t1 = time.perf_counter()
        ranked = self._prototypes(model.id).score(vector)
        ranked = ranked[:limit] if limit else ranked
        stage1 = _ms(t1)
        hits = [_category_hit(c) for c in ranked]
        if samples:  # a few of each category's images, to show what it holds
            found = ImageRepository(self.session).sample_thumbnails([c.category_id for c in hits], samples)
            hits = [
                c.model_copy(
                    update={"sample_thumbnail_urls": [image_thumbnail_url(i) for i in found.get(c.category_id, [])]}
                )
                for c in hits
            ]
        return CategoriesResponse(
            categories=hits,
            model=model.name,
            timings_ms=Timings(embed=embed_ms, stage1=stage1, stage2=0.0, total=_ms(started)),
        )

    # ------------------------------------------------------------------ the two stages
    def search_vector(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        options: SearchOptions,
        *,
        embed_ms: float = 0.0,
        started: float | None = None,
        exclude: int | None = None,
        phash: int | None = None,
        query_image: Image.Image | None = None,
    ) -> SearchResponse:
        """`phash`: the query image's perceptual hash; its near-duplicates in the catalog come first.
        `query_image`: what a rerank comparator compares candidates with (image queries and similar)."""
        started = started or time.perf_counter()
        if options.rerank and query_image is None:
            raise InvalidInputError("rerank compares images: use it with an image query or similar, not text")
        wanted = options.k or self.settings.search_k
        # With a comparator, stage 2 fetches its rerank_top candidates; the k best by the comparator stay.
        k = max(wanted, options.rerank_top) if options.rerank else wanted
        mode = options.mode
        backend = None if mode == "exact" else (options.backend or self.settings.search_backend)
        if options.match == "partial":
            if options.keywords:
                raise InvalidInputError(
                    "keywords do not combine with match=partial yet: search captions with "
                    "whole-image search (match=whole)"
                )
            return self._search_partial(
                model,
                vector,
                options,
                wanted,
                k,
                embed_ms=embed_ms,
                started=started,
                exclude=exclude,
                phash=phash,
                query_image=query_image,
            )
        if (
            mode == "two_stage"
            and backend == "pgvector"
            and not options.category
            and options.categories is None
            and self.runtime.small_catalog(self.session, model.id)
        ):
            # Stage 1 cannot pay here: one walk of the model's graph is faster than stage 1 plus a walk per
            # picked category, and misses nothing at a category's edge. Said so in the response's mode.
            mode = "ann"
            options = options.model_copy(update={"mode": "ann"})
        t1 = time.perf_counter()
        chosen, stage1, near, ranked = self._stage1(model, vector, options, walks=backend == "pgvector")
        if mode == "two_stage" and chosen is None:
            mode = "ann"  # no prototypes yet (nothing synced): search everything rather than nothing
        stage1_ms = _ms(t1)
        t2 = time.perf_counter()
        plan = Stage2Plan(chosen, near, k, mode, backend)
        filtered = bool(options.keywords) and options.keyword_mode == "filter"
        if filtered:
            # Keywords filter, vectors rank: the matching images (inside an explicit category filter only) by
            # exact cosine. A caption match is a strong filter; a graph walk with it as a post-filter misses rows.
            mode, backend, stage1 = "exact", None, []
            hits = self._keyword_hits(model, vector, options, plan.categories if options.category else None, k, exclude)
        else:
            hits = self._stage2(model, vector, plan, options.include_duplicates, exclude)
            if mode == "two_stage" and not options.category:
                hits, stage1 = self._fill(
                    model, vector, plan, hits, ranked, stage1, options.include_duplicates, exclude
                )
            if options.keywords:
                hits = self._boosted(
                    model, vector, options, plan.categories if options.category else None, hits, k, exclude
                )
        if phash is not None and not filtered:
            explicit = plan.categories if options.category else None
            hits = self._duplicates_first(model, vector, phash, hits, k, explicit, options.include_duplicates, exclude)
        return self._respond(
            model,
            hits,
            wanted,
            stage1,
            mode,
            backend,
            options,
            embed_ms,
            stage1_ms,
            t2,
            started,
            query_image=query_image,
        )

    def _respond(
        self,
        model: EmbeddingModel,
        hits: list[SearchHit],
        wanted: int,
        stage1: list[CategoryScore],
        mode: str,
        backend: str | None,
        options: SearchOptions,
        embed_ms: float,
        stage1_ms: float,
        t2: float,
        started: float,
        *,
        query_image: Image.Image | None,
    ) -> SearchResponse:
        t3 = time.perf_counter()
        if options.rerank and query_image is not None:
            hits = (
                _reranked(hits[: options.rerank_top], options.rerank, query_image, ThumbnailRepository(self.session))
                + hits[options.rerank_top :]
            )
        rerank_ms = _ms(t3) if options.rerank else 0.0
        hits = _at_least(hits[:wanted], options.min_score)
        return SearchResponse(
            results=hits,
            stage1=[_category_hit(c) for c in stage1],
            model=model.name,
            mode=mode,  # type: ignore[arg-type]
            backend=backend,  # type: ignore[arg-type]
            rerank=options.rerank,
            match=options.match,
            keywords=options.keywords.strip() if options.keywords else None,
            keyword_mode=options.keyword_mode if options.keywords else None,
            timings_ms=Timings(
                embed=embed_ms,
                stage1=stage1_ms,
                stage2=round(_ms(t2) - rerank_ms, 3),
                rerank=rerank_ms,
                total=_ms(started),
            ),
        )

    def _search_partial(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        options: SearchOptions,
        wanted: int,
        k: int,
        *,
        embed_ms: float,
        started: float,
        exclude: int | None,
        phash: int | None,
        query_image: Image.Image | None,
    ) -> SearchResponse:
        """match=partial: the query against every window of every image and against whole images; an image
        scores its best. No stage 1 (a crop is often routed to the wrong category, and the windows have one
        graph per model), so a two_stage request is answered as `ann` and says so."""
        regions = RegionRepository(self.session)
        regions.require(model.id, model.name)
        t1 = time.perf_counter()
        categories, _, near, _ = (
            self._stage1(model, vector, options, walks=False) if options.category else (None, [], set(), [])
        )
        exact = options.mode == "exact" or categories is not None
        mode = "exact" if options.mode == "exact" else "ann"
        backend = None if mode == "exact" else (options.backend or self.settings.search_backend)
        stage1_ms = _ms(t1)
        t2 = time.perf_counter()
        # An image has len(WINDOWS) windows, and its neighbours' windows crowd the top: fetch enough windows
        # that k distinct images are among them.
        limit = min(EF_SEARCH_MAX, k * len(WINDOWS) // 2 + 40)
        query = vector_literal(vector)
        windows = (
            regions.exact(model.id, query, limit, categories)
            if exact
            else regions.ann(model.id, model.dimension, query, limit, self.settings.search_ef_search)
        )
        whole = self._stage2(
            model,
            vector,
            Stage2Plan(categories, near or set(categories or []), k, "exact" if exact else "ann", backend),
            options.include_duplicates,
            exclude,
        )
        best = best_per_image(windows)
        info = NeighbourRepository(self.session).hydrate([i for i in best if i not in {h.id for h in whole}])
        merged: dict[int, SearchHit] = {h.id: h.model_copy(update={"box": [0.0, 0.0, 1.0, 1.0]}) for h in whole}
        for image_id, hit in best.items():
            known = merged.get(image_id)
            if known is not None:
                if hit.score > known.score:
                    merged[image_id] = known.model_copy(
                        update={
                            "score": round(hit.score, 6),
                            "box": [round(v, 4) for v in hit.box],
                            "match_type": "partial",
                        }
                    )
                continue
            i = info.get(image_id)
            if i is None or image_id == exclude or (not options.include_duplicates and i.canonical_id is not None):
                continue
            merged[image_id] = _hit(image_id, hit.score, i, match_type="partial").model_copy(
                update={"box": [round(v, 4) for v in hit.box]}
            )
        hits = sorted(merged.values(), key=lambda h: (-h.score, h.id))[:k]
        if phash is not None:
            hits = self._duplicates_first(
                model, vector, phash, hits, k, categories, options.include_duplicates, exclude
            )
        return self._respond(
            model, hits, wanted, [], mode, backend, options, embed_ms, stage1_ms, t2, started, query_image=query_image
        )

    def _keyword_hits(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        options: SearchOptions,
        categories: list[int] | None,
        k: int,
        exclude: int | None,
    ) -> list[SearchHit]:
        assert options.keywords
        found = self.keywords.matching(
            model.id, vector_literal(vector), options.keywords, k, categories, options.include_duplicates, exclude
        )
        info = NeighbourRepository(self.session).hydrate([i for i, _ in found])
        return [_hit(i, s, info[i], keyword_match=True) for i, s in found if i in info]

    def _boosted(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        options: SearchOptions,
        categories: list[int] | None,
        hits: list[SearchHit],
        k: int,
        exclude: int | None,
    ) -> list[SearchHit]:
        """Vectors rank, keywords boost: the vector search's hits and the k best caption matches, ordered by
        cosine + boost where the caption matches (imsrc._boosted, which imsrc.search_text uses too)."""
        assert options.keywords
        matches = self._keyword_hits(model, vector, options, categories, k, exclude)
        by_id = {h.id: h for h in matches} | {h.id: h for h in hits}
        order = self.keywords.boosted([(h.id, h.score) for h in matches + hits], options.keywords, options.boost, k)
        return [by_id[i].model_copy(update={"keyword_match": hit}) for i, _, hit in order if i in by_id]

    def _fill(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        plan: Stage2Plan,
        hits: list[SearchHit],
        ranked: list[CategoryScore],
        stage1: list[CategoryScore],
        include_duplicates: bool,
        exclude: int | None,
    ) -> tuple[list[SearchHit], list[CategoryScore]]:
        """k results are promised: when the picked categories hold fewer than k (small ones, or ones made only
        of near-duplicates, which are hidden), take the next categories in stage-1 order, doubling the set each
        round, and at the end every image (uncategorised ones too). Reported in stage1 as searched."""
        searched = list(stage1)
        rest = [c for c in ranked if c.category_id not in set(plan.categories or [])]
        while len(hits) < plan.k and plan.categories is not None:
            if rest:
                more, rest = rest[: max(1, len(searched))], rest[max(1, len(searched)) :]
                searched += more
                ids = [c.category_id for c in searched]
                # The next categories are what stage 1 would have picked with a wider fan-out: near ones.
                plan = replace(plan, categories=ids, near=plan.near | {c.category_id for c in more})
            else:
                plan = replace(plan, categories=None)  # every category is in: the rest are uncategorised
            hits = self._stage2(model, vector, plan, include_duplicates, exclude)
        return hits, searched

    def _duplicates_first(
        self,
        model: EmbeddingModel,
        vector: np.ndarray,
        phash: int,
        hits: list[SearchHit],
        k: int,
        categories: list[int] | None,
        include_duplicates: bool,
        exclude: int | None,
    ) -> list[SearchHit]:
        """Near-duplicates of the query (pHash within IMSRC_DUPLICATE_THRESHOLD) first, closest first, then
        the neighbours stage 2 found. Looked up on their own, so no stage-1 choice can hide them; only an
        explicit category filter (the user's own) limits them."""
        near = DuplicateSearchRepository(self.session).near(
            phash,
            self.settings.duplicate_threshold,
            model_id=model.id,
            query=QueryVector(vector),
            limit=k,
            categories=categories,
            exclude=exclude,
            include_duplicates=include_duplicates,
        )
        if not near:
            return hits
        info = NeighbourRepository(self.session).hydrate([n.image_id for n in near])
        first = [
            _hit(n.image_id, n.score, info[n.image_id], match_type="duplicate", distance=n.distance)
            for n in near
            if n.image_id in info
        ]
        taken = {h.id for h in first}
        return (first + [h for h in hits if h.id not in taken])[:k]

    def _stage1(
        self, model: EmbeddingModel, vector: np.ndarray, options: SearchOptions, *, walks: bool
    ) -> tuple[list[int] | None, list[CategoryScore], set[int], list[CategoryScore]]:
        """(categories to search or None for all, stage-1 picks to report, categories the query is near,
        every category ranked for a two-stage search). `walks`: stage 2 walks pgvector graphs, the only place
        where nearness matters for a filter."""
        if options.category:
            chosen = self._explicit_categories(options.category)
            # Which named categories would stage 1 itself have picked? Only in those can a graph walk be
            # trusted at its normal width (see category_ef_search). Without prototypes, nothing is known.
            matrix = self._prototypes(model.id) if walks else None
            ranked = matrix.score(vector) if matrix is not None else []
            near = {c.category_id for c in self._pick(ranked, None, matrix)} if ranked else set(chosen)
            return chosen, [], near, []
        if options.mode != "two_stage":
            return None, [], set(), []
        matrix = self._prototypes(model.id)
        ranked = matrix.score(vector)
        if not ranked:
            return None, [], set(), []
        if options.categories is None and self.settings.search_stage1_fallback:
            # The rule without the cap; within the cap it is what the capped rule picks.
            picked = self._pick(ranked, "auto", matrix)
            if len(picked) > max(self.settings.search_categories, self.settings.search_fallback_categories):
                # Stage 1 is not sure enough to narrow this query to search_categories categories. Rather than
                # cut the rule at the cap: search them all (the caller answers it as `ann`, and says so), or the
                # categories the rule wants while they are at most IMSRC_SEARCH_FALLBACK_CATEGORIES (0 default).
                return None, [], set(), []
        else:
            picked = self._pick(ranked, options.categories, matrix)
        return [c.category_id for c in picked], picked, {c.category_id for c in picked}, ranked

    def _prototypes(self, model_id: int) -> PrototypeMatrix:
        return self.runtime.prototypes.get(self.session, model_id, self._versions.get(model_id))

    def _explicit_categories(self, names: list[str]) -> list[int]:
        cats = CategoryRepository(self.session)
        ids = []
        for name in names:
            found = cats.resolve(name)
            if found is None:
                raise NotFoundError(f"no category named {name!r}")
            ids.append(found)
        return sorted(set(ids))

    def _temperature(self, matrix: PrototypeMatrix | None) -> float:
        return matrix.temperature(self.settings.search_stage1_temperature) if matrix is not None else STAGE1_TEMPERATURE

    def _pick(
        self, ranked: list[CategoryScore], requested: int | str | None, matrix: PrototypeMatrix | None
    ) -> list[CategoryScore]:
        temperature = self._temperature(matrix)
        return pick(
            ranked,
            requested,
            mass=self.settings.search_score_mass,
            cap=self.settings.search_categories,
            temperature=temperature,
        )

    def _stage2(
        self, model: EmbeddingModel, vector: np.ndarray, plan: Stage2Plan, include_duplicates: bool, exclude: int | None
    ) -> list[SearchHit]:
        neighbours = NeighbourRepository(self.session)
        k = plan.k
        limit = k + (0 if include_duplicates else max(5, k // 2)) + (1 if exclude is not None else 0)
        while True:
            raw, found = self._neighbours(model, vector, plan, limit)
            info = found if found is not None else neighbours.hydrate([h[0] for h in raw])
            kept = [
                (i, s)
                for i, s in raw
                if i in info and i != exclude and (include_duplicates or info[i].canonical_id is None)
            ]
            if len(kept) >= k or len(raw) < limit or limit >= MAX_FETCH:
                break
            limit = min(limit * 2, MAX_FETCH)
        return [_hit(i, s, info[i]) for i, s in kept[:k]]

    def _neighbours(
        self, model: EmbeddingModel, vector: np.ndarray, plan: Stage2Plan, limit: int
    ) -> tuple[list[Hit], dict[int, HitInfo] | None]:
        """The stage-2 hits, and their rows where the same statement read them (None: hydrate them)."""
        neighbours = NeighbourRepository(self.session)
        chosen = plan.categories
        ef = self.settings.search_ef_search
        if plan.mode == "exact":
            return neighbours.exact_hydrated(model.id, QueryVector(vector), limit, chosen)
        if plan.backend == "faiss":
            return self.runtime.faiss.get(self.session, model).search(vector, chosen, limit), None
        query = QueryVector(vector)
        if chosen is None:
            ef = self.runtime.ann_ef(self.session, model.id)
            half = self.runtime.global_half(self.session, model.id)
            return neighbours.global_ann_hydrated(model.id, model.dimension, query, limit, ef, half=half)
        indexed = self.runtime.category_indexes(self.session, model.id)
        branches, ef = branch_plan(indexed, chosen, plan.near, ef, self.runtime.walk_widths(self.session, model.id))
        hits, info = neighbours.per_category_hydrated(model.id, model.dimension, query, branches, limit, ef)
        if (
            len(hits) < limit
            and any(c in indexed for c in chosen)
            and neighbours.count_in(model.id, chosen) > len(hits)
        ):
            # An HNSW graph can strand a few rows (e.g. after many deletes); k rows are promised, so
            # answer this query exactly rather than short.
            exactly = [(c, False) for c in chosen]
            hits, info = neighbours.per_category_hydrated(model.id, model.dimension, query, exactly, limit, ef)
        return hits, info


@dataclass(frozen=True)
class Stage2Plan:
    categories: list[int] | None  # None: every image
    near: set[int]  # categories stage 1 picked or would pick for this query
    k: int
    mode: str
    backend: str | None


def _reranked(
    hits: list[SearchHit], comparator: str, query: Image.Image, thumbs: ThumbnailRepository
) -> list[SearchHit]:
    """Near-duplicates first as before (closest first), then the others by the comparator's score; each
    keeps its cosine score and gains the comparator's. A candidate without a thumbnail scores last. The sort is
    stable: equal scores (orb/sift candidates without a geometric match all score 0) keep the embedding order."""
    found = rerank.scores(comparator, query, thumbs.images([h.id for h in hits]))
    scored = [h.model_copy(update={"rerank_score": found.get(h.id)}) for h in hits]
    dups = [h for h in scored if h.match_type == "duplicate"]
    rest = sorted(
        (h for h in scored if h.match_type != "duplicate"),
        key=lambda h: float("inf") if h.rerank_score is None else -h.rerank_score,
    )
    return dups + rest


def _uses_stage1(options: SearchOptions) -> bool:
    """Whether a search will read the prototypes (_stage1): worth reading their version with the model row.
    Partial matches without a category filter, and small catalogs answered as ann, do not; reading it costs a
    scan of the model's prototype rows (tens to hundreds), not a round trip."""
    return options.mode == "two_stage" or bool(options.category)


def _at_least(hits: list[SearchHit], min_score: float | None) -> list[SearchHit]:
    return hits if min_score is None else [h for h in hits if h.score >= min_score]


def _hit(
    image_id: int,
    score: float,
    info: HitInfo,
    *,
    match_type: MatchType = "similar",
    distance: int | None = None,
    keyword_match: bool | None = None,
) -> SearchHit:
    return SearchHit(
        id=image_id,
        score=round(score, 6),
        category=info.category,
        category_id=info.category_id,
        thumbnail_url=f"/api/images/{image_id}/thumbnail",
        file_url=f"/api/images/{image_id}/file",
        original_name=info.original_name,
        width=info.width,
        height=info.height,
        byte_size=info.byte_size,
        duplicates=info.duplicates,
        match_type=match_type,
        phash_distance=distance,
        caption=info.caption,
        keyword_match=keyword_match,
    )


def _category_hit(c: CategoryScore) -> CategoryHit:
    return CategoryHit(category=c.name, category_id=c.category_id, score=round(c.score, 6))


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)

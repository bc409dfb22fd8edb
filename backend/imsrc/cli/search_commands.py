"""`imsrc search image|text|categories`, `imsrc similar`, `imsrc categories list|rename|sync`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from imsrc.cli.output import err_console, print_json, print_table
from imsrc.errors import InvalidInputError, NotFoundError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
KOpt = Annotated[int | None, typer.Option("-k", "--k", min=1, max=1000, help="Results (default IMSRC_SEARCH_K).")]
CategoriesOpt = Annotated[
    str | None,
    typer.Option(
        "--categories",
        help="Stage-1 fan-out: exactly N categories, or 'auto' (score mass alone). Default: the score-mass "
        "rule, at most IMSRC_SEARCH_CATEGORIES.",
    ),
]
CategoryOpt = Annotated[
    list[str] | None, typer.Option("--category", help="Only these categories (repeatable; name or id); skips stage 1.")
]
ExactOpt = Annotated[bool, typer.Option("--exact", help="Exact scan (same as --mode exact).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="two_stage, ann or exact.")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="pgvector or faiss (default IMSRC_SEARCH_BACKEND).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Embedding model (default: the active one).")]
DupOpt = Annotated[bool, typer.Option("--include-duplicates", help="Also show non-canonical copies.")]
RerankOpt = Annotated[
    str | None,
    typer.Option("--rerank", help="Re-score the first --rerank-top candidates by orb, sift, ssim, histogram or pixel."),
]
RerankTopOpt = Annotated[int, typer.Option("--rerank-top", help="Candidates to re-score (1-200).")]
PartialOpt = Annotated[
    bool,
    typer.Option(
        "--partial",
        help="Region search: also match windows of each image (finds crops); needs `imsrc embed --regions`.",
    ),
]
KeywordsOpt = Annotated[
    str | None,
    typer.Option("--keywords", help='Words to match in captions (web-search syntax: "a phrase", or, -word).'),
]
KeywordModeOpt = Annotated[
    str,
    typer.Option(
        "--keyword-mode", help="filter: only matching captions, ranked by the vector; boost: matches get +--boost."
    ),
]
BoostOpt = Annotated[float, typer.Option("--boost", help="What a caption match adds to the score (0-1).")]
MinScoreOpt = Annotated[float | None, typer.Option("--min-score", help="Drop results scoring below this.")]

search_app = typer.Typer(help="Search the catalog by image, URL or text.", no_args_is_help=True)
categories_app = typer.Typer(help="Categories: list, rename, re-sync prototypes.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(search_app, name="search")
    app.add_typer(categories_app, name="categories")
    app.command("similar")(similar)


def _options(
    k: int | None,
    categories: str | None,
    category: list[str] | None,
    exact: bool,
    mode: str,
    backend: str | None,
    model: str | None,
    include_duplicates: bool,
    rerank: str | None = None,
    rerank_top: int = 50,
    partial: bool = False,
    keywords: str | None = None,
    keyword_mode: str = "filter",
    boost: float = 0.1,
    min_score: float | None = None,
) -> Any:
    from pydantic import ValidationError

    from imsrc.search.keywords import check_keywords
    from imsrc.search.schemas import SearchOptions

    fan_out: int | Literal["auto"] | None = None
    if categories is not None:
        if categories != "auto" and not (
            categories.isascii() and categories.isdigit() and len(categories) <= 9 and int(categories) >= 1
        ):
            raise InvalidInputError("--categories must be a positive integer or 'auto'")
        fan_out = "auto" if categories == "auto" else int(categories)
    try:
        return SearchOptions.model_validate(
            {
                "k": k,
                "categories": fan_out,
                "category": category or [],
                "mode": "exact" if exact else mode,
                "backend": backend,
                "model": model,
                "include_duplicates": include_duplicates,
                "rerank": rerank,
                "rerank_top": rerank_top,
                "match": "partial" if partial else "whole",
                "keywords": None if keywords is None else check_keywords(keywords),
                "keyword_mode": keyword_mode,
                "boost": boost,
                "min_score": min_score,
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidInputError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from exc


def _service(ctx: typer.Context) -> Any:
    from imsrc.search.service import SearchRuntime

    runtime = getattr(ctx.obj, "search_runtime", None)
    if runtime is None:
        runtime = ctx.obj.search_runtime = SearchRuntime.create(ctx.obj.settings)
    return runtime


def _show(response: Any, as_json: bool) -> None:
    if as_json:
        print_json(response.model_dump())
        return
    rows = [
        [i + 1, r.id, f"{r.score:.4f}", _match(r), r.category or "", r.duplicates, r.file_url]
        for i, r in enumerate(response.results)
    ]
    cols = ["#", "id", "score", "match", "category", "duplicates", "file"]
    if any(r.caption for r in response.results):  # captions show under... here beside the results
        cols.append("caption")
        for row, r in zip(rows, response.results, strict=True):
            row.append(_short(r.caption or ""))
    if response.rerank:  # the comparator's score next to the cosine one
        cols.insert(3, response.rerank)
        for row, r in zip(rows, response.results, strict=True):
            row.insert(3, "" if r.rerank_score is None else f"{r.rerank_score:.4f}")
    how = "keywords alone" if response.mode == "keywords" else f"{response.mode}, {response.backend or 'exact scan'}"
    if response.keywords and response.mode != "keywords":
        how += f", keywords {response.keyword_mode}"
    if response.match == "partial":
        how += ", partial"
    print_table(cols, rows, title=f"{len(rows)} results ({how}, {response.model or 'no model'})")
    if response.stage1:
        err_console.print("stage 1: " + ", ".join(f"{c.category} {c.score:.3f}" for c in response.stage1))
    t = response.timings_ms
    err_console.print(
        f"timings: embed {t.embed:.1f} ms, stage 1 {t.stage1:.1f} ms, stage 2 {t.stage2:.1f} ms, "
        + (f"re-rank ({response.rerank}) {t.rerank:.1f} ms, " if response.rerank else "")
        + f"total {t.total:.1f} ms"
    )


def _short(caption: str, limit: int = 60) -> str:
    one_line = " ".join(caption.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def _match(hit: Any) -> str:
    """'duplicate (d=N)' for a near-copy of the query (pHash within the threshold), 'partial x0,y0-x1,y1' for a
    window match (fractions of the image), else 'similar'."""
    if hit.match_type == "duplicate":
        return f"duplicate (d={hit.phash_distance})"
    if hit.match_type == "partial" and hit.box:
        x0, y0, x1, y1 = hit.box
        return f"partial {x0:.2f},{y0:.2f}-{x1:.2f},{y1:.2f}"
    return "similar"


def _read_image(source: str) -> tuple[bytes | None, str | None]:
    if source.startswith(("http://", "https://")):
        return None, source
    path = Path(source)
    if not path.is_file():
        raise NotFoundError(f"no such image file: {source}")
    return path.read_bytes(), None


@search_app.command("image")
def search_image(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="An image file, or an http(s) URL.")],
    k: KOpt = None,
    categories: CategoriesOpt = None,
    category: CategoryOpt = None,
    exact: ExactOpt = False,
    mode: ModeOpt = "two_stage",
    backend: BackendOpt = None,
    model: ModelOpt = None,
    include_duplicates: DupOpt = False,
    rerank: RerankOpt = None,
    rerank_top: RerankTopOpt = 50,
    partial: PartialOpt = False,
    keywords: KeywordsOpt = None,
    keyword_mode: KeywordModeOpt = "filter",
    boost: BoostOpt = 0.1,
    min_score: MinScoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images most like this one (with --keywords: hybrid, captions filter or boost)."""
    options = _options(
        k,
        categories,
        category,
        exact,
        mode,
        backend,
        model,
        include_duplicates,
        rerank,
        rerank_top,
        partial,
        keywords,
        keyword_mode,
        boost,
        min_score,
    )
    data, url = _read_image(source)
    with ctx.obj.database().session() as session:
        service = _service(ctx).service(session)
        response = service.search_url(url, options) if url else service.search_image(data, options)
    _show(response, as_json)


@search_app.command("text")
def search_text(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: KOpt = None,
    categories: CategoriesOpt = None,
    category: CategoryOpt = None,
    exact: ExactOpt = False,
    mode: ModeOpt = "two_stage",
    backend: BackendOpt = None,
    model: ModelOpt = None,
    include_duplicates: DupOpt = False,
    keywords: KeywordsOpt = None,
    keyword_mode: KeywordModeOpt = "filter",
    boost: BoostOpt = 0.1,
    min_score: MinScoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images matching a text description (CLIP-family models); --keywords adds caption matching."""
    options = _options(
        k,
        categories,
        category,
        exact,
        mode,
        backend,
        model,
        include_duplicates,
        keywords=keywords,
        keyword_mode=keyword_mode,
        boost=boost,
        min_score=min_score,
    )
    with ctx.obj.database().session() as session:
        response = _service(ctx).service(session).search_text(query, options)
    _show(response, as_json)


@search_app.command("keywords")
def search_keywords(
    ctx: typer.Context,
    words: Annotated[str, typer.Argument(help='Words to find in captions ("a phrase", or, -word).')],
    k: KOpt = None,
    category: CategoryOpt = None,
    include_duplicates: DupOpt = False,
    min_score: MinScoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images whose caption matches the keywords (full-text, English stemming), best match first; no model."""
    from imsrc.search.keywords import check_keywords

    options = _options(k, None, category, False, "two_stage", None, None, include_duplicates, min_score=min_score)
    with ctx.obj.database().session() as session:
        response = _service(ctx).service(session).search_keywords(check_keywords(words), options)
    _show(response, as_json)


@search_app.command("categories")
def search_categories(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="An image file, or an http(s) URL.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Show only the top N.")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which categories is this image like? (stage 1 alone, with scores)"""
    data, url = _read_image(source)
    with ctx.obj.database().session() as session:
        service = _service(ctx).service(session)
        response = (
            service.categories_for_url(url, model_name=model, limit=limit)
            if url
            else service.categories_for_image(data, model_name=model, limit=limit)
        )
    if as_json:
        print_json(response.model_dump())
        return
    print_table(
        ["category", "id", "score"],
        [[c.category, c.category_id, f"{c.score:.4f}"] for c in response.categories],
        title=f"categories ({response.model})",
    )


def similar(
    ctx: typer.Context,
    image_id: Annotated[int, typer.Argument(help="An indexed image's id.")],
    k: KOpt = None,
    categories: CategoriesOpt = None,
    category: CategoryOpt = None,
    exact: ExactOpt = False,
    mode: ModeOpt = "two_stage",
    backend: BackendOpt = None,
    model: ModelOpt = None,
    include_duplicates: DupOpt = False,
    rerank: RerankOpt = None,
    rerank_top: RerankTopOpt = 50,
    partial: PartialOpt = False,
    keywords: KeywordsOpt = None,
    keyword_mode: KeywordModeOpt = "filter",
    boost: BoostOpt = 0.1,
    min_score: MinScoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """More like this: images nearest to an indexed image (itself left out)."""
    options = _options(
        k,
        categories,
        category,
        exact,
        mode,
        backend,
        model,
        include_duplicates,
        rerank,
        rerank_top,
        partial,
        keywords,
        keyword_mode,
        boost,
        min_score,
    )
    with ctx.obj.database().session() as session:
        response = _service(ctx).service(session).similar(image_id, options)
    _show(response, as_json)


@categories_app.command("list")
def categories_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Categories with image counts, prototypes and whether they were made automatically."""
    with ctx.obj.reader() as reader:
        rows = reader.categories()
    if as_json:
        print_json(rows)
        return
    cols = ["id", "name", "is_automatic", "image_count", "unique_image_count", "prototype_count"]
    print_table(cols, [[r[c] for c in cols] for r in rows], title="Categories")


@categories_app.command("rename")
def categories_rename(
    ctx: typer.Context,
    category: Annotated[str, typer.Argument(help="Name or id.")],
    new_name: Annotated[str, typer.Argument(help="The new name.")],
) -> None:
    """Rename a category; an automatic one becomes a real category (search catches up at once)."""
    from pydantic import ValidationError

    from imsrc.catalog.schemas import CategoryUpdate
    from imsrc.services.categories import CategoryService

    try:
        body = CategoryUpdate(name=new_name)
    except ValidationError as exc:
        raise InvalidInputError(f"the new name: {exc.errors()[0]['msg']}") from exc
    with ctx.obj.database().session() as session:
        service = CategoryService(session, ctx.obj.settings, _service(ctx).embedder_factory)
        found = service.update(service.resolve(category), body)
    err_console.print(f"category {found.id} is now {found.name!r}")


@categories_app.command("sync")
def categories_sync(
    ctx: typer.Context,
    regroup: Annotated[bool, typer.Option(help="Redo the automatic grouping now.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Bring prototypes, automatic categories, per-category indexes and predictions up to date; first rebuild a
    model's graph over every image made before it was half precision (concurrently: about 20 minutes at 1M
    images, searches and uploads go on)."""
    from imsrc.search.sync import rebuild_legacy_graphs, sync_search

    database = ctx.obj.database()
    rebuilt = rebuild_legacy_graphs(database)
    with database.session() as session:
        report = sync_search(session, ctx.obj.settings, embedders=_service(ctx).embedder_factory, force_regroup=regroup)
    out = {"graphs_rebuilt": rebuilt, **report.as_dict()}
    if as_json:
        print_json(out)
    else:
        err_console.print(", ".join(f"{k}: {v}" for k, v in out.items()))

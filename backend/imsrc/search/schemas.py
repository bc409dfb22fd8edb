"""Search requests and responses (API schemas, also what `--json` prints)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Mode = Literal["two_stage", "ann", "exact"]
Backend = Literal["pgvector", "faiss"]
MatchType = Literal["duplicate", "similar", "partial"]
Match = Literal["whole", "partial"]
Comparator = Literal["orb", "sift", "ssim", "histogram", "pixel"]
KeywordMode = Literal["filter", "boost"]
ResponseMode = Literal["two_stage", "ann", "exact", "keywords"]


class SearchOptions(BaseModel):
    k: int | None = Field(default=None, ge=1, le=1000, description="results to return (default IMSRC_SEARCH_K)")
    categories: int | Literal["auto"] | None = Field(
        default=None,
        description="stage-1 fan-out: exactly this many categories, or 'auto' for as many as cover "
        "IMSRC_SEARCH_SCORE_MASS of the score mass (default: the score-mass rule, at most IMSRC_SEARCH_CATEGORIES)",
    )
    category: list[str] = Field(
        default_factory=list, description="explicit category filter (names or ids); skips stage 1"
    )
    mode: Mode = "two_stage"
    backend: Backend | None = Field(default=None, description="stage-2 backend (default IMSRC_SEARCH_BACKEND)")
    model: str | None = Field(default=None, description="embedding model (default: the active one)")
    include_duplicates: bool = False
    rerank: Comparator | None = Field(
        default=None,
        description="re-score the first rerank_top candidates by this comparator between the query "
        "image and each candidate's thumbnail (image queries and similar only); near-duplicates stay first. orb/sift: "
        "RANSAC homography inliers of keypoint matches (query or its mirror image; under 8 counts as 0 and keeps the "
        "embedding order); ssim, histogram (intersection), pixel (1 - mean grey difference) on 64x64 copies",
    )
    rerank_top: int = Field(default=50, ge=1, le=200, description="candidates the comparator re-scores")
    match: Match = Field(
        default="whole",
        description="partial: also compare the query with windows of each indexed image (crops, "
        "details); an image scores its best window or its whole vector. Needs region vectors (imsrc embed --regions)",
    )
    keywords: str | None = Field(
        default=None,
        max_length=1000,
        description='words to match in captions (web-search syntax: "a phrase", or, -word; English stemming)',
    )
    keyword_mode: KeywordMode = Field(
        default="filter",
        description="filter: only images whose caption matches, ranked by the vector (exact "
        "cosine); boost: the vector search's results and the best matches, ranked by cosine + boost where the "
        "caption matches",
    )
    boost: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="what a caption match adds to the cosine score (keyword_mode boost)",
    )
    min_score: float | None = Field(
        default=None,
        ge=-1.0,
        le=1000.0,
        allow_inf_nan=False,
        description="drop results scoring below this (cosine, or ts_rank_cd for "
        "keywords alone); fewer than k may come back",
    )


class SearchHit(BaseModel):
    id: int
    score: float = Field(description="cosine similarity to the query")
    category: str | None
    category_id: int | None
    thumbnail_url: str
    file_url: str
    original_name: str | None = Field(default=None, description="the file name it was uploaded or indexed under")
    width: int | None = Field(default=None, description="pixels")
    height: int | None = Field(default=None, description="pixels")
    byte_size: int | None = Field(default=None, description="size of the original file in bytes")
    duplicates: int = Field(description="near-duplicate copies of this image in the catalog")
    match_type: MatchType = Field(
        default="similar",
        description="duplicate: the query image's perceptual hash is within "
        "IMSRC_DUPLICATE_THRESHOLD bits of this image's (a copy, recompressed or resized; always ranked first); "
        "similar: found by its embedding; partial: found by the embedding of one of its windows (match=partial), "
        "given in box",
    )
    phash_distance: int | None = Field(
        default=None, description="Hamming distance between the pHashes (duplicate matches only)"
    )
    rerank_score: float | None = Field(
        default=None,
        description="the comparator's score (higher is more alike; only with rerank; orb/sift: inlier count)",
    )
    box: list[float] | None = Field(
        default=None,
        description="match=partial: the matched window [x0, y0, x1, y1] as fractions of the image's "
        "width and height ([0, 0, 1, 1]: the whole image matched best)",
    )
    caption: str | None = Field(default=None, description="the image's caption, if it has one")
    keyword_match: bool | None = Field(
        default=None, description="with keywords: whether the caption matches them (always true when they filter)"
    )


class CategoryHit(BaseModel):
    category: str
    category_id: int
    score: float = Field(description="cosine similarity to the category's best prototype")
    sample_thumbnail_urls: list[str] = Field(
        default_factory=list, description="a few of the category's images (categories-only search, `samples`)"
    )


class Timings(BaseModel):
    embed: float
    stage1: float
    stage2: float
    rerank: float = Field(default=0.0, description="the comparator's time (part of total; 0 without rerank)")
    total: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    stage1: list[CategoryHit]
    timings_ms: Timings
    model: str | None = Field(description="the embedding model (none for keywords alone on an empty catalog)")
    mode: ResponseMode = Field(description="two_stage, ann or exact; keywords: keywords alone, no vectors")
    backend: Backend | None = Field(description="stage-2 backend used (none for exact)")
    rerank: Comparator | None = Field(default=None, description="the comparator that re-ranked the results")
    match: Match = Field(default="whole", description="whole-image search, or partial (windows too)")
    keywords: str | None = Field(default=None, description="the caption keywords, when given")
    keyword_mode: KeywordMode | None = Field(default=None, description="how the keywords were used")


class CategoriesResponse(BaseModel):
    categories: list[CategoryHit]
    timings_ms: Timings
    model: str


class UrlQuery(BaseModel):
    url: str = Field(description="http(s) URL of an image to search with")

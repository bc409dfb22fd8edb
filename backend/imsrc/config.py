"""Settings, read from the environment (prefix IMSRC_) and from a .env file.

Every field here is listed with its default in .env.example; keep the two in step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMSRC_", env_file=".env", extra="ignore")

    # Database. Unset means: run the embedded PostgreSQL under data_dir/pg.
    database_url: str | None = None
    data_dir: Path = Path("./data")
    # TCP port for the embedded server; 0 = unix socket only (POSIX) or a free port (Windows).
    embedded_port: int = Field(default=0, ge=0, le=65535)
    # The embedded server's cache: 'auto' (a quarter of the memory, 128 MB-8 GB) or a size such as 2GB.
    # Applied when the server starts (`imsrc db stop` first to change a running one).
    embedded_shared_buffers: str = Field(default="auto", pattern=r"^(auto|[1-9][0-9]*(kB|MB|GB))$")
    # `imsrc sql` logs in as the read-only role imsrc_reader: a full URL, or a password for it.
    reader_url: str | None = None
    reader_password: str | None = None
    # Apply pending migrations automatically when a command needs the schema.
    auto_migrate: bool = True

    # Models.
    model: str = "auto"
    model_checkpoint: Path | None = None
    model_cache_dir: Path | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Which engine runs the model (embeddings.runtime): auto, torch, onnx, onnx-int8.
    inference: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"

    # Ingest.
    workers: int = Field(default=0, ge=0)  # 0 = one per CPU core
    # API worker processes of `imsrc serve` (IMSRC_WORKERS_HTTP); 0 = one per CPU core (at most 64).
    workers_http: int = Field(default=0, ge=0, le=64)
    # 16: ONNX Runtime's cost per image is flat from batch 8 to 64, torch's is lowest at 8-16 and its working
    # memory grows above 16 (0.9 GB at 64). BENCHMARKS.md, "Inference engines: batch size, threads and targets".
    batch_size: int = Field(default=16, ge=1, le=1024)
    duplicate_threshold: int = Field(default=4, ge=0, le=32)
    max_pixels: int = Field(default=89_478_485, ge=1)  # Pillow's own decompression-bomb limit
    # Search queries (uploaded or fetched) decode at most this many pixels (and never more than max_pixels).
    query_max_pixels: int = Field(default=50_000_000, ge=1)
    # Images decoded at once by one server process (uploads and queries); a request that waits longer than
    # decode_wait_s for a turn gets 503 with Retry-After.
    max_concurrent_decodes: int = Field(default=2, ge=1, le=64)
    decode_wait_s: float = Field(default=5.0, ge=0, le=300)
    # Searches one server process runs at once (api/admission.py); more wait their turn without a thread, and
    # one that waits longer than search_wait_s gets 503 with Retry-After. 0: no limit (the threadpool's 40).
    search_concurrency: int = Field(default=4, ge=0, le=1024)
    search_wait_s: float = Field(default=60.0, gt=0, le=3600)
    # Uploads through the API leave the stage-1 calibration and the predicted labels of earlier images to a
    # background refresh (search/refresher.py), at most this often per server process; 0: every upload redoes
    # them inside its own transaction (as `imsrc index` does).
    upload_refresh_delay_s: float = Field(default=1.0, ge=0, le=3600)
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    thumbnail_size: int = Field(default=256, ge=32, le=1024)
    # Region vectors for match=partial (windows of each image, search/regions.py) while indexing and uploading.
    # Off by default: they multiply the vector storage (BENCHMARKS.md, "Robustness"); `imsrc embed --regions`
    # adds them to a catalog later.
    regions: bool = False

    # Search.
    search_backend: Literal["pgvector", "faiss"] = "pgvector"
    # The most categories stage 1 searches by default; it stops earlier once search_score_mass is covered. A query
    # whose rule wants more is not one stage 1 is sure of: see search_stage1_fallback.
    search_categories: int = Field(default=3, ge=1)
    search_k: int = Field(default=10, ge=1, le=1000)
    max_prototypes: int = Field(default=4, ge=1, le=64)
    # A category is split into k-means prototypes only while one more centre raises the members' mean
    # cosine to their nearest centre by at least this much (tight categories keep one prototype).
    prototype_min_gain: float = Field(default=0.02, ge=0.0, le=1.0)
    # Stage 1 takes categories until this share of the (softmax) score mass is covered (1.0: always the cap).
    search_score_mass: float = Field(default=0.9, gt=0.0, le=1.0)
    # The softmax temperature of that rule. 0 (default): calibrated at sync time on the catalog's own members
    # (search/calibration.py) so that the rule picks a held-out member's own category for
    # search_stage1_coverage of them; 0.05 until a model is calibrated. A number > 0 fixes it (0.05 = the old rule).
    search_stage1_temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    # 0.99: on Fashion-MNIST through EfficientNet-Lite0 the held-out coverage tracks two-stage neighbour recall
    # within ~0.005, and 0.98 left recall near 0.98 (bench/search/stage1_offline.py).
    search_stage1_coverage: float = Field(default=0.99, gt=0.0, le=1.0)
    # True: a default two-stage query whose rule wants more than search_categories categories is answered by
    # `ann` over the model's whole graph (the response's mode says so): cutting it at the cap missed the query's
    # own category for ~2 % of real queries and fell below exact search's label precision. False: the cap cuts.
    search_stage1_fallback: bool = True
    # With the fallback: a query whose rule wants more than search_categories but at most this many categories
    # searches those (two-stage, each walked at its calibrated width) instead of the whole model; more than this,
    # the whole model (`ann`). 0 (default): every such query is answered by `ann`. Why not by default: on 20k
    # real-calibrated vectors it cost recall (0.975 vs 0.995: a query stage 1 is unsure of has neighbours beyond
    # the categories its rule wants); it reads only the per-category graphs, which may be what fits in memory.
    search_fallback_categories: int = Field(default=0, ge=0, le=1000)
    # pgvector hnsw.ef_search of the per-model graph (`ann`), and the floor per category until search sync has
    # calibrated the category's walk (see pg_queries.category_ef_search); raised to k when smaller.
    search_ef_search: int = Field(default=100, ge=1, le=1000)
    # pgvector: the recall@10 of the exact top 10 that each category's walk width is calibrated to reach on the
    # category's own members (search/walks.py). 0: no calibration, every category follows the size rule.
    search_walk_recall: float = Field(default=0.99, ge=0.0, le=1.0)
    # pgvector: categories with fewer vectors than this get no HNSW index and are scanned exactly (bench/search:
    # at 1,000 rows a per-category HNSW answered ~2x faster than the exact scan at recall@10 0.98).
    search_exact_max_rows: int = Field(default=500, ge=0)
    # pgvector: a model with fewer vectors than this answers two_stage requests (without an explicit fan-out) as
    # `ann`: at 10,000 real embeddings one global graph walk beat stage 1 + per-category walks (HTTP p50 10.0 vs
    # 13.3 ms) at recall 1.0 vs 0.97; at 100,000 two-stage won (bench/search). 0 = always two-stage.
    search_two_stage_min_rows: int = Field(default=20000, ge=0)
    # At server start, in the background: build the API's routes (api.app.build_routes), pg_prewarm the embeddings
    # and the active model's HNSW indexes, load its prototypes and (backend faiss) its FAISS index, so the first
    # searches after a restart are not cold.
    search_warmup: bool = True
    faiss_flat_max_rows: int = Field(default=5000, ge=0)
    # The saved FAISS index is refreshed once the processes using it have replayed this many changed images from
    # the change log since it was saved (one of them saves, the others load the new files on their next query),
    # so catching up after a restart stays short and changed categories are shared again. 0 = never.
    faiss_resave_changes: int = Field(default=10000, ge=0)
    # Regroup automatic categories when the uncategorised set has grown by this fraction since the last grouping.
    autogroup_growth: float = Field(default=0.5, gt=0.0)
    autogroup_max_categories: int = Field(default=50, ge=1)

    # Server and security.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: str | None = None
    protect_reads: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    # Host names (besides IP addresses, localhost names and this machine's name) the server answers to, e.g. the
    # public name of a reverse proxy that passes Host on; "*.example.org" for subdomains, "*" for any.
    allowed_hosts: list[str] = Field(default_factory=list)
    # `imsrc serve` closes a connection whose request head takes longer than this to arrive, or whose body
    # stalls this long (slow clients holding connections open: slowloris).
    client_timeout_s: float = Field(default=10.0, gt=0)
    url_fetch_allow_private: bool = False
    # One deadline for a whole URL fetch: resolving, connecting, headers and body, redirects included.
    url_fetch_timeout_s: float = Field(default=10.0, gt=0)
    # URL fetches in flight at once; more get 503 + Retry-After.
    url_fetch_concurrency: int = Field(default=4, ge=1, le=256)

    # Operations: log lines as plain text, or one JSON object per line (for log collectors).
    log_format: Literal["text", "json"] = "text"

    # `IMSRC_X=` (as .env.example writes the optional ones) means unset, not an empty string, and for paths not
    # Path("."), which would point the model checkpoint or cache at the working directory.
    @field_validator(
        "database_url", "reader_url", "reader_password", "model_checkpoint", "model_cache_dir", "api_key", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

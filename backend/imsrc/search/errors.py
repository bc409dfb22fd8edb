"""Search errors (domain errors: the API's one handler and the CLI turn them into responses/lines)."""

from __future__ import annotations

from imsrc.errors import ImsrcError
from imsrc.imaging import ImageDecodeError


class UrlNotAllowedError(ImsrcError):
    status_code = 400
    code = "url_not_allowed"


class UrlFetchError(ImsrcError):
    status_code = 400
    code = "url_fetch_failed"


NotAnImageError = ImageDecodeError  # one error family for every image that is refused (see imsrc.imaging)


class NoModelError(ImsrcError):
    status_code = 409
    code = "no_model"


class ModelUnavailableError(ImsrcError):
    """A model-layer error (text on an image-only model, missing weights) carried with its own status."""

    def __init__(self, message: str, *, status_code: int, code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class BackendUnavailableError(ImsrcError):
    """The chosen stage-2 backend cannot serve this catalog (FAISS on a Citus cluster)."""

    status_code = 409
    code = "backend_unavailable"


FAISS_ON_CITUS = (
    "the FAISS backend is not available on a Citus cluster: its in-process index would hold every shard's "
    "vectors in this one process and follow a change log that Citus does not keep; search with pgvector "
    "(backend=pgvector, IMSRC_SEARCH_BACKEND=pgvector), whose per-category HNSW indexes live on the workers"
)

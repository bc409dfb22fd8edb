"""Search errors (domain errors: the API's one handler and the CLI turn them into responses/lines)."""

from __future__ import annotations

from imsrc.errors import ImsrcError, InvalidInputError


class UrlNotAllowedError(ImsrcError):
    status_code = 400
    code = "url_not_allowed"


class UrlFetchError(ImsrcError):
    status_code = 400
    code = "url_fetch_failed"


class NotAnImageError(InvalidInputError):
    code = "not_an_image"


class NoModelError(ImsrcError):
    status_code = 409
    code = "no_model"


class ModelUnavailableError(ImsrcError):
    """A model-layer error (text on an image-only model, missing weights) carried with its own status."""

    def __init__(self, message: str, *, status_code: int, code: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code

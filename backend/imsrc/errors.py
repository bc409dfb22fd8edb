"""Domain errors. Each carries its HTTP status and a short code; the API turns them into
`{"error": {"code", "message"}}` in one handler and the CLI prints the message on one line."""

from __future__ import annotations


class ImsrcError(Exception):
    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(ImsrcError):
    status_code = 404
    code = "not_found"


class ConflictError(ImsrcError):
    status_code = 409
    code = "conflict"


class InvalidInputError(ImsrcError):
    status_code = 422
    code = "invalid_input"


class DatabaseUnavailableError(ImsrcError):
    status_code = 503
    code = "database_unavailable"


class BusyError(ImsrcError):
    """A bounded resource (image decodes, URL fetches, ...) is at its limit: retry after `retry_after` seconds.

    The API answers 503 with a Retry-After header; one class for every such cap so clients handle them alike."""

    status_code = 503
    code = "busy"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class ConfigurationError(ImsrcError):
    """A setting is wrong (bad URL, unwritable data directory, port in use, ...)."""

    status_code = 500
    code = "configuration_error"


class SchemaNotReadyError(ImsrcError):
    status_code = 503
    code = "schema_not_ready"


class UnauthorizedError(ImsrcError):
    status_code = 401
    code = "unauthorized"


class PayloadTooLargeError(ImsrcError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ImsrcError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidImageError(InvalidInputError):
    """Every uploaded file was rejected (corrupt, not an image, too many pixels, ...)."""

    code = "invalid_image"

"""The few error types of the service, and their mapping to OpenAI-shaped HTTP errors.

Client mistakes are `APIError` subclasses raised anywhere on the request path;
the ingress turns them into `{"error": {...}}` JSON with their status code. A
stage whose queue is full becomes 429, a stage that is down 503, a request
past its time limit 504; anything else is logged once and becomes 500.
"""

from __future__ import annotations


def echoed(text: str, limit: int = 80) -> str:
    """Client input quoted back in a message or a log line, cut to `limit` characters: a
    1 MB model name is not worth a 1 MB answer."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


class APIError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    @property
    def headers(self) -> dict[str, str] | None:
        """HTTP headers the error response carries."""
        return None


class BadRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"The model {echoed(model)!r} does not exist; this service serves {available}",
            param="model",
            code="model_not_found",
        )


class RequestTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class TooManyRequests(APIError):
    """A stage's queue is full: come back after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestTimeout(APIError):
    status_code = 504
    error_type = "timeout_error"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"

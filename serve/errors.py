"""The few error types of the service, and their mapping to OpenAI-shaped HTTP errors.

Client mistakes are `APIError` subclasses raised anywhere on the request path;
the ingress turns them into `{"error": {...}}` JSON with their status code. A
stage that is down becomes 503; anything else is logged once and becomes 500.
"""

from __future__ import annotations


class APIError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"The model {model!r} does not exist; this service serves {available}",
            param="model",
            code="model_not_found",
        )


class RequestTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"

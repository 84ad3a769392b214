"""Typed serving errors and their OpenAI-shaped bodies."""

from __future__ import annotations

from http import HTTPStatus


class ServeError(Exception):
    http_status = 500
    error_type = "internal_server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


class BadRequest(ServeError):
    http_status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class InvalidText(BadRequest):
    code = "invalid_text"


class Unauthorized(ServeError):
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServeError):
    http_status = 403
    error_type = "permission_error"
    code = "forbidden"


class UnknownModel(ServeError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ServeError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ServeError):
    http_status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class UnsupportedMediaType(ServeError):
    http_status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class TooManyRequests(ServeError):
    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after_s = 1


class Unavailable(ServeError):
    http_status = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class RequestTimeout(Unavailable):
    code = "request_timeout"


class InternalServerError(ServeError):
    code = "internal_error"


# Every status the API answers errors with: `inferos:request_errors_total` has a series
# for each from the start (at 0), so dashboards show a healthy server as 0, not "No data".
ERROR_STATUSES = (400, 401, 403, 404, 405, 413, 415, 429, 431, 500, 503)


def is_server_fault(exc: BaseException) -> bool:
    """Whether a failed request counts against the server's error rate (the control loops'
    fallback): a client's mistake (4xx) or a timeout under load does not; anything else
    (503 from a dead replica, an unexpected exception) does."""
    if isinstance(exc, ServeError):
        return exc.http_status >= 500 and not isinstance(exc, RequestTimeout)
    return True


def error_body(message: str, error_type: str, param: str | None, code: str | int | None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def status_phrase(status: int) -> str:
    return HTTPStatus(status).phrase

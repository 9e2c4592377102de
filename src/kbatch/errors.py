"""The one exception tree of kbatch.

Everything kbatch raises on purpose derives from :class:`KbatchError`, so a
caller (and the CLI's single error handler) can catch one type::

    KbatchError
    ├── ConfigError          no server configured, unreadable config or token file
    ├── SpecError            bad input found before anything is sent or created
    ├── TransportError       the server could not be reached
    ├── WaitTimeout          Client.wait gave up (also a TimeoutError)
    └── ApiError             the server answered with an error (carries status, code)
        ├── AuthenticationError   401: missing, unknown or expired token
        ├── PermissionDenied      403: valid token, not allowed
        ├── NotFound              404
        ├── Conflict              409
        ├── InvalidRequest        400, 413, 422: the server refused the input
        └── ServiceUnavailable    503: a dependency (e.g. the hub) is down
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ConfigError",
    "Conflict",
    "InvalidRequest",
    "KbatchError",
    "NotFound",
    "PermissionDenied",
    "ServiceUnavailable",
    "SpecError",
    "TransportError",
    "WaitTimeout",
    "api_error_for_status",
]


class KbatchError(Exception):
    """Base class of every error kbatch raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(KbatchError):
    """The client or server configuration is missing or unusable."""


class SpecError(KbatchError):
    """Invalid job input: a directive, size, time, name or path that cannot be used."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TransportError(KbatchError):
    """The server could not be reached or the connection broke."""


class WaitTimeout(KbatchError, TimeoutError):
    """A wait for a job to end ran out of time; the job goes on."""


class ApiError(KbatchError):
    """The server answered with an error response."""

    def __init__(
        self, message: str, *, status: int, code: str = "error", field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


class AuthenticationError(ApiError):
    """401: the token is missing, unknown or expired."""


class PermissionDenied(ApiError):
    """403: the caller is known but may not do this."""


class NotFound(ApiError):
    """404: no such job (or not one the caller may see)."""


class Conflict(ApiError):
    """409: the request conflicts with the job's current state."""


class InvalidRequest(ApiError):
    """400/413/422: the server refused the input."""


class ServiceUnavailable(ApiError):
    """503: the server or something it depends on is unavailable."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    503: ServiceUnavailable,
}


def api_error_for_status(status: int) -> type[ApiError]:
    """The exception class that stands for an HTTP error status."""
    return _BY_STATUS.get(status, ApiError)

"""Failures of calls to a provider: which are worth retrying, and the text-free error they become.

A :class:`SourceError` names the exception type and HTTP status only. Provider errors can quote the
request (which holds private records), so their messages are never copied and the original
exception is never chained.
"""

from __future__ import annotations

#: HTTP statuses worth retrying: timeouts, conflicts/too-early, rate limits and server errors.
_RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: litellm exception class names that are transient whatever their status says.
_RETRY_TYPES = frozenset({
    "Timeout", "APITimeoutError", "APIConnectionError", "RateLimitError", "ServiceUnavailableError",
    "InternalServerError", "BadGatewayError",
})
#: Client-side mistakes that retrying cannot fix, even if litellm files them under a 5xx class.
_FATAL_TYPES = frozenset({
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "BadRequestError",
    "ContextWindowExceededError", "UnprocessableEntityError", "UnsupportedParamsError",
})


class SourceError(RuntimeError):
    """A provider call failed for good (after any retries).

    The message names the error type and HTTP status only, never prompt text. Sources raise it to
    the generator only for failures that do not depend on private data (see
    :mod:`aggregation.sources.openai_compat`); a private prompt's failure becomes an all-zero row.
    """

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if any."""
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    try:
        return int(status) if status is not None else None
    except (TypeError, ValueError):
        return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can help (timeouts, connection errors, 429, 5xx)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _FATAL_TYPES:
        return False
    if names & _RETRY_TYPES:
        return True
    status = status_of(exc)
    if status is not None:
        return status in _RETRY_STATUSES
    # Transport failures that litellm did not wrap (httpx / socket level).
    return isinstance(exc, (TimeoutError, ConnectionError)) or any(
        n in names for n in ("TimeoutException", "NetworkError", "RemoteProtocolError")
    )

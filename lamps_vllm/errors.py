"""Errors that are the client's fault. The HTTP ingress answers them with 4xx and the message;
Python callers catch them by type (Ray re-raises a replica's exception as an instance of it)."""

from __future__ import annotations


class RequestError(ValueError):
    """Base: the request cannot be served as given."""

    status_code = 400

    def __reduce__(self) -> tuple[type, tuple[str, ...]]:
        # Keep the subclass and message intact when Ray pickles the error across processes.
        return (type(self), (str(self),))


class PromptTooLongError(RequestError):
    pass


class UnknownModelError(RequestError):
    status_code = 404


class UnsupportedParameterError(RequestError):
    pass


class TooManyToolCallsError(RequestError):
    pass

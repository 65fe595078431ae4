"""Errors that are the client's fault. The HTTP ingress answers them with 4xx and the message;
Python callers catch them by type (Ray re-raises a replica's exception as an instance of it) and
read `message`: the copy Ray raises in a handle caller has Ray's traceback as its str()."""

from __future__ import annotations


class RequestError(ValueError):
    """Base: the request cannot be served as given."""

    status_code = 400

    @property
    def message(self) -> str:
        """The short message HTTP gives, also on Ray's copy (whose `cause` is the original)."""
        cause = getattr(self, "cause", None)
        return str(cause) if isinstance(cause, RequestError) else str(self)

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


class UnknownPolicyVariantError(RequestError):
    pass


def unknown_variant_message(label: str, allowed: list[str]) -> str:
    if not allowed:
        return "this deployment takes no per-request policy (it has no policy variants)"
    return f"unknown policy variant {label[:64]!r}; this deployment has: {', '.join(allowed)}"


class UnknownApiTypeError(RequestError):
    pass


class BodyTooLargeError(RequestError):
    status_code = 413


class ServerBusyError(RequestError):
    """Too many requests in flight: not the client's fault: retry later (HTTP 429, Retry-After)."""

    status_code = 429
    retry_after_s = 1

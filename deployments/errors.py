"""HTTP-mapped errors of the serving layer that are not about the request's content: access
(401, 403, 404 for an admin or benchmark route that is off) and the service itself (503, 500).
They subclass `RequestError` so the ingress answers them like the others, short and in the same
JSON shape, and a Python handle caller catches them by type and reads `message`."""

from __future__ import annotations

from lamps_vllm.errors import RequestError


class AuthenticationError(RequestError):
    """No API key, or one this server does not know."""

    status_code = 401


class PermissionDeniedError(RequestError):
    """A valid key that does not open this route (a normal key on an admin route)."""

    status_code = 403


class AdminDisabledError(RequestError):
    """Admin routes are off: no admin key is configured."""

    status_code = 404


class BenchmarkEndpointsDisabledError(RequestError):
    """Trace replay (`/v1/traces`, the handle's `replay`) is off: it is for benchmarks, and the
    config does not turn it on (`enable_benchmark_endpoints`)."""

    status_code = 404


class EngineUnavailableError(RequestError):
    """The engine could not serve the request (its replica lost mid-request, the engine dead,
    none running): not the client's fault; the request was not completed and may be retried."""

    status_code = 503


class InternalServerError(RequestError):
    """A bug on our side; the details are in the server's log, not in the answer."""

    status_code = 500


class InsecureConfigError(RuntimeError):
    """The deployment would expose the API beyond this machine without API keys."""

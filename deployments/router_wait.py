"""How long a request may wait at Serve's router for an engine replica before the client is told
to come back later (HTTP 429, `ServerBusyError`).

Serve's router never gives up on a request: while every replica is full (the fleet router backs
off, or every replica's queue is at `max_ongoing_requests`) it retries with exponential backoff,
forever. The ingress bounds that wait here, per request: a client gets a short 429 with
`Retry-After` instead of a connection that hangs for as long as the fleet stays full, and the
request is withdrawn from the router's queue, so it never runs after its client was refused.

Only the wait for a replica is bounded; once placed, a request runs as long as it needs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

from lamps_vllm.errors import ServerBusyError


async def await_placement(
    response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any],
    bound_s: float | None,
) -> None:
    """Return once Serve's router has placed `response`'s request on a replica; raise
    `ServerBusyError` (and withdraw the request) if that takes more than `bound_s` seconds.
    `None`: wait as long as it takes (Serve's own behaviour)."""
    if bound_s is None:
        return
    try:
        # Serve 2.60 (pinned) resolves this future when the router has chosen a replica and the
        # replica accepted the request; it is the only way to tell waiting from running, and
        # `_to_object_ref` (a DeveloperAPI) does the same wait, but only on by-reference handles.
        await asyncio.wait_for(response._fetch_future_result_async(), timeout=bound_s)
    except TimeoutError:
        # Cancelling a request not yet placed removes it from the router's queue (Serve's
        # documented `cancel()`); one placed in the last instant is cancelled on its replica.
        response.cancel()
        raise ServerBusyError(
            f"every engine replica is full: no replica could take this request within "
            f"{bound_s:g} s; retry in {ServerBusyError.retry_after_s} s"
        ) from None

"""The serving layer's side of the engine's hold table (`hold_table.py`): vLLM utility calls to
the scheduler plugin in the engine-core process, never generate requests, so they are neither
ranked, nor admission-gated, nor prefilled, and they answer.

- `done(id)`: augmented request `id` is over; whatever is held for it goes now. `drive` sends it
  when every request ends, however it ends.
- `expire()`: let go of every hold past its deadline now. The engine checks deadlines when it
  steps; an idle engine does not step, so the replica asks on a timer.
- `snapshot()`: what is held (holds, device blocks, host holds) and the engine's own counts of
  blocks in use and host-pool bytes, read now (statistics are only made when the engine steps).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# The EngineCore method the scheduler plugin installs (`scheduler.install_control`).
CONTROL_METHOD = "lamps_control"
DONE_TIMEOUT_S = 10.0  # an engine that does not answer this fast is failing anyway


class HoldControl:
    def __init__(self, engine: AsyncLLM) -> None:
        self._engine = engine
        self._pending: set[asyncio.Task[None]] = set()  # kept referenced until done

    async def _call(self, command: str, argument: str | float | None = None) -> Any:
        return await self._engine.engine_core.call_utility_async(
            CONTROL_METHOD, command, argument
        )

    async def done(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self._call("done", request_id), DONE_TIMEOUT_S)
        except Exception:  # the engine is gone too: then nothing is held either
            logger.warning("could not end the holds of %s", request_id, exc_info=True)

    def done_soon(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.done(request_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def expire(self, at: float | None = None) -> int:
        """Holds whose deadline is past at `at` (time.time(); default now) go; how many."""
        return int(await self._call("expire", at))

    async def snapshot(self) -> dict[str, int]:
        return dict(await self._call("snapshot"))

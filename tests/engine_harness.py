"""A real vLLM engine (tiny dummy-weight model) on its own event loop, for tests that look at
the engine directly: block counts, cached tokens, the scheduler plugin's figures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from lamps_vllm.engine import EngineSettings, start_engine
from lamps_vllm.holds import HoldControl
from lamps_vllm.stats import EngineStatsSnapshot

T = TypeVar("T")


class EngineHarness:
    """AsyncLLM keeps background tasks on the loop it was started from, so every coroutine
    that uses it runs on one loop in a thread of its own."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.engine, self._stats = self.run(self._start())
        self.vocab_size = self.engine.model_config.get_vocab_size()
        self.holds = HoldControl(self.engine)

    async def _start(self) -> Any:
        return await start_engine(self.settings)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def stats(self) -> EngineStatsSnapshot:
        return self._stats.snapshot

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


# The policies tests run on the shared engine, each a variant it builds at start-up and a
# request names by label (RequestMeta.policy_variant).
HARNESS_VARIANTS: dict[str, dict[str, Any]] = {
    "vllm": {"policy": "vllm"},
    "infercept": {"policy": "infercept"},
    "sjf": {"policy": "sjf"},
    "lamps": {"policy": "lamps"},
    "preserve": {"policy": "fixed", "policy_options": {"strategy": "preserve"}},
    "discard": {"policy": "fixed", "policy_options": {"strategy": "discard"}},
    "swap": {"policy": "fixed", "policy_options": {"strategy": "swap"}},
    "preserve-then-swap": {
        "policy": "fixed",
        "policy_options": {"strategy": "preserve", "demote_to": "swap"},
    },
    "keep": {"policy": "fixed", "policy_options": {"strategy": "keep"}},
    "lamps-no-admission": {"policy": "lamps", "policy_options": {"admission": False}},
    "lamps-estimates": {"policy": "lamps", "policy_options": {"predictor": "estimates"}},
    # LAMPS choosing between Preserve and Discard only: a call's strategy then turns on one
    # comparison of wastes (tests/test_engine_plan.py).
    "lamps-preserve-or-discard": {
        "policy": "lamps",
        "policy_options": {"swap": False, "keep": False},
    },
}


def tiny_settings(model: Path, **overrides: Any) -> EngineSettings:
    # 4 layers x 2 KV heads x 64 x K,V x fp32 = 4 KiB a token: 16 MiB is 4096 tokens, 256
    # blocks of 16, small enough that a few requests fill it.
    return EngineSettings.model_validate(
        {
            "model": model,
            "served_model_name": "tiny",
            "load_format": "dummy",
            "max_model_len": 2048,
            "kv_cache_bytes": 16 * 1024 * 1024,
            "block_size": 16,
            "max_num_seqs": 32,
            "swap_pool_bytes": 8 * 1024 * 1024,
            **overrides,
        }
    )


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Polls `check` every 0.1 s; fails the test with `what` if it is not true by `timeout_s`.
    Returns the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started

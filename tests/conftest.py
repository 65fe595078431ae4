"""Session fixtures: one Redis for the unit tests, and one real serving stack (Redis, Ray, Serve,
a vLLM engine on the real SmolLM2 model) shared by every end-to-end test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lamps.local_stack import RunningStack, load_serve_config, local_stack
from lamps.model import PreparedModels, prepare_models
from lamps.redis_server import RedisServer, free_port
from tests.engine_harness import HARNESS_VARIANTS, EngineHarness, tiny_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LAMPS_DATA_DIR", PROJECT_DIR / "data"))
SERVE_CONFIG = PROJECT_DIR / "cluster" / "serve-cpu.yaml"
MODEL = "smollm2-135m"
STACK_VARIANTS = {
    "lamps": {"policy": "lamps"},
    "vllm": {"policy": "vllm"},
    "preserve": {"policy": "fixed", "policy_options": {"strategy": "preserve"}},
    # LAMPS whose plan always stands (it swaps what it plans to swap even with memory to spare).
    "lamps-plan": {"policy": "lamps", "policy_options": {"slack_free_share": None}},
}


@pytest.fixture(scope="session")
def prepared_models() -> PreparedModels:
    return prepare_models(DATA_DIR)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis"), free_port()) as server:
        yield server.url


@pytest.fixture(scope="session")
def stack(prepared_models: PreparedModels) -> Iterator[RunningStack]:
    """The application of cluster/serve-cpu.yaml, as `make serve` runs it, on free ports so a
    server already running on this machine is left alone."""
    config = load_serve_config(SERVE_CONFIG)
    config["http_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"]["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    app["args"]["max_tool_calls_limit"] = 8
    # Trace replay and the simulated API (off in serve-cpu.yaml): many tests script requests.
    app["args"]["enable_benchmark_endpoints"] = True
    # Small enough that the context-limit tests need no giant prompts.
    app["args"]["engine"]["max_model_len"] = 2048
    # Policies a trace request may name (the bench smoke test's, and one that holds KV
    # through a call), as `lamps bench` sets them before it starts a stack.
    app["args"]["engine"]["scheduler"]["policy_variants"] = STACK_VARIANTS
    with local_stack(config, PROJECT_DIR, DATA_DIR, log_to_driver=False) as running:
        yield running


@pytest.fixture(scope="session")
def harness(prepared_models: PreparedModels) -> Iterator[EngineHarness]:
    """A bare engine (tiny dummy model, small KV cache) for tests that look inside it."""
    h = EngineHarness(
        tiny_settings(prepared_models.tiny_dummy, scheduler={"policy_variants": HARNESS_VARIANTS})
    )
    yield h
    h.close()


@pytest.fixture(scope="session")
def http(stack: RunningStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http_url, timeout=300) as client:
        yield client

"""API keys: every HTTP route but /health needs one when keys are set, admin routes need an admin
key and are off without one, and no keys is allowed only on a loopback HTTP host."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from ray import serve

from deployments.access import ApiKeys, check_exposure, env_keys
from deployments.errors import InsecureConfigError
from lamps.local_stack import RunningStack
from tests.conftest import MODEL

USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
TRACE = {
    "segments": [
        {"prompt_tokens": 12, "completion_tokens": 2, "api_time": 0.0, "api_token_length": 1},
        {"prompt_tokens": 15, "completion_tokens": 1},
    ]
}


# ---- the rules, without a server ----


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_no_keys_is_fine_on_loopback(host: str) -> None:
    check_exposure(host, ApiKeys())


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.4", "::", "head.internal", None])
def test_no_keys_elsewhere_refuses_to_start(host: str | None) -> None:
    with pytest.raises(InsecureConfigError, match="without API keys: set `api_keys`"):
        check_exposure(host, ApiKeys())
    check_exposure(host, ApiKeys.from_keys([USER_KEY]))  # with a key: fine


def test_keys_from_config_and_environment_are_checked() -> None:
    from deployments.app import AppArgs

    engine = {"model": "m", "served_model_name": "m"}
    with pytest.raises(ValidationError, match="at least 16 characters"):
        AppArgs.model_validate({"engine": engine, "api_keys": ["short"]})
    assert env_keys("K", {"K": f" {USER_KEY}, {ADMIN_KEY}\n"}) == [USER_KEY, ADMIN_KEY]
    assert env_keys("K", {}) == []
    with pytest.raises(ValueError, match="K: every key"):
        env_keys("K", {"K": "tiny"})
    keys = ApiKeys.from_keys([USER_KEY])
    assert USER_KEY not in keys.model_dump_json()  # only digests travel in the bound args


# ---- through Serve: a second ingress with keys, in front of the suite's engine ----


@pytest.fixture(scope="module")
def keyed(stack: RunningStack) -> Iterator[str]:
    """An ingress whose user key comes from its settings (the app args) and whose admin key
    comes from its environment (LAMPS_ADMIN_API_KEYS)."""
    from deployments.ingress import Ingress, IngressSettings

    settings = IngressSettings(
        served_model_name=MODEL, max_model_len=2048, api_keys=ApiKeys.from_keys([USER_KEY])
    )
    env = {"env_vars": {"LAMPS_ADMIN_API_KEYS": ADMIN_KEY}}
    app = serve.deployment(
        Ingress,
        name="KeyedIngress",
        ray_actor_options={"num_cpus": 0, "runtime_env": env},
    ).bind(
        serve.get_deployment_handle("EngineReplica", "lamps"),
        serve.get_deployment_handle("ToolWorker", "lamps"),
        settings.model_dump(mode="json"),
        None,
    )
    serve.run(app, name="keyed", route_prefix="/keyed")
    try:
        yield f"{stack.http_url}/keyed"
    finally:
        serve.delete("keyed")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ROUTES = [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")]


@pytest.mark.engine
def test_keys_are_required_on_every_route_but_health(keyed: str) -> None:
    with httpx.Client(base_url=keyed, timeout=120) as client:
        for method, path in [*ROUTES, ("POST", "/v1/traces"), ("POST", "/v1/chat/completions")]:
            for headers in ({}, bearer("not-a-key-of-this-server"), {"Authorization": USER_KEY}):
                refused = client.request(method, path, headers=headers, json={})
                assert refused.status_code == 401, (path, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer"
                error = refused.json()["error"]
                assert error["type"] == "AuthenticationError" and len(refused.text) < 200
        for method, path in ROUTES:
            assert client.request(method, path, headers=bearer(USER_KEY)).status_code == 200
        answered = client.post("/v1/traces", json=TRACE, headers=bearer(USER_KEY))
        assert answered.status_code == 200, answered.text
        # An admin key opens the normal routes too.
        assert client.get("/v1/models", headers=bearer(ADMIN_KEY)).status_code == 200
        assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.engine
def test_admin_routes_need_the_admin_key(keyed: str, http: httpx.Client) -> None:
    with httpx.Client(base_url=keyed, timeout=300) as client:
        assert client.post("/v1/admin/measure-costs").status_code == 401
        refused = client.post("/v1/admin/measure-costs", headers=bearer(USER_KEY))
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == "this route needs an admin key"
        response = client.post("/v1/admin/measure-costs", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200, response.text
    costs = response.json()["costs"]
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x key and value x 4 bytes (float32)
    assert costs["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 4
    assert costs["decode_step_s"] > 0 and costs["fwd_intercept_s"] > 0
    # The suite's own stack has no admin key: its admin routes are off, for everyone.
    off = http.post("/v1/admin/measure-costs")
    assert off.status_code == 404
    assert "admin routes are off" in off.json()["error"]["message"]


# ---- benchmark endpoints off: trace replay and the simulated API ----


@pytest.fixture(scope="module")
def no_bench(stack: RunningStack) -> Iterator[str]:
    """An ingress as `build_app` makes it from a config without `enable_benchmark_endpoints`
    (serve-cpu.yaml, serve-gpu.yaml), in front of the suite's engine and tool workers (which
    have the simulated API: the suite's stack turns benchmarks on)."""
    from deployments.app import AppArgs
    from deployments.ingress import Ingress

    engine = {"model": "m", "served_model_name": MODEL, "max_model_len": 2048}
    settings = AppArgs.model_validate({"engine": engine}).ingress_settings()
    assert not settings.enable_benchmark_endpoints
    app = serve.deployment(Ingress, name="NoBenchIngress", ray_actor_options={"num_cpus": 0}).bind(
        serve.get_deployment_handle("EngineReplica", "lamps"),
        serve.get_deployment_handle("ToolWorker", "lamps"),
        settings.model_dump(mode="json"),
        None,
    )
    serve.run(app, name="nobench", route_prefix="/nobench")
    try:
        yield f"{stack.http_url}/nobench"
    finally:
        serve.delete("nobench")


@pytest.mark.engine
def test_benchmark_endpoints_are_off_by_default(no_bench: str, http: httpx.Client) -> None:
    from deployments.errors import BenchmarkEndpointsDisabledError

    with httpx.Client(base_url=no_bench, timeout=120) as client:
        refused = client.post("/v1/traces", json=TRACE)
        assert refused.status_code == 404, refused.text
        error = refused.json()["error"]
        assert error["type"] == "BenchmarkEndpointsDisabledError"
        assert "enable_benchmark_endpoints: true" in error["message"]
        assert "/v1/traces" not in client.get("/openapi.json").json()["paths"]
        simulated = {"type": "function", "function": {"name": "simulated_api"}}
        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        }
        unknown = client.post("/v1/chat/completions", json={**chat, "tools": [simulated]})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["message"] == (
            "unknown tool 'simulated_api'; this server has: calculator, http_get"
        )
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    # Through the Python handle: the typed error, its message the one HTTP gives.
    with pytest.raises(BenchmarkEndpointsDisabledError) as raised:
        serve.get_app_handle("nobench").replay.remote(TRACE).result()
    assert "trace replay is off" in raised.value.message
    # The suite's own stack turns them on (tests/conftest.py), as the bench configs do.
    assert http.post("/v1/traces", json=TRACE).status_code == 200
    assert "/v1/traces" in http.get("/openapi.json").json()["paths"]

"""Tool workers against a real local redis-server (no fakes, no mocks)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import math
import pickle
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from lamps.redis_server import RedisServer, free_port
from lamps_core.call_durations import summarize_durations
from lamps_core.costs import EngineCosts
from lamps_core.policies import make_policy
from lamps_core.policy import EngineView, PausedCall, Strategy
from lamps_core.request_meta import RequestMeta
from tool_workers import (
    Tool,
    ToolArgs,
    ToolArgumentsError,
    ToolOutput,
    ToolRegistry,
    ToolResult,
    ToolStatsStore,
    ToolWorker,
    UnknownToolError,
    default_registry,
)
from tool_workers.calculator import Calculator, evaluate
from tool_workers.http_get import HttpGet
from tool_workers.simulated_api import (
    ConstantDistribution,
    ExponentialDistribution,
    LognormalDistribution,
    NormalDistribution,
    SimulatedApi,
    UniformDistribution,
    sample_duration,
)
from tool_workers.stats import engine_api_estimates, merge_distributions
from tool_workers.tools import ToolError

# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    # Tests share the session's Redis: a fresh namespace keeps their counters apart.
    return f"test-{uuid.uuid4().hex[:12]}"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/hello":
            self._send(200, b"hello tools", "text/plain; charset=utf-8")
        elif self.path == "/big":
            self._send(200, b"x" * 20_000, "text/plain")
        elif self.path == "/utf8-cut":
            # 4095 ASCII bytes then a 2-byte character straddling the 4096-byte cap.
            self._send(200, b"a" * 4095 + "é".encode() + b"tail", "text/plain; charset=utf-8")
        elif self.path == "/redirect":
            self._redirect("http://elsewhere.example/")
        elif self.path == "/redirect-hello":
            self._redirect("/hello")  # relative: the same server
        elif self.path.startswith("/redirect-to/"):
            self._redirect(self.path.removeprefix("/redirect-to/"))
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, b"late", "text/plain")
        else:
            self._send(404, b"not here", "text/plain")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on /slow has closed its end before the answer: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _call(worker: ToolWorker, name: str, args: dict[str, Any]) -> ToolResult:
    try:
        return await worker.call(name, args)
    finally:
        await worker.close()


# --- calculator -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1234 * 5678", "7006652"),
        ("2 ** 10", "1024"),
        ("(2 + 3) * 4 ** 2", "80"),
        ("-(3 + 4) * 2", "-14"),
        ("--5", "5"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("10 // 3", "3"),
        ("-7 % 3", "2"),
        ("2 ** -2", "0.25"),
        ("0.1 + 0.2", "0.3"),
        ("12345678901234567890 * 10", "123456789012345678900"),
        ("2 ** 0.5", "1.4142135623731"),
        ("1e20", "1e+20"),
    ],
)
def test_calculator_results(expression: str, expected: str) -> None:
    out = run(Calculator()(Calculator.args_model(expression=expression)))
    assert out.output == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "not allowed"),
        ("__import__('os')", "function calls are not allowed"),
        ("x + 1", "names are not allowed: 'x'"),
        ("(1).real", "attribute access is not allowed"),
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 100000", "exponent 100000 is too large"),
        ("9 ** 9999", "result too large"),
        ("10 ** 200 * 10 ** 200", "result too large"),
        ("1.5 ** 5000", "result too large"),
        ("1e400", "result too large"),
        ("(-8) ** (1 / 3)", "not a real number"),
        ("2 ^ 3", "use ** for powers"),
        ("True + 1", "only numbers"),
        ("1j", "only numbers"),
        ("'a' * 3", "only numbers"),
        ("[1, 2]", "unsupported syntax"),
        ("1 < 2", "unsupported syntax"),
        ("(1 +", "invalid expression"),
        ("(" * 240 + "1" + ")" * 240, "nested"),
        ("1" * 501, "longer than 500"),
    ],
)
def test_calculator_refusals(expression: str, message: str) -> None:
    with pytest.raises(ToolError) as info:
        evaluate(expression)
    assert message in str(info.value)


def test_calculator_huge_power_is_refused_fast() -> None:
    start = time.monotonic()
    with pytest.raises(ToolError):
        evaluate("9 ** 9999 ** 9999")
    assert time.monotonic() - start < 0.5


# --- http_get ---------------------------------------------------------------------


def test_http_get_default_allowlist_refuses_everything(http_base: str) -> None:
    result = run(_call(ToolWorker(None), "http_get", {"url": f"{http_base}/hello"}))
    assert not result.ok
    assert result.error is not None and "no hosts are allowlisted" in result.error


LOCAL = ["127.0.0.1/32"]  # the test server's address: admitted only where a test says so


def test_http_get_allowlisted_host(http_base: str) -> None:
    worker = ToolWorker(None, http_allowlist=["127.0.0.1"], http_allow_ips=LOCAL)
    result = run(_call(worker, "http_get", {"url": f"{http_base}/hello"}))
    assert result.ok, result.error
    body = json.loads(result.output)
    assert body["status"] == 200
    assert body["body"] == "hello tools"
    assert body["truncated"] is False


def test_http_get_other_host_refused(http_base: str) -> None:
    # "localhost" resolves to the same server, but only the literal allowlisted name counts.
    worker = ToolWorker(None, http_allowlist=["127.0.0.1"])
    url = http_base.replace("127.0.0.1", "localhost") + "/hello"
    result = run(_call(worker, "http_get", {"url": url}))
    assert not result.ok
    assert result.error is not None and "'localhost' is not allowlisted" in result.error


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_http_get_refuses_loopback_even_when_allowlisted(http_base: str, name: str) -> None:
    """An allowlisted name is not enough: it resolves to loopback, refused without an IP
    allowlist that admits it (the server answers; the refusal is ours)."""
    url = f"{http_base.replace('127.0.0.1', name)}/hello"
    refused = run(_call(ToolWorker(None, http_allowlist=[name]), "http_get", {"url": url}))
    assert not refused.ok
    assert refused.error is not None and "loopback address 127.0.0.1: refused" in refused.error
    admitted = ToolWorker(None, http_allowlist=[name], http_allow_ips=LOCAL)
    allowed = run(_call(admitted, "http_get", {"url": url}))
    assert allowed.ok, allowed.error
    assert json.loads(allowed.output)["body"] == "hello tools"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: the IPv4 rules apply
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("240.0.0.1", "reserved"),
    ],
)
def test_http_get_address_refusals(address: str, kind: str) -> None:
    ip = ipaddress.ip_address(address)
    refusal = HttpGet(["x"]).address_refusal(ip)
    assert refusal is not None and refusal.startswith(kind)
    assert HttpGet(["x"], allow_ips=["0.0.0.0/0", "::/0"]).address_refusal(ip) is None
    assert HttpGet(["x"]).address_refusal(ipaddress.ip_address("93.184.215.14")) is None


def test_http_get_ip_allowlist_must_be_cidrs() -> None:
    with pytest.raises(ValueError, match="http_allow_ips"):
        HttpGet(["x"], allow_ips=["10.0.0.5/8"])  # host bits set: a typo, not 10/8


def test_http_get_caps_body_and_reports_status(http_base: str) -> None:
    tool = HttpGet(["127.0.0.1"], allow_ips=LOCAL)
    big = json.loads(run(tool(tool.args_model(url=f"{http_base}/big"))).output)
    assert big["truncated"] is True
    assert big["body"] == "x" * 4096
    missing = json.loads(run(tool(tool.args_model(url=f"{http_base}/nope"))).output)
    assert missing["status"] == 404 and missing["body"] == "not here"
    cut = json.loads(run(tool(tool.args_model(url=f"{http_base}/utf8-cut"))).output)
    assert cut["body"] == "a" * 4095  # the split character is dropped, not garbled


def test_http_get_checks_every_redirect_hop(http_base: str) -> None:
    # 127.0.0.2 is allowlisted by name but, as a loopback address outside the IP allowlist,
    # refused: reached by a redirect from an allowed server, it is refused all the same.
    tool = HttpGet(["127.0.0.1", "127.0.0.2"], allow_ips=LOCAL)
    port = http_base.rsplit(":", 1)[1]

    def fetch(path: str) -> str:
        return run(tool(tool.args_model(url=f"{http_base}{path}"))).output

    assert json.loads(fetch("/redirect-hello"))["body"] == "hello tools"  # an allowed hop
    with pytest.raises(ToolError, match=r"loopback address 127\.0\.0\.2: refused"):
        fetch(f"/redirect-to/http://127.0.0.2:{port}/hello")
    with pytest.raises(ToolError, match=r"'elsewhere\.example' is not allowlisted"):
        fetch("/redirect")
    with pytest.raises(ToolError, match="not http"):
        fetch("/redirect-to/file:///etc/passwd")
    with pytest.raises(ToolError, match="more than 5 redirects"):
        fetch("/redirect-to/" + "/redirect-to" * 6 + "/hello")


def test_http_get_time_is_capped(http_base: str) -> None:
    tool = HttpGet(["127.0.0.1"], allow_ips=LOCAL)
    tool.set_timeout(1.0)
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"timed out after 0\.8 s"):
        run(tool(tool.args_model(url=f"{http_base}/slow")))
    assert time.monotonic() - started < 2


def test_http_get_connection_error_is_a_failed_result() -> None:
    worker = ToolWorker(None, http_allowlist=["127.0.0.1"], http_allow_ips=LOCAL)
    result = run(_call(worker, "http_get", {"url": f"http://127.0.0.1:{free_port()}/"}))
    assert not result.ok
    assert result.error is not None and "request failed" in result.error


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http://"])
def test_http_get_rejects_non_http_urls(url: str) -> None:
    with pytest.raises(ToolArgumentsError):
        default_registry(["127.0.0.1"]).validate_arguments("http_get", {"url": url})


# --- simulated_api ----------------------------------------------------------------


def test_simulated_api_honours_duration_and_token_count() -> None:
    worker = ToolWorker(None)
    start = time.monotonic()
    result = run(_call(worker, "simulated_api", {"duration_s": 0.3, "return_tokens": 25}))
    elapsed = time.monotonic() - start
    assert result.ok
    assert 0.3 <= elapsed < 0.35
    assert 0.3 <= result.duration_s < 0.35
    assert result.num_tokens == 25
    assert len(result.output.split()) == 25


def test_simulated_api_seeded_distribution_is_reproducible() -> None:
    tool = SimulatedApi()
    args = {"distribution": {"name": "exponential", "mean": 3.0}, "seed": 42}
    first = tool.draw_duration(tool.parse_arguments(args))
    assert first == tool.draw_duration(tool.parse_arguments(args))
    assert first != tool.draw_duration(tool.parse_arguments({**args, "seed": 43}))


@pytest.mark.parametrize(
    ("distribution", "mean", "std"),
    [
        (ConstantDistribution(name="constant", mean=2.5), 2.5, 0.0),
        (ExponentialDistribution(name="exponential", mean=2.0), 2.0, 2.0),
        (NormalDistribution(name="normal", mean=5.0, std=1.0), 5.0, 1.0),
        (NormalDistribution(name="normal", mean=5.0, var=4.0), 5.0, 2.0),
        (
            UniformDistribution(name="uniform", low=1.0, high=3.0),
            2.0,
            2.0 / math.sqrt(12),
        ),
        (UniformDistribution(name="uniform", mean=4.0, std=1.0), 4.0, 1.0),
        (LognormalDistribution(name="lognormal", mean=3.0, std=1.5), 3.0, 1.5),
    ],
)
def test_distribution_sampling_statistics(distribution: Any, mean: float, std: float) -> None:
    rng = random.Random(1234)
    draws = [sample_duration(distribution, rng, 600.0) for _ in range(40_000)]
    assert statistics.fmean(draws) == pytest.approx(mean, rel=0.02)
    assert statistics.pstdev(draws) == pytest.approx(std, rel=0.03, abs=1e-9)
    assert min(draws) >= 0.0


def test_distribution_sampling_truncates_at_zero_and_cap() -> None:
    rng = random.Random(7)
    normal = NormalDistribution(name="normal", mean=0.5, std=2.0)
    draws = [sample_duration(normal, rng, 1.0) for _ in range(5_000)]
    assert min(draws) == 0.0 and max(draws) == 1.0
    assert sum(d == 0.0 for d in draws) > 1000  # about 40 % of draws are negative


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"duration_s": -1}, "duration_s: Input should be greater than or equal to 0"),
        ({"duration_s": float("nan")}, "duration_s: Input should be a finite number"),
        ({"duration_s": 10.5}, "duration_s: Input should be less than or equal to 10"),
        (
            {"duration_s": 1, "return_tokens": -1},
            "return_tokens: Input should be greater",
        ),
        (
            {"duration_s": 1, "return_tokens": 10**9},
            "return_tokens: Input should be less",
        ),
        ({}, "give exactly one of duration_s or distribution"),
        (
            {"duration_s": 1, "distribution": {"name": "constant", "mean": 1}},
            "give exactly one of duration_s or distribution",
        ),
        (
            {"distribution": {"name": "normal", "mean": 1}},
            "give exactly one of std or var",
        ),
        (
            {"distribution": {"name": "exponential", "mean": 50}},
            "exceeds the cap of 10 s",
        ),
        (
            {"distribution": {"name": "zipf", "mean": 1}},
            "does not match any of the expected tags",
        ),
        ({"duration_s": 1, "speed": "fast"}, "speed: Extra inputs are not permitted"),
    ],
)
def test_simulated_api_invalid_arguments_raise(args: dict[str, Any], message: str) -> None:
    worker = ToolWorker(None, max_simulated_duration_s=10)
    with pytest.raises(ToolArgumentsError) as info:
        run(_call(worker, "simulated_api", args))
    assert message in str(info.value)
    assert info.value.tool == "simulated_api"


# --- registry, schemas, errors ----------------------------------------------------


def test_schemas_are_openai_tools_without_refs() -> None:
    schemas = ToolWorker(None, max_simulated_duration_s=42).schemas()
    assert [s["function"]["name"] for s in schemas] == [
        "calculator",
        "http_get",
        "simulated_api",
    ]
    for entry in schemas:
        assert entry["type"] == "function"
        params = entry["function"]["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert entry["function"]["description"]
        assert "$ref" not in json.dumps(params) and "$defs" not in params
    sim = schemas[2]["function"]["parameters"]["properties"]
    assert {"maximum": 42, "minimum": 0, "type": "number"} in sim["duration_s"]["anyOf"]


def test_unknown_tool_lists_known_names() -> None:
    with pytest.raises(UnknownToolError) as info:
        run(_call(ToolWorker(None), "rm_rf", {}))
    assert "calculator, http_get, simulated_api" in str(info.value)


def test_arguments_may_be_json_text_and_errors_survive_pickling() -> None:
    registry = default_registry()
    args = registry.validate_arguments("calculator", '{"expression": "1 + 1"}')
    assert args.model_dump() == {"expression": "1 + 1"}
    with pytest.raises(ToolArgumentsError) as bad_args:
        registry.validate_arguments("calculator", "{not json")
    with pytest.raises(UnknownToolError) as unknown:
        registry.get("nope")
    # Ray ships exceptions between processes pickled.
    for exc in (bad_args.value, unknown.value):
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc) and str(clone) == str(exc)


# --- worker failures --------------------------------------------------------------


class _NoArgs(ToolArgs):
    pass


class _Sleepy(Tool[_NoArgs]):
    name: ClassVar[str] = "sleepy"
    description: ClassVar[str] = "sleeps too long"
    args_model = _NoArgs
    timeout_s = 0.05

    async def __call__(self, args: _NoArgs) -> ToolOutput:
        await asyncio.sleep(5)
        return ToolOutput(output="never")


class _Buggy(Tool[_NoArgs]):
    name: ClassVar[str] = "buggy"
    description: ClassVar[str] = "has a bug"
    args_model = _NoArgs

    async def __call__(self, args: _NoArgs) -> ToolOutput:
        raise KeyError("oops")


class _Garbage(Tool[_NoArgs]):
    name: ClassVar[str] = "garbage"
    description: ClassVar[str] = "returns something that is not a ToolOutput"
    args_model = _NoArgs

    async def __call__(self, args: _NoArgs) -> ToolOutput:
        return {"output": 42}  # type: ignore[return-value]


def test_garbage_is_a_failed_result_and_counted(redis_url: str, namespace: str) -> None:
    async def scenario() -> tuple[ToolResult, dict[str, Any]]:
        worker = ToolWorker(redis_url, namespace=namespace, registry=ToolRegistry([_Garbage()]))
        try:
            return await worker.call("garbage", {}), await worker.summary()
        finally:
            await worker.close()

    result, summary = run(scenario())
    assert not result.ok and result.error == "the tool returned an invalid result (dict)"
    assert summary["garbage"].calls_failed == 1 and summary["garbage"].calls_ok == 0


def test_configured_timeouts_apply_per_tool() -> None:
    """A default for every tool, per-tool overrides over it; the worker enforces them."""
    worker = ToolWorker(None, tool_timeout_s=7.0, tool_timeouts_s={"simulated_api": 0.2})
    assert worker.timeouts() == {"calculator": 7.0, "http_get": 7.0, "simulated_api": 0.2}
    assert ToolWorker(None, max_simulated_duration_s=10).timeouts() == {
        "calculator": 5.0,  # the tools' own limits when none is configured
        "http_get": 15.0,
        "simulated_api": 40.0,
    }
    slow = run(_call(worker, "simulated_api", {"duration_s": 2.0}))
    assert not slow.ok and slow.error == "tool timed out after 0.2 s"
    assert slow.duration_s < 1.0
    with pytest.raises(ValueError, match="unknown tools \\['calculater'\\]"):
        ToolWorker(None, tool_timeouts_s={"calculater": 1.0})
    with pytest.raises(ValueError, match="positive"):
        ToolWorker(None, tool_timeout_s=0.0)


def test_timeouts_and_bugs_become_failed_results(redis_url: str, namespace: str) -> None:
    async def scenario() -> tuple[ToolResult, ToolResult, dict[str, Any]]:
        worker = ToolWorker(
            redis_url, namespace=namespace, registry=ToolRegistry([_Sleepy(), _Buggy()])
        )
        try:
            slow = await worker.call("sleepy", {})
            bug = await worker.call("buggy", {})
            return slow, bug, await worker.summary()
        finally:
            await worker.close()

    slow, bug, summary = run(scenario())
    assert not slow.ok and slow.error == "tool timed out after 0.05 s"
    assert 0.05 <= slow.duration_s < 0.5
    assert not bug.ok and bug.error == "internal tool error: KeyError: 'oops'"
    assert summary["sleepy"].calls_failed == 1 and summary["buggy"].calls_failed == 1


# --- stats in Redis ---------------------------------------------------------------


def test_worker_records_calls_and_estimates(redis_url: str, namespace: str) -> None:
    durations = [0.02, 0.04, 0.06, 0.08, 0.10]

    async def scenario() -> tuple[Any, Any, list[ToolResult]]:
        worker = ToolWorker(redis_url, namespace=namespace)
        try:
            results = [await worker.call("simulated_api", {"duration_s": d}) for d in durations]
            results.append(await worker.call("calculator", {"expression": "1/0"}))
            return await worker.estimates(), await worker.summary(), results
        finally:
            await worker.close()

    estimates, summary, results = run(scenario())
    sim = estimates["simulated_api"]
    assert sim.count == 5
    assert sim.mean_s == pytest.approx(statistics.fmean(r.duration_s for r in results[:5]))
    assert sim.mean_s == pytest.approx(0.06, abs=0.02)
    assert sim.last_s == pytest.approx(results[4].duration_s)
    assert "http_get" not in estimates  # no records, no estimate

    failed = results[5]
    assert not failed.ok and failed.error == "division by zero"
    assert summary["calculator"].calls_failed == 1 and summary["calculator"].calls_ok == 0
    assert summary["simulated_api"].calls_ok == 5
    assert summary["simulated_api"].duration_s_total == pytest.approx(
        sum(r.duration_s for r in results[:5])
    )


def _result(tool: str, duration_s: float, ok: bool = True) -> ToolResult:
    return ToolResult(tool=tool, ok=ok, duration_s=duration_s, started_at=datetime.now(UTC))


def test_store_percentiles_and_sample_cap(redis_url: str, namespace: str) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        store = ToolStatsStore(redis_url, namespace=namespace, max_samples=10)
        try:
            for i in range(1, 21):  # 1..20 s; only the last 10 (11..20) are kept
                assert await store.record(_result("t", float(i), ok=i % 4 != 0))
            return (
                await store.estimate("t"),
                await store.summary(),
                await store.estimate("none"),
            )
        finally:
            await store.close()

    est, summary, empty = run(scenario())
    assert est.count == 10
    assert est.mean_s == pytest.approx(15.5)
    assert est.p50_s == pytest.approx(15.5)
    assert est.p90_s == pytest.approx(19.1)
    assert est.last_s == 20.0
    # Counters are not capped: they cover every call ever recorded.
    assert summary["t"].calls_ok == 15 and summary["t"].calls_failed == 5
    assert summary["t"].duration_s_total == pytest.approx(210.0)
    assert empty.count == 0 and empty.mean_s is None and empty.p90_s is None


def test_redis_outage_does_not_fail_calls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-outage", free_port()).start()

    async def scenario() -> list[Any]:
        worker = ToolWorker(server.url, namespace="outage")
        try:
            before = await worker.call("calculator", {"expression": "2 + 2"})
            server.stop()
            during = await worker.call("calculator", {"expression": "3 + 3"})
            dropped = worker.dropped_records
            server.start()  # same port and files: the earlier record is back, new ones flow
            after = await worker.call("calculator", {"expression": "4 + 4"})
            return [
                before,
                during,
                dropped,
                after,
                worker.dropped_records,
                await worker.estimates(),
            ]
        finally:
            await worker.close()

    try:
        start = time.monotonic()
        before, during, dropped, after, dropped_end, estimates = run(scenario())
    finally:
        server.stop()
    assert before.ok and during.ok and after.ok
    assert during.output == "6"
    assert dropped == 1 and dropped_end == 1
    assert estimates["calculator"].count == 2  # before the outage (persisted) and after it
    assert time.monotonic() - start < 5  # the outage cost no long retries


def test_worker_without_redis_runs_tools() -> None:
    async def scenario() -> tuple[ToolResult, Any]:
        worker = ToolWorker(None)
        return await worker.call("calculator", {"expression": "6 * 7"}), await worker.estimates()

    result, estimates = run(scenario())
    assert result.ok and result.output == "42" and estimates == {}


def test_a_bimodal_tool_s_records_reach_the_lamps_review(redis_url: str, namespace: str) -> None:
    """Recorded durations of a tool that usually answers in 10 ms and once in 16 calls takes 4 s
    become the distribution the engine is sent; the LAMPS review of a call preserved at its pause
    then prices it, once past the fast mode, by the 4 s mode (a swap), not by the mean."""
    recorded = ([4.0] + [0.01] * 15) * 4  # oldest first; the newest call was a fast one

    async def scenario() -> dict[str, Any]:
        worker = ToolWorker(redis_url, namespace=namespace)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert worker.stats is not None
            for seconds in recorded:
                assert await worker.stats.record(_result("qa", seconds))  # a simulated API type
            # A name outside the server's registry and simulated types, and corrupted records.
            assert await worker.stats.record(_result("made_up_by_someone", 1.0))
            await raw.lpush(f"{namespace}:tool:qa:durations", "nan", "-3", "not a number")
            return await worker.estimates()
        finally:
            await raw.aclose()
            await worker.close()

    estimates = run(scenario())
    assert "made_up_by_someone" not in estimates  # never sent to the engine
    qa = estimates["qa"]
    assert qa.count == len(recorded)  # the corrupted entries are skipped
    newest_first = recorded[::-1]
    assert qa.distribution == summarize_durations(newest_first, timeout_s=630.0)
    assert qa.distribution is not None and qa.distribution.timeout_s == 630.0  # simulated_api's

    # What the engine replica attaches to every request, as the engine core validates it.
    sent = engine_api_estimates(
        {name: e.mean_s for name, e in estimates.items() if e.mean_s is not None},
        merge_distributions({}, estimates),
    )
    call_meta = RequestMeta(
        request_id="q", arrival_time=0.0, ends_in_api_call=True, api_type="qa", api_estimates=sent
    )
    in_engine = RequestMeta.from_extra_args(call_meta.to_extra_args())
    assert in_engine is not None and in_engine.api_estimates is not None
    assert in_engine.api_estimates["qa"] == qa.distribution

    costs = EngineCosts(
        kv_bytes_per_token=1000,
        fwd_intercept_s=0.01,
        fwd_slope_s=0.001,
        swap_slope_s=0.0001,
        decode_step_s=0.01,
    )
    policy = make_policy("lamps", costs=costs, predictor="estimates", keep=False)
    policy.update_api_estimates(in_engine.api_estimates)
    mean_s = qa.distribution.mean_s
    assert mean_s < 0.28  # under the break-even of W_P = 400 000·T and W_S = 112 000: preserved
    view = EngineView(
        now=100.0, running_tokens=1000, free_blocks=0, total_blocks=1000, block_size=16
    )
    call = PausedCall("q-s0", 400, 100.0, Strategy.PRESERVE, in_engine)
    assert policy.strategy_for_call(call, view) is Strategy.PRESERVE
    later = dataclasses.replace(view, now=100.1)  # past the 10 ms mode
    remaining = policy.predictor.remaining_call_s(in_engine, 0.1)
    assert remaining is not None and remaining > 3.0  # the 4 s mode, not the mean
    assert remaining == pytest.approx(qa.distribution.expected_remaining_s(0.1))
    assert policy.review_paused([call], later, 0) == [(call, Strategy.SWAP)]


# --- benchmark tools off ----------------------------------------------------------------


def test_a_worker_without_the_simulated_api(redis_url: str, namespace: str) -> None:
    """What a deployment runs unless `enable_benchmark_endpoints` is on: the simulated API is
    no tool (not offered, not callable), and records of simulated API types a benchmark left in
    a shared Redis never reach the scheduler from it."""
    worker = ToolWorker(redis_url, namespace=namespace, simulated_api=False)

    async def scenario() -> dict[str, Any]:
        try:
            assert worker.stats is not None
            assert await worker.stats.record(_result("qa", 2.0))  # a benchmark's record
            with pytest.raises(UnknownToolError, match="simulated_api"):
                await worker.call("simulated_api", {"duration_s": 0.0})
            assert (await worker.call("calculator", {"expression": "1 + 1"})).ok
            return await worker.estimates()
        finally:
            await worker.close()

    assert [s["function"]["name"] for s in worker.schemas()] == ["calculator", "http_get"]
    assert worker.recorded_names() == {"calculator", "http_get"}
    assert "simulated_api" not in worker.timeouts_by_recorded_name()
    assert set(run(scenario())) == {"calculator"}
    # A config that names it anyway fails at deploy, saying why.
    with pytest.raises(ValueError, match="only with enable_benchmark_endpoints"):
        default_registry(simulated_api=False, tool_timeouts_s={"simulated_api": 1.0})
    # On (the bench's in-process engine, tests): unchanged.
    assert "qa" in ToolWorker(None).recorded_names()


# --- Redis loading its data after a restart ---------------------------------------------


def test_stats_ride_out_a_redis_loading_its_data(tmp_path: Path) -> None:
    """A restarted Redis answers LOADING until it has read its append-only file back: the
    stores wait that out (a short, bounded backoff) instead of reporting an outage; past their
    wait they report one (a dropped record, StatsUnavailableError), while Redis still loads."""
    from deployments.metrics import EngineStatsBoard
    from tests.test_redis_server import SLOW_LOADING, fill_for_slow_loading, is_loading
    from tool_workers import StatsUnavailableError

    port = free_port()
    with RedisServer(tmp_path, port) as server:

        async def before() -> None:
            store = ToolStatsStore(server.url)
            try:
                for seconds in (0.5, 0.7):
                    assert await store.record(_result("calculator", seconds))
            finally:
                await store.close()

        run(before())
        fill_for_slow_loading(server)

    slow = RedisServer(tmp_path, port, options=SLOW_LOADING).start(wait_loaded=False)

    async def scenario() -> tuple[bool, Any, Any, Any, bool]:
        impatient = ToolStatsStore(slow.url, loading_wait_s=0.1)
        patient = ToolStatsStore(slow.url, loading_wait_s=60)
        board = EngineStatsBoard(slow.url, loading_wait_s=60)
        try:
            assert is_loading(slow), "the slowed-down load was over before it could be seen"
            with pytest.raises(StatsUnavailableError, match="loading"):
                await impatient.estimate("calculator")
            recorded = await impatient.record(_result("calculator", 0.9))  # dropped, not raised
            # It gave up within its wait, not at the end of the load: bounded.
            still_loading = is_loading(slow)
            # Both started while Redis loads (no outage reported), answered once it has loaded.
            estimate, engines, summary = await asyncio.gather(
                patient.estimate("calculator"), board.collect(), patient.summary()
            )
            assert await patient.record(_result("calculator", 1.1))
            return recorded, estimate, engines, summary, still_loading
        finally:
            await impatient.close()
            await patient.close()
            await board._redis.aclose()

    try:
        recorded, estimate, engines, summary, still_loading = run(scenario())
    finally:
        slow.stop()
    assert not recorded and still_loading
    assert estimate.count == 2  # the records from before the restart; the dropped one is not
    assert estimate.last_s == 0.7
    assert engines == {}  # nothing published: read, not failed
    assert summary["calculator"].calls_ok == 2

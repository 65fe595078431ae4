"""Autoscaling engine replicas on memory, on real Ray with real engines: one application
("autoscale", under /autoscale) whose EngineReplica deployment autoscales with
`deployments.autoscaling.MemoryPressurePolicy` (Serve 2.60's custom `AutoscalingPolicy`), from
one replica to at most two, on the `kv_pressure` each replica reports
(`EngineReplica.record_autoscaling_stats`).

The load is made of a few requests that hold a lot of KV cache: trace requests whose context
(1900 tokens of a 4096-token cache) stays on the device through a 6 s tool call (the `preserve`
policy variant). At most two are in flight at once, half of the deployment's
`target_ongoing_requests`: by ongoing requests (Serve's default policy) one replica is plenty;
by memory, two such requests fill 93 % of a replica's cache.

It shares the suite's Ray and Serve (the `stack` fixture), adding its application next to the
suite's as tests/test_fleet.py does, and deletes it at the end. Both replicas run on the suite's
node: where replicas run is not what is tested here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve.context import _get_global_client

from deployments.autoscaling import KV_PRESSURE
from lamps.local_stack import RunningStack
from lamps.model import PreparedModels
from tests.engine_harness import wait_until
from tests.test_fleet import deploy_next_to_the_suite, post, preserving_engine, trace

pytestmark = pytest.mark.engine

APP = "autoscale"
TARGET_PRESSURE = 0.7
# Serve's timing, small so that the test takes seconds: each replica records its pressure every
# 0.4 s (a fifth of the look-back) and pushes it to the controller every 0.5 s (the deprecated
# `metrics_interval_s` still sets the push period in Ray 2.60; its default, 10 s, would add up to
# 10 s to each decision); the controller averages the last 2 s; it scales up after 1 s of wanting
# to, down after 3 s.
METRICS_INTERVAL_S = 0.5
LOOK_BACK_S = 2.0
UPSCALE_DELAY_S = 1.0
DOWNSCALE_DELAY_S = 3.0
# Serve's own signal: what the default policy would aim at. Never more than HOLDERS requests are
# in flight, so by this count one replica is enough.
TARGET_ONGOING_REQUESTS = 4
HOLDERS = 2
# 1900 tokens held of the tiny engine's 4096 (tests/engine_harness.py): one request is a pressure
# of about 0.47 (under the target: one replica), two about 0.93 (over it: two replicas).
HELD_TOKENS = 1900
CALL_S = 6.0


def autoscale_app(model: Path) -> dict[str, Any]:
    engine = preserving_engine(model)
    return {
        "name": APP,
        "route_prefix": f"/{APP}",
        "import_path": "deployments.app:build_app",
        "args": {"engine": engine, "enable_benchmark_endpoints": True},  # traces
        "deployments": [
            {
                "name": "EngineReplica",
                # As cluster/serve-gpu.yaml, with the timing made small.
                "autoscaling_config": {
                    "min_replicas": 1,
                    "initial_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
                    "metrics_interval_s": METRICS_INTERVAL_S,
                    "look_back_period_s": LOOK_BACK_S,
                    "upscale_delay_s": UPSCALE_DELAY_S,
                    "downscale_delay_s": DOWNSCALE_DELAY_S,
                    "policy": {
                        "policy_function": "deployments.autoscaling.MemoryPressurePolicy",
                        "policy_kwargs": {"target_pressure": TARGET_PRESSURE},
                    },
                },
                # Ray's CPUs are the suite's engine's; these replicas are tiny.
                "ray_actor_options": {"num_cpus": 0.25},
                # The replica removed on scale-down has nothing left to finish.
                "graceful_shutdown_timeout_s": 2,
            },
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}},
            {"name": "ToolWorker", "ray_actor_options": {"num_cpus": 0}},
        ],
    }


# ---- what the controller decided, over time ------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic
    phase: str
    target: int  # the controller's target number of replicas (its autoscaling decision)
    running: int  # replicas RUNNING (started, serving)


def replica_counts() -> tuple[int, int]:
    details = _get_global_client().get_serve_details()
    deployment = details["applications"][APP]["deployments"]["EngineReplica"]
    running = sum(1 for r in deployment["replicas"] if r["state"] == "RUNNING")
    return int(deployment["target_num_replicas"]), running


@dataclass
class Timeline:
    """The deployment's replica counts, sampled every 0.2 s in the background, each sample
    labelled with the phase of the test it was taken in."""

    phase: str = "idle"
    samples: list[Sample] = field(default_factory=list)
    error: Exception | None = None  # why sampling stopped early: the test fails with it
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                target, running = replica_counts()
                self.samples.append(Sample(time.monotonic(), self.phase, target, running))
                self._stop.wait(0.2)
        except Exception as exc:  # a thread's exception is otherwise lost
            self.error = exc

    def stop(self) -> None:
        self._stop.set()

    def of(self, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase]

    def latest(self) -> Sample:
        if self.error is not None:
            raise AssertionError("sampling the replica counts failed") from self.error
        return self.samples[-1]


def pressures() -> list[float]:
    """Each live replica's own `kv_pressure`, asked of it directly (what it reports to Serve)."""
    handle = serve.get_deployment_handle("EngineReplica", APP)
    stats = handle.broadcast("record_autoscaling_stats").results(timeout_s=20)
    return sorted(float(s[KV_PRESSURE]) for s in stats)


# ---- the application ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def autoscale_url(stack: RunningStack, prepared_models: PreparedModels) -> Iterator[str]:
    started = time.monotonic()
    deploy_next_to_the_suite(autoscale_app(prepared_models.tiny_dummy))
    try:

        def running() -> bool:
            status = serve.status().applications.get(APP)
            if status is not None and status.status == "DEPLOY_FAILED":
                pytest.fail(f"the autoscale application failed to deploy: {status.message}")
            return status is not None and status.status == "RUNNING"

        wait_until(running, 300, "the autoscale application is not running")
        print(f"\nautoscale: 1 replica running after {time.monotonic() - started:.0f} s")
        yield f"{stack.http_url}/{APP}"
    finally:
        stopping = time.monotonic()
        serve.delete(APP)
        print(f"\nautoscale deleted in {time.monotonic() - stopping:.0f} s")


def held_request(url: str) -> httpx.Response:
    return post(url, "/v1/traces", trace(HELD_TOKENS, api_time=CALL_S))


def check_completed(response: httpx.Response) -> None:
    """200, both segments ran, the call succeeded, and the second segment found its first
    context in the cache (held through the call): all of it but the block vLLM recomputes (the
    last token of a prompt is always computed; only whole 16-token blocks are reused)."""
    assert response.status_code == 200, response.text
    first, second = response.json()["segments"]
    assert first["api_ok"] is True, first
    assert second["cached_tokens"] >= HELD_TOKENS - 2 * 16, second


# ---- the test -----------------------------------------------------------------------------------


def test_memory_pressure_adds_a_replica_and_its_end_removes_it(autoscale_url: str) -> None:
    """One replica while idle and while one held request (pressure ~0.47, under the 0.7
    target) runs; two requests held at once (~0.93) on one replica, two ongoing requests where
    Serve's own target is four, bring a second replica, started and running while the
    pressure lasts; when the requests end, the deployment goes back to one replica. Every
    request completes."""
    started = time.monotonic()
    timeline = Timeline()
    sampler = threading.Thread(target=timeline.run, daemon=True)
    sampler.start()
    in_flight = 0
    most_in_flight = 0
    lock = threading.Lock()
    stop_holding = threading.Event()

    def hold() -> list[httpx.Response]:
        """Send held requests back to back until told to stop: pressure without pause."""
        nonlocal in_flight, most_in_flight
        done: list[httpx.Response] = []
        while not stop_holding.is_set():
            with lock:
                in_flight += 1
                most_in_flight = max(most_in_flight, in_flight)
            try:
                done.append(held_request(autoscale_url))
            finally:
                with lock:
                    in_flight -= 1
        return done

    try:
        # Idle, then one held request: longer than the look-back plus the upscale delay, so a
        # policy that scaled on any held KV (or on one ongoing request) would have scaled.
        time.sleep(LOOK_BACK_S)
        timeline.phase = "light"
        with ThreadPoolExecutor(1) as pool:
            light = pool.submit(held_request, autoscale_url)
            wait_until(lambda: max(pressures()) > 0.3, 20, "the held request holds no KV")
            light_pressure = max(pressures())
            check_completed(light.result())
        time.sleep(LOOK_BACK_S)  # its figures age out of the window before the next phase

        timeline.phase = "pressure"
        pressure_from = time.monotonic()
        with ThreadPoolExecutor(HOLDERS) as pool:
            holders = [pool.submit(hold) for _ in range(HOLDERS)]
            try:
                wait_until(lambda: max(pressures()) > TARGET_PRESSURE, 20, "no pressure")
                heavy_pressure = max(pressures())

                def scaled_up() -> bool:
                    for h in holders:
                        if h.done():  # a holder that failed: its error, not a timeout
                            h.result()
                    return timeline.latest().running == 2

                added_after = wait_until(scaled_up, 120, "no second replica under pressure")
                stop_at = time.monotonic()
            finally:
                # No new requests: each holder finishes the one it has. On a failure too: the
                # pool's exit waits for the holders, which would otherwise never stop.
                stop_holding.set()
            responses = [r for h in holders for r in h.result()]
        timeline.phase = "after"
        removed_after = wait_until(
            lambda: (timeline.latest().target, timeline.latest().running) == (1, 1),
            60,
            "the second replica was not removed after the pressure",
        )
    finally:
        stop_holding.set()
        timeline.stop()
        sampler.join(timeout=10)

    during = timeline.of("pressure")
    first_two = next((s.at for s in during if s.target == 2), None)
    decided = f"{first_two - pressure_from:.1f} s" if first_two is not None else "never"
    print(
        f"\nautoscale: pressure {light_pressure:.2f} with one held request, "
        f"{heavy_pressure:.2f} with two; target 2 after {decided}, second replica running "
        f"{added_after:.1f} s after the pressure began ({len(responses)} held requests, at "
        f"most {most_in_flight} at once), "
        f"removed {removed_after:.1f} s after it ended; {time.monotonic() - started:.0f} s in all"
    )
    # The signal: under the target with one held request, over it with two.
    assert light_pressure < TARGET_PRESSURE < heavy_pressure
    # Serve's own signal stayed low: never more requests at once than half its target.
    assert most_in_flight <= HOLDERS < TARGET_ONGOING_REQUESTS
    for response in responses:
        check_completed(response)

    before = timeline.of("idle") + timeline.of("light")
    assert before, "no sample before the pressure"
    assert {(s.target, s.running) for s in before} == {(1, 1)}, before
    assert first_two is not None, "the target never went to 2 under pressure"
    assert any(s.running == 2 for s in during)  # started while the pressure lasted
    assert all(s.target <= 2 and s.running <= 2 for s in timeline.samples)  # max_replicas
    # Once decided, the target holds while the pressure is kept up (no flapping). After
    # `stop_at` the held requests end one by one, and the target may fall before the last does.
    assert all(s.target == 2 for s in during if first_two <= s.at <= stop_at)
    assert timeline.latest().phase == "after"
    assert (timeline.latest().target, timeline.latest().running) == (1, 1)

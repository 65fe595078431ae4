"""What the fleet router costs per request: `MemoryAwareRouter.choose_replicas` (Serve's real
RequestRouter base class) over N replicas whose routing stats look like
`EngineReplica.record_routing_stats`, for trace requests (a script of 1-6 calls) and chat turns
(a conversation of 2-20 messages; its session key computed beforehand, as the ingress does).
Reported: microseconds per request, the median of several runs, in wall time and in the thread's
CPU time. Target: under 1 ms with 8 replicas (issue 10). No Ray cluster: the router runs in
this process, as in a Serve proxy.

Run: `python -m bench.placement_cost [--replicas 8] [--requests 2000] [--runs 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.router import MemoryAwareRouter, conversation_key
from lamps_core.trace import TraceScript
from lamps_vllm.chat_session import ChatPlan

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="lamps")
COSTS = {
    "kv_bytes_per_token": 131072,  # Llama-3-8B, bf16
    "fwd_intercept_s": 0.01,
    "fwd_slope_s": 6e-5,
    "swap_slope_s": 2.5e-6,
    "decode_step_s": 0.012,
}
CAPACITY = 16 << 30


class StatsReplica:
    """What the router reads of a replica: its id and its last routing stats."""

    def __init__(self, index: int, rng: random.Random) -> None:
        self.replica_id = ReplicaID(unique_id=f"replica-{index}", deployment_id=DEPLOYMENT)
        in_use = rng.uniform(0.1, 0.9) * CAPACITY
        self.routing_stats: dict[str, Any] = {
            "stats_time": time.time(),
            "kv_capacity_bytes": CAPACITY,
            "kv_in_use_bytes": in_use,
            "kv_paused_bytes": in_use / 3,
            "committed_memory_time": in_use * rng.uniform(2, 10),
            "costs": COSTS,
            "healthy": True,
        }


def trace_request(n: int, rng: random.Random) -> PendingRequest:
    context, calls, segments = rng.randint(100, 2000), rng.randint(1, 6), []
    for index in range(calls + 1):
        completion = rng.randint(10, 500)
        segment: dict[str, Any] = {"prompt_tokens": context, "completion_tokens": completion}
        context += completion
        if index < calls:
            segment |= {"api_time": rng.uniform(0.1, 20), "api_token_length": 20}
            context += 20
        segments.append(segment)
    script = TraceScript.model_validate({"segments": segments})
    return pending_request("replay", [f"r{n}", script, 0.0], n)


def chat_request(n: int, rng: random.Random) -> PendingRequest:
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    for turn in range(rng.randint(1, 10)):
        messages.append({"role": "user", "content": f"question {n}.{turn} " * 30})
        messages.append({"role": "assistant", "content": "an answer " * 40})
    plan = ChatPlan(
        request_id=f"c{n}",
        messages=messages[:-1],
        tools=[],
        tool_choice="auto",
        max_tokens=256,
        max_tool_calls=0,
    )
    return pending_request("chat", [plan], n, conversation_key(plan.messages) or "")


def pending_request(method: str, args: list[Any], n: int, session_id: str = "") -> PendingRequest:
    """A request as Serve's router sees it (tests/test_router.py builds its own with this);
    `session_id` is what the ingress sets for a chat turn (its conversation's key)."""
    metadata = RequestMetadata(
        request_id=f"q{n}", internal_request_id=f"i{n}", call_method=method, session_id=session_id
    )
    return PendingRequest(args=args, kwargs={}, metadata=metadata)


async def one_run(replicas: int, requests: int, seed: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per request over `requests` requests, half trace, half chat."""
    rng = random.Random(seed)
    router = MemoryAwareRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(max_backlog_s=1e9)  # never back off: every call ranks and places
    fleet = [StatsReplica(i, rng) for i in range(replicas)]
    pending = [(trace_request if n % 2 else chat_request)(n, rng) for n in range(requests)]
    wall, cpu = time.perf_counter(), time.thread_time()
    for request in pending:
        await router.choose_replicas(fleet, request)  # type: ignore[arg-type]
    return (
        (time.perf_counter() - wall) / requests * 1e6,
        (time.thread_time() - cpu) / requests * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [asyncio.run(one_run(args.replicas, args.requests, seed)) for seed in range(args.runs)]
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    print(
        f"placement with {args.replicas} replicas: {wall:.1f} us per request (wall), "
        f"{cpu:.1f} us (CPU), median of {args.runs} runs of {args.requests} requests"
    )


if __name__ == "__main__":
    main()

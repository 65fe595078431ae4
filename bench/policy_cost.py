"""What the `lamps` policy costs the scheduler: ordering 10,000 waiting requests.

The scheduler plugin re-ranks its waiting queue every `rerank_every_steps` steps by computing every
request's priority and heapifying, and inserts each new request with one priority and a heap push.
This times those operations on synthetic multi-call requests (oracle predictions from traces of
1 to 6 calls) and reports milliseconds, the median of several runs, in wall time and in the
thread's CPU time (the steadier figure on a shared machine):

- full re-rank, cold: every score computed from scratch (after a predictor update, or the first
  time), the worst case;
- full re-rank, warm: scores cached since the requests were queued, only the starvation test
  run (the heap is rebuilt only if a priority changed), the common case;
- one insertion into a heap of 10,000 (a new request: its score computed, then pushed);
- per step, amortized: the warm re-rank spread over k steps, plus one insertion per step.

The target is at most 1 ms per scheduler step amortized with k = 10. Building the plugin's
`QueuedRequest` views is timed too, for reference: the plugin pays it on top of the policy; and
so is the committed memory-time of the whole queue (`scoring.committed_memory_time`, the fleet
router's figure), which the plugin recomputes at most every 0.25 s once more than 64 requests
are in the engine.

Run: `python -m bench.policy_cost [--requests N] [--runs R] [--every K]`.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lamps_core.costs import GPTJ_6B_ARTIFACT
from lamps_core.policies import make_policy
from lamps_core.policy import EngineView, QueuedRequest, SchedulingPolicy
from lamps_core.request_meta import RequestMeta
from lamps_core.scoring import committed_memory_time
from lamps_core.trace import TraceScript, TraceSegment

NOW = 1_000.0
ENGINE = EngineView(
    now=NOW, running_tokens=20_000, free_blocks=100, total_blocks=10_000, block_size=16
)
# The API time means of INFERCEPT's augmentation types (math, QA, VE, chatbot, image, TTS).
API_MEANS_S = (9e-5, 0.69, 0.09, 28.6, 20.03, 17.24)


def synthetic_request(index: int, rng: random.Random) -> QueuedRequest:
    calls = rng.randint(1, 6)
    context = rng.randint(100, 2000)
    segments = []
    for call in range(calls + 1):
        completion = rng.randint(10, 500)
        if call < calls:
            returned = rng.randint(0, 100)
            api_s = rng.expovariate(1 / rng.choice(API_MEANS_S))
            segments.append(
                TraceSegment(
                    prompt_tokens=context,
                    completion_tokens=completion,
                    api_time=min(api_s, 600.0),
                    api_token_length=returned,
                )
            )
            context += completion + returned
        else:
            segments.append(TraceSegment(prompt_tokens=context, completion_tokens=completion))
    script = TraceScript(segments=segments)
    arrival = NOW - rng.uniform(0, 60)
    meta = RequestMeta(
        request_id=f"r{index}",
        arrival_time=arrival,
        ends_in_api_call=script.segments[0].has_api_call,
        remaining_segments=script.segments,
    )
    return QueuedRequest(
        engine_request_id=f"r{index}-s0",
        arrival_time=arrival,
        context_tokens=script.segments[0].prompt_tokens,
        generated_tokens=0,
        queued_at=arrival,
        waited_before_s=0.0,
        passed_over=rng.randint(0, 50),  # below the guard's threshold: nothing promoted
        meta=meta,
    )


def rerank(policy: SchedulingPolicy, requests: list[QueuedRequest]) -> list[tuple[Any, ...]]:
    """The first ranking of `requests`: a priority each, then heapify."""
    heap = [(policy.priority(r, ENGINE), i, r) for i, r in enumerate(requests)]
    heapq.heapify(heap)
    return heap


def rerank_heap(policy: SchedulingPolicy, heap: list[tuple[Any, ...]]) -> None:
    """What the plugin's queue does on a re-rank (`PolicyRequestQueue.rerank`): a priority per
    request, and the heap rebuilt only if one changed."""
    changed = False
    for i, (old, number, request) in enumerate(heap):
        new = policy.priority(request, ENGINE)
        if new is not old and new != old:
            heap[i] = (new, number, request)
            changed = True
    if changed:
        heapq.heapify(heap)


@dataclass(frozen=True, slots=True)
class Timing:
    """Medians in milliseconds: wall clock, and the CPU time of the timing thread (what the
    scheduler's own thread spends; on a shared machine wall time also counts waiting for a core)."""

    wall_ms: float
    cpu_ms: float

    def __truediv__(self, divisor: float) -> Timing:
        return Timing(self.wall_ms / divisor, self.cpu_ms / divisor)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall_ms + other.wall_ms, self.cpu_ms + other.cpu_ms)


def median_timing(runs: int, setup: Callable[[], Any], timed: Callable[[Any], Any]) -> Timing:
    walls, cpus = [], []
    for _ in range(runs):
        state = setup()
        # The setup's garbage is collected outside the timed part, so a sample does not pay for
        # a full collection of objects the operation did not make.
        gc.collect()
        wall, cpu = time.perf_counter(), time.thread_time()
        timed(state)
        cpus.append((time.thread_time() - cpu) * 1e3)
        walls.append((time.perf_counter() - wall) * 1e3)
    return Timing(statistics.median(walls), statistics.median(cpus))


def main(requests: int = 10_000, runs: int = 7, every: int = 10) -> dict[str, float]:
    """Times the operations, prints a table and returns the figures (milliseconds; keys ending
    in `_cpu_ms` are thread CPU time, `_ms` wall time)."""
    rng = random.Random(0)
    queue = [synthetic_request(i, rng) for i in range(requests)]
    newcomers = [synthetic_request(requests + i, rng) for i in range(1000)]

    def fresh_policy() -> SchedulingPolicy:
        return make_policy("lamps", costs=GPTJ_6B_ARTIFACT, rerank_every_steps=every)

    def warm_policy() -> SchedulingPolicy:
        policy = fresh_policy()
        rerank(policy, queue)  # every request scored once, as when it was queued
        return policy

    cold = median_timing(runs, fresh_policy, lambda policy: rerank(policy, queue))
    # Warm: one policy lives on, as in the engine, and re-ranks its queue again and again.
    warm = warm_policy()
    warm_heap_now = rerank(warm, queue)
    warm_rerank = median_timing(
        runs, lambda: warm, lambda policy: rerank_heap(policy, warm_heap_now)
    )

    def warm_heap() -> tuple[SchedulingPolicy, list[tuple[Any, ...]]]:
        # A new policy each run, so the newcomers are scored (not found cached) when inserted.
        policy = warm_policy()
        return policy, rerank(policy, queue)

    def insert_all(state: tuple[SchedulingPolicy, list[tuple[Any, ...]]]) -> None:
        policy, heap = state
        for i, request in enumerate(newcomers):
            heapq.heappush(heap, (policy.priority(request, ENGINE), requests + i, request))

    insertion = median_timing(runs, warm_heap, insert_all) / len(newcomers)

    def build_views(_: None) -> None:
        for r in queue:
            QueuedRequest(
                r.engine_request_id,
                r.arrival_time,
                r.context_tokens,
                r.generated_tokens,
                r.queued_at,
                r.waited_before_s,
                r.passed_over,
                r.meta,
            )

    views = median_timing(runs, lambda: None, build_views)
    in_engine = [(r.context_tokens, r.generated_tokens, r.meta) for r in queue]
    policy = fresh_policy()
    committed = median_timing(
        runs,
        lambda: None,
        lambda _: committed_memory_time(
            in_engine, [], policy.predictor, GPTJ_6B_ARTIFACT, other_tokens=0
        ),
    )

    rows = {
        "full_rerank_cold": ("full re-rank, cold (score all + heapify)", cold),
        "full_rerank_warm": ("full re-rank, warm (cached scores)", warm_rerank),
        "insertion": ("one insertion into the heap (score + push)", insertion),
        "amortized_rerank_per_step": (
            f"per step, re-rank every {every} steps",
            warm_rerank / every,
        ),
        "amortized_per_step_with_one_insertion": (
            f"per step, re-rank every {every} + one insertion",
            warm_rerank / every + insertion,
        ),
        "plugin_views_per_rerank": ("(plugin) building the views for one re-rank", views),
        "committed_memory_time": ("(plugin) committed memory-time of all of them", committed),
    }
    print(f"lamps policy, {requests} waiting requests, median of {runs} runs")
    print(f"{'operation':<48} {'wall ms':>10} {'cpu ms':>10}")
    figures: dict[str, float] = {"requests": float(requests), "rerank_every_steps": float(every)}
    for key, (label, timing) in rows.items():
        print(f"{label:<48} {timing.wall_ms:>10.3f} {timing.cpu_ms:>10.3f}")
        figures[f"{key}_ms"] = timing.wall_ms
        figures[f"{key}_cpu_ms"] = timing.cpu_ms
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--every", type=int, default=10, help="re-rank period k in steps")
    args = parser.parse_args()
    main(args.requests, args.runs, args.every)

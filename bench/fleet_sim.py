"""What-if for issue 10: where could the memory router beat Serve's power of two choices?

A discrete-event model of a fleet of engine replicas, each a continuous-batching server with a
KV budget, fed a `bench.workloads` trace through one of two routers:

- `pow2`: Serve's default, two replicas drawn at random, the one with fewer requests in flight
  (a request in a call counts: it is one Serve request through its calls);
- `memory`: our rule, `lamps_core.placement.place`, each replica's committed memory-time being
  the sum of its in-flight requests' remaining `script_demand` (exact and never stale: the
  router's best case).

Each replica admits waiting requests first come, first served while their context fits its KV
budget and its batch has room, prefills within a per-step token budget, decodes one token per
running request per step, swaps a request out for its call (what LAMPS does on a GPU, where a
copy costs milliseconds) and back in when the call returns, and on running out of KV preempts
the newest-admitted request (recomputed later). Step time = `step_base_s + step_per_request_s ·
batch + step_per_kv_token_s · KV tokens in the batch` plus the step's prefill `T_fwd` and
swap-in copies.

This is NOT the engine (no vLLM, no LAMPS ordering, no prefix cache, assumed step costs): it
says where a gap between routers can exist at all, to choose the next GPU run, never what the
system achieves. Run: `python -m bench.fleet_sim [--workload multi] [--replicas 2,4] ...`.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.workloads import get_workload
from lamps_core.costs import EngineCosts
from lamps_core.placement import Demand, ReplicaView, place, script_demand
from lamps_core.trace import TraceScript

# The bench GPU engine's shape (cluster/serve-bench-gpu.yaml: Llama-3-8B, bf16, 16 GiB of KV,
# 256 sequences, 2,048 batched tokens); the step costs are assumptions of this model. These are
# what the memory router prices demands with (a replica's reported costs); the simulated
# replicas step by `ReplicaShape`'s own figures, as a real engine's steps differ from the
# costs its replica reports (a 12-ms decode step priced; 7-11.5 ms simulated, from an empty
# to a full batch and KV cache).
GPU_COSTS = EngineCosts(
    kv_bytes_per_token=131_072,
    fwd_intercept_s=0.005,
    fwd_slope_s=0.00005,
    swap_slope_s=2.5e-6,
    decode_step_s=0.012,
)


Scripts = list[tuple[str, float, TraceScript]]  # (request id, arrival s, script) each


@dataclass(frozen=True, slots=True)
class ReplicaShape:
    kv_tokens: int = 131_072
    max_batch: int = 256
    prefill_budget_tokens: int = 2_048
    # Chosen so that the 2-replica toolbench run at 128 req/s comes out near the 2x H200 run
    # (docs/results/gpu-h200x2/fleet-s6-rate128: 17.8-18.0 s mean; here ~21 s, FCFS order).
    step_base_s: float = 0.007
    step_per_request_s: float = 0.00001
    step_per_kv_token_s: float = 1.5e-8


@dataclass(slots=True)
class SimRequest:
    request_id: str
    arrival_s: float
    script: TraceScript
    segment: int = 0
    decoded: int = 0  # in the current segment
    context: int = 0  # tokens of KV it holds (or will hold once prefilled)
    needs: str = "prefill"  # what admission costs: "prefill" (or recompute) or "swap_in"
    admitted_at_step: int = -1
    finish_s: float | None = None
    preempted: int = 0  # times its KV was taken back to make room

    def __post_init__(self) -> None:
        self.context = self.script.segments[0].prompt_tokens

    @property
    def to_decode(self) -> int:
        return self.script.segments[self.segment].completion_tokens - self.decoded

    def remaining_demand(self, costs: EngineCosts) -> Demand:
        """`script_demand` of what is left: the current segment from its present context."""
        segs = self.script.segments[self.segment :]
        rows = [(self.context, self.to_decode, segs[0].api_time, segs[0].api_token_length or 0)]
        rows += [(s.prompt_tokens, s.completion_tokens, s.api_time, 0) for s in segs[1:]]
        return script_demand(rows, costs)


@dataclass
class Replica:
    replica_id: str
    shape: ReplicaShape
    costs: EngineCosts
    waiting: deque[SimRequest] = field(default_factory=deque)
    running: list[SimRequest] = field(default_factory=list)
    in_flight: dict[str, SimRequest] = field(default_factory=dict)
    busy: bool = False
    steps: int = 0

    @property
    def kv_used(self) -> int:
        return sum(r.context for r in self.running)

    def committed(self) -> float:
        return sum(r.remaining_demand(self.costs).memory_time for r in self.in_flight.values())

    def step(self, now: float) -> tuple[float, list[SimRequest], list[SimRequest]]:
        """One engine step from `now`: its duration, the requests that paused for a call and
        those that finished (both already out of the batch)."""
        shape, costs = self.shape, self.costs
        extra_s, budget, used = 0.0, shape.prefill_budget_tokens, self.kv_used
        while self.waiting and len(self.running) < shape.max_batch:
            nxt = self.waiting[0]
            if used + nxt.context + 1 > shape.kv_tokens:
                break
            if nxt.needs == "prefill":
                if nxt.context > budget and budget < shape.prefill_budget_tokens:
                    break  # a fresh step's budget takes it (chunked prefill, simplified)
                budget -= nxt.context
                extra_s += costs.t_fwd(nxt.context)
            else:
                extra_s += costs.t_swap(nxt.context)
            self.waiting.popleft()
            nxt.admitted_at_step = self.steps
            self.running.append(nxt)
            used += nxt.context
        batch_kv = sum(r.context for r in self.running)
        duration = (
            shape.step_base_s
            + shape.step_per_request_s * len(self.running)
            + shape.step_per_kv_token_s * batch_kv
            + extra_s
        )
        self.steps += 1
        paused, done = [], []
        for r in list(self.running):
            r.decoded += 1
            r.context += 1
            if r.to_decode > 0:
                continue
            self.running.remove(r)
            seg = r.script.segments[r.segment]
            if seg.api_time is None or r.segment + 1 >= len(r.script.segments):
                r.finish_s = now + duration
                self.in_flight.pop(r.request_id)
                done.append(r)
            else:
                paused.append(r)
        # Out of KV: the newest-admitted request gives its blocks back (recomputed later).
        while self.running and self.kv_used > shape.kv_tokens:
            victim = max(self.running, key=lambda r: r.admitted_at_step)
            self.running.remove(victim)
            victim.needs = "prefill"
            victim.preempted += 1
            self.waiting.appendleft(victim)
        return duration, paused, done


def pow2_choice(replicas: Sequence[Replica], rng: random.Random) -> Replica:
    pair = rng.sample(list(replicas), 2) if len(replicas) > 1 else list(replicas)
    return min(pair, key=lambda r: (len(r.in_flight), r.replica_id))


def memory_choice(replicas: Sequence[Replica], request: SimRequest, costs: EngineCosts) -> Replica:
    views = [
        ReplicaView(
            replica_id=r.replica_id,
            kv_capacity_bytes=r.shape.kv_tokens * costs.kv_bytes_per_token,
            kv_in_use_bytes=r.kv_used * costs.kv_bytes_per_token,
            kv_paused_bytes=0.0,
            committed_memory_time=r.committed(),
            drain_rate=r.shape.kv_tokens * costs.kv_bytes_per_token,
            stats_time=0.0,
        )
        for r in replicas
    ]
    placement = place(request.remaining_demand(costs), views, max_backlog_s=math.inf)
    by_id = {r.replica_id: r for r in replicas}
    return by_id[placement.replica_id or replicas[0].replica_id]


def simulate(
    scripts: Scripts,
    router: str,
    replicas: int,
    shape: ReplicaShape | Sequence[ReplicaShape] = ReplicaShape(),
    costs: EngineCosts = GPU_COSTS,
    seed: int = 0,
) -> list[SimRequest]:
    """Every request of `scripts` (id, arrival s, script) through `router` onto `replicas`
    replicas (of `shape`, or of the shapes given in turn: a fleet of mixed sizes); returns the
    requests with their finish times."""
    shapes = [shape] if isinstance(shape, ReplicaShape) else list(shape)
    fleet = [Replica(f"r{i}", shapes[i % len(shapes)], costs) for i in range(replicas)]
    rng = random.Random(seed)
    order = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    requests = [SimRequest(rid, at, script) for rid, at, script in scripts]
    for r in requests:
        heapq.heappush(events, (r.arrival_s, next(order), "arrive", r))

    def kick(replica: Replica, now: float) -> None:
        if not replica.busy and (replica.waiting or replica.running):
            replica.busy = True
            heapq.heappush(events, (now, next(order), "step", replica))

    homes: dict[str, Replica] = {}
    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(item, SimRequest)
            if router == "pow2":
                home = pow2_choice(fleet, rng)
            elif router == "memory":
                home = memory_choice(fleet, item, costs)
            else:
                raise ValueError(f"unknown router {router!r}")
            homes[item.request_id] = home
            home.in_flight[item.request_id] = item
            home.waiting.append(item)
            kick(home, now)
        elif kind == "step":
            assert isinstance(item, Replica)
            duration, paused, _ = item.step(now)
            for r in paused:
                seg = r.script.segments[r.segment]
                back = now + duration + (seg.api_time or 0.0)
                heapq.heappush(events, (back, next(order), "return", r))
            if item.waiting or item.running:
                heapq.heappush(events, (now + duration, next(order), "step", item))
            else:
                item.busy = False
        else:  # a call returned: the next segment, its KV swapped back in on admission
            assert isinstance(item, SimRequest)
            seg = item.script.segments[item.segment]
            item.context += seg.api_token_length or 0
            item.segment += 1
            item.decoded = 0
            item.needs = "swap_in"
            home = homes[item.request_id]
            home.waiting.append(item)
            kick(home, now)
    return requests


def latency_summary(requests: Sequence[SimRequest]) -> tuple[float, float]:
    latencies = sorted(r.finish_s - r.arrival_s for r in requests if r.finish_s is not None)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return statistics.fmean(latencies), p99


def trace_scripts(workload: str, rate: float, seed: int, args: argparse.Namespace) -> Scripts:
    count = max(1, round(rate * args.duration))
    trace = get_workload(workload)(
        count,
        rate,
        seed,
        scale=args.scale,
        time_scale=args.time_scale,
        max_context=args.max_context,
    )
    return [(r.request_id, r.arrival_time or 0.0, r.script) for r in trace.requests]


def compare(workload: str, replicas: int, rate: float, args: argparse.Namespace) -> str:
    """One row: the memory router against pow2 on the same traces, over `args.seeds` seeds."""
    mean_ratios, p99_ratios, first = [], [], None
    shapes = [ReplicaShape(kv_tokens=int(k)) for k in args.kv_tokens.split(",")]
    for seed in range(args.seeds):
        scripts = trace_scripts(workload, rate, seed, args)
        mem = latency_summary(simulate(scripts, "memory", replicas, shapes, seed=seed))
        p2 = latency_summary(simulate(scripts, "pow2", replicas, shapes, seed=seed))
        mean_ratios.append(mem[0] / p2[0])
        p99_ratios.append(mem[1] / p2[1])
        first = first or (mem, p2)
    assert first is not None
    (mem_mean, mem_p99), (p2_mean, p2_p99) = first
    return (
        f"{workload:10s} {replicas:8d} {rate:5g}  {mem_mean:6.2f} / {mem_p99:6.2f} s"
        f"   {p2_mean:6.2f} / {p2_p99:6.2f} s   {statistics.median(mean_ratios):.2f} "
        f"[{min(mean_ratios):.2f}, {max(mean_ratios):.2f}]  {statistics.median(p99_ratios):.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workload", default="toolbench,multi,single_mix")
    parser.add_argument("--replicas", default="2,4,8")
    parser.add_argument("--rate", default="64,128,192", help="req/s for 2 replicas (scaled)")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--time-scale", type=float, default=0.25)
    parser.add_argument("--scale", type=float, default=1.0, help="token counts multiplied")
    parser.add_argument("--max-context", type=int, default=None, help="tokens, per request")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--kv-tokens",
        default=str(ReplicaShape().kv_tokens),
        help="each replica's KV tokens, given in turn over the fleet (e.g. 131072,32768: "
        "replicas of two sizes alternating)",
    )
    args = parser.parse_args(argv)
    print("workload   replicas  rate  memory mean / P99   pow2 mean / P99   memory/pow2 mean  P99")
    for workload in args.workload.split(","):
        for n in (int(x) for x in args.replicas.split(",")):
            for base_rate in (float(x) for x in args.rate.split(",")):
                print(compare(workload, n, base_rate * n / 2, args), flush=True)


if __name__ == "__main__":
    main()

"""Soak and overload runs against the serving stack (docs/reliability.md, "Abuse and load").

Drives trace requests (one simulated call each, every length fixed) open loop at `--rate` per
second for `--minutes`, then reports: requests sent, completed (200), refused (429, with
Retry-After), anything else (other statuses, timeouts, connection errors: none expected); the
latencies; the RSS of the serving processes (every process of the stack: Ray's daemons and
workers, the Serve replicas, vLLM's engine core) after warm-up, during the run and after it; and
the engine's state at the end: KV blocks used/free (from /metrics), and, when this script
started the stack, the scheduler's preserved blocks and host-pool bytes and entries (asked of the
engine replica).

    # a soak at a sustainable rate, on a stack this script starts (cluster/serve-cpu.yaml)
    .venv/bin/python scripts/soak.py --minutes 10 --rate 2
    # overload: 10x what an ingress admitting 2 requests of a 0.5 s call can sustain (4/s)
    .venv/bin/python scripts/soak.py --minutes 1 --rate 40 --max-in-flight 2 --call-s 0.5
    # against a running `lamps serve` (RSS of its processes; KV from /metrics, and with
    # --ray-address the host pool from the engine replica)
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --ray-address auto \\
        --minutes 10 --rate 2

Exit status 0 when every request was accounted for (200 or 429), /health answered 200 after,
and the engine held no KV block at the end; 1 otherwise. The summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from lamps.local_stack import STACK_MARK  # noqa: E402

MODEL = "smollm2-135m"


def trace_body(call_s: float) -> dict[str, Any]:
    return {
        "segments": [
            {
                "prompt_tokens": 32,
                "completion_tokens": 8,
                "api_time": call_s,
                "api_token_length": 4,
            },
            {"prompt_tokens": 44, "completion_tokens": 8},
        ]
    }


def stack_processes() -> list[psutil.Process]:
    """Every process started by a LAMPS stack on this machine (`lamps serve`, the tests, ours)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != me and STACK_MARK in p.environ():
                found.append(p)
    return found


def rss_mib() -> dict[str, float]:
    """Total RSS of the stack's processes, and of the serving ones by role (MiB)."""
    total = 0
    roles: Counter[str] = Counter()
    for p in stack_processes():
        with contextlib.suppress(psutil.Error):
            rss = p.memory_info().rss
            total += rss
            title = " ".join(p.cmdline())
            for role in ("EngineReplica", "Ingress", "ToolWorker", "EngineCore", "Proxy"):
                if role in title or role in p.name():
                    roles[role] += rss
    return {"total": total / 2**20, **{k: v / 2**20 for k, v in sorted(roles.items())}}


def metric(text: str, name: str) -> float | None:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    return sum(values) if values else None


async def drive(
    url: str, headers: dict[str, str], rate: float, seconds: float, call_s: float, timeout: float
) -> tuple[list[tuple[int | str, float, str]], list[dict[str, float]]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    results: list[tuple[int | str, float, str]] = []
    samples: list[dict[str, float]] = []
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout, limits=limits
    ) as client:

        async def one() -> None:
            start = time.monotonic()
            try:
                r = await client.post("/v1/traces", json=trace_body(call_s))
                results.append(
                    (r.status_code, time.monotonic() - start, r.headers.get("retry-after", ""))
                )
            except httpx.HTTPError as exc:
                results.append((type(exc).__name__, time.monotonic() - start, ""))

        tasks = []
        start = time.monotonic()
        next_sample = start
        n = int(rate * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
            if time.monotonic() >= next_sample:
                rss = await asyncio.to_thread(rss_mib)
                samples.append({"t": round(time.monotonic() - start, 1), **rss})
                done = Counter(s for s, _, _ in results)
                print(
                    f"[{time.monotonic() - start:6.0f} s] sent {i + 1}/{n}, answered "
                    f"{dict(done)}, RSS {rss['total']:.0f} MiB",
                    file=sys.stderr,
                )
                next_sample += 30
        await asyncio.gather(*tasks)
    return results, samples


@contextlib.contextmanager
def own_stack(max_in_flight: int | None, data_dir: Path) -> Iterator[str]:
    """cluster/serve-cpu.yaml on free ports, as the test suite starts it."""
    from lamps.local_stack import load_serve_config, local_stack
    from lamps.model import prepare_models
    from lamps.redis_server import free_port

    prepare_models(data_dir)
    config = load_serve_config(PROJECT_DIR / "cluster" / "serve-cpu.yaml")
    config["http_options"]["port"] = free_port()
    args = config["applications"][0]["args"]
    args["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    args["enable_benchmark_endpoints"] = True  # the soak replays traces
    if max_in_flight is not None:
        args["max_in_flight_requests"] = max_in_flight
    with local_stack(config, PROJECT_DIR, data_dir, log_to_driver=False) as running:
        yield running.http_url


def engine_hold_state() -> dict[str, Any]:
    """Preserved blocks and host pool, from the engine replica (needs this process's Ray)."""
    from ray import serve

    engine = serve.get_deployment_handle("EngineReplica", "lamps")
    stats = engine.stats.remote().result()
    scheduler = engine.scheduler_stats.remote().result()
    swap = scheduler.get("swap", {})
    return {
        "kv_blocks_used": stats["kv_blocks_used"],
        "kv_blocks_free": stats["kv_blocks_free"],
        "preserved_blocks": scheduler.get("preserved_blocks", 0),
        "host_pool_bytes_in_use": swap.get("host_pool_bytes_in_use", 0),
        "host_pool_entries": swap.get("entries", 0),
    }


def run(args: argparse.Namespace, url: str, started: bool) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as http:
        for _ in range(3):  # warm-up: the first requests compile and allocate
            http.post("/v1/traces", json=trace_body(args.call_s)).raise_for_status()
        time.sleep(2)
        rss_start = rss_mib()
        wall = time.monotonic()
        results, samples = asyncio.run(
            drive(url, headers, args.rate, args.minutes * 60, args.call_s, args.timeout)
        )
        wall = time.monotonic() - wall
        health = http.get("/health")
        # One short request makes the engine step (and publish) after the last one finished.
        tiny = {"segments": [{"prompt_tokens": 8, "completion_tokens": 1}]}
        http.post("/v1/traces", json=tiny)
        time.sleep(args.settle_s)
        rss_end = rss_mib()
        text = http.get("/metrics").text
    statuses = Counter(status for status, _, _ in results)
    served = sorted(s for status, s, _ in results if status == 200)
    refused = [(s, retry) for status, s, retry in results if status == 429]
    summary: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "rate_per_s": args.rate,
        "minutes": args.minutes,
        "wall_s": round(wall, 1),
        "sent": len(results),
        "completed_200": statuses[200],
        "refused_429": statuses[429],
        "refused_with_retry_after": sum(1 for _, retry in refused if retry),
        "other": {str(k): v for k, v in statuses.items() if k not in (200, 429)},
        "latency_200_s": {
            "p50": round(statistics.median(served), 3) if served else None,
            "p99": round(served[int(0.99 * (len(served) - 1))], 3) if served else None,
            "max": round(served[-1], 3) if served else None,
        },
        "slowest_429_s": round(max((s for s, _ in refused), default=0.0), 3),
        "health_after": health.status_code,
        "rss_mib": {
            "start": {k: round(v, 1) for k, v in rss_start.items()},
            "end": {k: round(v, 1) for k, v in rss_end.items()},
            "growth_pct": round(100 * (rss_end["total"] / rss_start["total"] - 1), 2)
            if rss_start["total"]
            else None,
            "peak_total": round(max([s["total"] for s in samples] + [rss_end["total"]]), 1),
        },
        "metrics_end": {
            "kv_blocks_used": metric(text, "lamps_engine_kv_blocks_used"),
            "kv_blocks_free": metric(text, "lamps_engine_kv_blocks_free"),
        },
    }
    if started or args.ray_address:
        summary["engine_end"] = engine_hold_state()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--call-s", type=float, default=0.5, help="each request's call (s)")
    parser.add_argument("--url", help="a running server (default: start one on free ports)")
    parser.add_argument("--api-key", default=os.environ.get("LAMPS_API_KEY"))
    parser.add_argument(
        "--max-in-flight", type=int, help="the started stack's max_in_flight_requests"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait before the last RSS")
    parser.add_argument("--data-dir", type=Path, default=PROJECT_DIR / "data")
    parser.add_argument(
        "--ray-address",
        help="with --url: join that server's Ray (`auto` for `lamps serve` on this machine) "
        "to read the engine's preserved blocks and host pool at the end",
    )
    args = parser.parse_args()
    if args.url and args.ray_address:
        import ray

        ray.init(address=args.ray_address, log_to_driver=False)
    if args.url:
        summary = run(args, args.url.rstrip("/"), started=False)
    else:
        with own_stack(args.max_in_flight, args.data_dir) as url:
            summary = run(args, url, started=True)
    print(json.dumps(summary, indent=1))
    engine = summary.get("engine_end", summary["metrics_end"])
    ok = (
        not summary["other"]
        and summary["refused_429"] == summary["refused_with_retry_after"]
        and summary["health_after"] == 200
        and engine["kv_blocks_used"] == 0
        and engine.get("host_pool_bytes_in_use", 0) == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

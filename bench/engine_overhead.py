"""What the scheduler plugin costs the engine: throughput of the same requests under vLLM's own
scheduler and under the plugin running the `lamps` policy, on a trace without API calls (where
no policy can win anything back), in one run on one machine.

Each variant gets its own engine (the scheduler class is fixed at start-up); rounds alternate
stock, lamps, stock, lamps, ... so drift of the machine hits both alike. Reported: output
tokens/s per round, the median per variant, and the ratio lamps / stock (target >= 0.97).

Run: `python -m bench.engine_overhead --model data/models/tiny-dummy [--out DIR]`; on a GPU add
`--async-scheduling --no-enforce-eager` and a larger model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from lamps_vllm.config import SchedulerPluginConfig
from lamps_vllm.engine import EngineSettings, start_engine


async def one_round(settings: EngineSettings, prompts: list[list[int]], decode: int) -> float:
    engine, _ = await start_engine(settings)
    try:
        params = SamplingParams(max_tokens=decode, min_tokens=decode, ignore_eos=True)

        async def one(i: int, prompt: list[int]) -> int:
            final = None
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=prompt), params, f"bench-{i}"
            ):
                final = out
            assert final is not None
            return len(final.outputs[0].token_ids)

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        return tokens / (time.perf_counter() - started)
    finally:
        engine.shutdown()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = {
        "model": args.model,
        "served_model_name": "bench",
        "load_format": args.load_format,
        "dtype": args.dtype,
        "max_model_len": args.prompt + args.decode + 16,
        "kv_cache_bytes": args.kv_cache_bytes,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
        "skip_tokenizer_init": args.skip_tokenizer_init,
    }
    variants = {
        "stock": EngineSettings.model_validate({**base, "scheduler": None}),
        "lamps": EngineSettings.model_validate(
            {**base, "scheduler": SchedulerPluginConfig(policy="lamps").model_dump()}
        ),
    }
    rng = random.Random(args.seed)
    vocab_hi = 30_000  # within every vocabulary we use; ids < 1000 avoided (special tokens)
    prompts = [
        [rng.randrange(1000, vocab_hi) for _ in range(args.prompt)] for _ in range(args.requests)
    ]
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, settings in variants.items():
            tps = await one_round(settings, prompts, args.decode)
            rounds[name].append(tps)
            print(f"round {r + 1} {name:5s} {tps:10.1f} output tokens/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    return {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokens_per_s": rounds,
        "median_tokens_per_s": medians,
        "lamps_over_stock": medians["lamps"] / medians["stock"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("data/models/tiny-dummy"))
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(f"lamps / stock throughput: {result['lamps_over_stock']:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_overhead.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""A training and held-out set for the output-length model (lamps_core/length_model.py): varied
chat requests run through the project's chat path (`lamps_vllm.chat_session.run_chat`, the
code the engine replica serves chat with) on the real SmolLM2-135M-Instruct model, with the
server's default sampling (temperature 0) and the project's tools (calculator, http_get with an
empty allowlist, so its calls fail as they would on the shipped config, simulated_api capped at
0.2 s), recording every segment's context and how many tokens it decoded.

The prompts are written here: topics x task kinds (short factual answer, yes/no, list,
explanation, code, story or poem, translation, tool-using requests with the tool forced by
`required` or by name, or offered in `auto` mode), with or without a system prompt and an
earlier exchange. They are part of this project and under its license.

The held-out split is by subject (every fifth topic, code task and sentence; for arithmetic the
request itself, a fifth of them): a held-out request never shares its subject with a training
one, so the report measures prompts the model has not seen, not near-copies of them.

Run: `python -m bench.length_dataset [--conversations 1400] [--out FILE]` (default
bench/data/length_dataset.jsonl.gz; about 15 minutes on two CPU cores per 700 conversations).
`--extend` keeps the conversations the file has and runs only the rest: the requests are the
same for a seed (the first N of 1400 are the N of a run of N).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lamps_core.length_model import LengthForecast, SegmentContext
from lamps_vllm.chat_session import ChatOutcome, ChatPlan, run_chat
from lamps_vllm.engine import EngineSettings, start_engine
from tool_workers.tools import ToolArgumentsError, ToolResult, UnknownToolError
from tool_workers.worker import ToolWorker

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PROJECT_DIR / "bench" / "data" / "length_dataset.jsonl.gz"
MAX_TOKENS = 500
MAX_TOOL_CALLS = 4  # the shipped config's default_max_tool_calls
HELD_OUT_FRACTION = 0.2
TEXT_KEPT_CHARS = 80  # of each segment's output, to look at; the model never reads it

TOPICS = [
    "the moon", "photosynthesis", "the French Revolution", "black holes", "volcanoes",
    "honey bees", "coffee", "the Great Wall of China", "climate change", "the human heart",
    "electric cars", "chess", "the Roman Empire", "rainbows", "green tea", "the internet",
    "dinosaurs", "the Pacific Ocean", "Mount Everest", "the piano", "recycling", "sleep",
    "gravity", "the Amazon rainforest", "bicycles", "vaccines", "the Olympic Games", "bread",
    "earthquakes", "penguins", "the printing press", "solar panels", "jazz music", "tigers",
    "the Eiffel Tower", "chocolate", "the stock market", "glaciers", "robots", "the Nile river",
]  # fmt: skip
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "sorts a list of numbers", "counts the vowels in a sentence",
    "returns the largest element of a list", "converts Celsius to Fahrenheit",
    "returns the n-th Fibonacci number", "merges two dictionaries",
    "removes duplicates from a list", "counts the lines of a text file",
    "checks whether a string is a palindrome", "computes the average of a list",
    "finds the greatest common divisor of two numbers", "capitalizes every word of a sentence",
    "returns the even numbers of a list",
]  # fmt: skip
LANGUAGES = ["Python", "JavaScript", "C", "Rust"]
SENTENCES = [
    "The weather is nice today.", "Where is the train station?", "I would like a cup of coffee.",
    "My brother lives in a small village.", "Thank you very much for your help.",
    "The library opens at nine in the morning.", "We are going to the beach tomorrow.",
    "This book is very interesting.", "How much does this jacket cost?",
    "The children are playing in the garden.", "Please close the window.",
    "I have been learning to cook.",
]  # fmt: skip
TARGET_LANGUAGES = ["French", "Spanish", "German", "Italian"]
SYSTEM_PROMPTS = [
    None, None, None,
    "You are a helpful assistant.",
    "You are a concise assistant. Keep every answer short.",
    "You are a friendly teacher who explains things thoroughly, step by step.",
    "You are a pirate. Answer like a pirate.",
]  # fmt: skip
EARLIER_EXCHANGES = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Can you help me with something?", "Of course. What do you need?"),
    ("Good morning.", "Good morning! What would you like to know?"),
]


@dataclass
class ConversationSpec:
    kind: str
    subject: str
    messages: list[dict[str, Any]]
    tools: list[str] = field(default_factory=list)
    tool_choice: str = "none"

    @property
    def key(self) -> str:
        return json.dumps([self.messages, self.tools, self.tool_choice], sort_keys=True)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
    question = rng.choice(
        [
            f"What is {a}*{b}?",
            f"Compute {a} + {b} - {c}.",
            f"How much is {a * b} divided by {b}?",
            f"A shop sells {a} apples at {c} cents each. How many cents is that in total?",
            f"What is ({a} + {b}) * {c}?",
            f"Calculate {a} to the power of 2.",
        ]
    )
    return question, question


def _task(kind: str, rng: random.Random) -> tuple[str, str]:
    """(user message, subject) of one request of `kind`."""
    topic = rng.choice(TOPICS)
    n = rng.choice([3, 5, 7, 10])
    match kind:
        case "short":
            text = rng.choice(
                [
                    f"In one sentence, what is {topic}?",
                    f"What is {topic}? Answer briefly.",
                    f"Give a one-line definition of {topic}.",
                    f"Name one famous fact about {topic}. Be short.",
                ]
            )
        case "yes_no":
            text = rng.choice(
                [
                    f"Is {topic} older than 100 years? Answer yes or no.",
                    f"Answer only yes or no: is {topic} related to science?",
                    f"Yes or no: have you heard of {topic}?",
                ]
            )
        case "list":
            text = rng.choice(
                [
                    f"List {n} facts about {topic}.",
                    f"Give me a bulleted list of {n} things to know about {topic}.",
                    f"What are {n} interesting questions one could ask about {topic}?",
                ]
            )
        case "explain":
            text = rng.choice(
                [
                    f"Explain {topic} to a ten-year-old.",
                    f"Explain in detail how {topic} works.",
                    f"Why is {topic} important? Give a thorough explanation.",
                    f"Describe the history of {topic}.",
                ]
            )
        case "code":
            task, language = rng.choice(CODE_TASKS), rng.choice(LANGUAGES)
            topic = task
            text = rng.choice(
                [
                    f"Write a {language} function that {task}.",
                    f"Show me {language} code that {task}, with comments.",
                    f"How do I write a program in {language} that {task}?",
                ]
            )
        case "story":
            text = rng.choice(
                [
                    f"Write a short story about {topic}.",
                    f"Write a poem about {topic}.",
                    f"Tell me a long story about a child who loves {topic}.",
                    f"Write a haiku about {topic}.",
                ]
            )
        case "translate":
            topic = rng.choice(SENTENCES)
            language = rng.choice(TARGET_LANGUAGES)
            text = rng.choice(
                [
                    f"Translate into {language}: {topic}",
                    f'How do you say "{topic}" in {language}?',
                ]
            )
        case _:
            raise ValueError(kind)
    return text, topic


def conversation_specs(count: int, seed: int) -> list[ConversationSpec]:
    """`count` distinct requests (temperature 0 makes a repeated one a copy of the first)."""
    rng = random.Random(seed)
    kinds = ["short", "yes_no", "list", "explain", "code", "story", "translate"]
    specs: dict[str, ConversationSpec] = {}
    while len(specs) < count:
        roll = rng.random()
        tools: list[str] = []
        choice = "none"
        if roll < 0.25:  # a calculator question, the tool forced or offered
            kind = "arithmetic"
            text, subject = _arithmetic(rng)
            tools = ["calculator"]
            choice = rng.choice(["required", "required", "calculator", "auto", "none"])
        elif roll < 0.3:
            kind = "http_get"
            topic = rng.choice(TOPICS)
            slug = topic.removeprefix("the ").replace(" ", "-").lower()
            text = f"Fetch https://example.com/{slug} and tell me what the page says."
            subject = topic
            tools, choice = ["http_get", "calculator"], "http_get"
        elif roll < 0.34:
            kind = "simulated_api"
            topic = rng.choice(TOPICS)
            text = f"Ask the slow service about {topic} (wait 0.1 s) and summarize its answer."
            subject = topic
            tools, choice = ["simulated_api"], rng.choice(["simulated_api", "required"])
        else:
            kind = rng.choice(kinds)
            text, subject = _task(kind, rng)
            if rng.random() < 0.15:  # tools offered to a request that needs none
                tools, choice = ["calculator"], "auto"
        messages: list[dict[str, Any]] = []
        system = rng.choice(SYSTEM_PROMPTS)
        if system:
            messages.append({"role": "system", "content": system})
        if rng.random() < 0.2:
            earlier_user, earlier_answer = rng.choice(EARLIER_EXCHANGES)
            messages += [
                {"role": "user", "content": earlier_user},
                {"role": "assistant", "content": earlier_answer},
            ]
        messages.append({"role": "user", "content": text})
        spec = ConversationSpec(kind, subject, messages, tools, choice)
        specs.setdefault(spec.key, spec)
    return list(specs.values())


# Every fifth topic, code task and sentence: each kind of request has held-out subjects.
HELD_OUT_SUBJECTS = frozenset(TOPICS[::5] + CODE_TASKS[::5] + SENTENCES[::5])
LISTED_SUBJECTS = frozenset(TOPICS + CODE_TASKS + SENTENCES)


def split_of(subject: str) -> str:
    if subject in LISTED_SUBJECTS:
        return "held_out" if subject in HELD_OUT_SUBJECTS else "train"
    bucket = zlib.crc32(subject.encode()) % 1000  # an arithmetic request is its own subject
    return "held_out" if bucket < HELD_OUT_FRACTION * 1000 else "train"


class SegmentRecorder:
    """Stands where the serving layer's output-length predictor stands in `run_chat`: it
    predicts nothing (the scheduler's default) and keeps every completed segment."""

    def __init__(self) -> None:
        self.segments: list[dict[str, Any]] = []

    def predict(self, context: SegmentContext, budget: int | None = None) -> LengthForecast:
        return LengthForecast(1, "default")  # no forecast: the scheduler's default

    def observe(
        self, context: SegmentContext, decode_tokens: int, tool: str | None, truncated: bool
    ) -> bool:
        self.segments.append(
            {
                "context": context.to_dict(),
                "decode_tokens": decode_tokens,
                "tool": tool,
                "truncated": truncated,
            }
        )
        return True


async def run(args: argparse.Namespace) -> None:
    settings = EngineSettings.model_validate(
        {  # cluster/serve-cpu.yaml's engine, without the swap pool
            "model": PROJECT_DIR / "data" / "models" / "SmolLM2-135M-Instruct",
            "served_model_name": "smollm2-135m",
            "max_model_len": 4096,
            "kv_cache_bytes": 1 << 30,
            "block_size": 32,
            "max_num_seqs": args.concurrency,
            "scheduler": {"policy": "lamps", "policy_options": {"predictor": "estimates"}},
        }
    )
    engine, _ = await start_engine(settings)
    tokenizer = engine.get_tokenizer()
    worker = ToolWorker(None, max_simulated_duration_s=0.2)
    schemas = {s["function"]["name"]: s for s in worker.schemas()}

    async def call_tool(name: str, arguments: dict[str, Any], record_as: str | None) -> ToolResult:
        try:
            return await worker.call(name, arguments, record_as)
        except (UnknownToolError, ToolArgumentsError) as exc:  # as the engine replica answers
            return ToolResult(
                tool=name, ok=False, error=str(exc), duration_s=0.0, started_at=datetime.now(UTC)
            )

    specs = conversation_specs(args.conversations, args.seed)
    records: list[dict[str, Any]] = []
    out = Path(args.out)
    if args.extend and out.exists():
        records = read_records(out)
    done = {r["id"] for r in records}
    limit = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()

    async def one(index: int, spec: ConversationSpec) -> None:
        async with limit:
            recorder = SegmentRecorder()
            plan = ChatPlan(
                request_id=f"length-{uuid.uuid4().hex}",
                messages=spec.messages,
                tools=[schemas[name] for name in spec.tools],
                tool_choice=spec.tool_choice,
                max_tokens=MAX_TOKENS,
                max_tool_calls=MAX_TOOL_CALLS,
                sampling={"temperature": 0.0, "top_p": 1.0, "seed": None},
            )
            outcome = None
            async for event in run_chat(
                engine, tokenizer, settings.max_model_len, plan, call_tool, recorder
            ):
                if isinstance(event, ChatOutcome):
                    outcome = event
            assert outcome is not None
            records.append(
                {
                    "id": index,
                    "split": split_of(spec.subject),
                    "kind": spec.kind,
                    "subject": spec.subject,
                    "tool_choice": spec.tool_choice,
                    "tools": spec.tools,
                    "messages": spec.messages,
                    "max_tokens": MAX_TOKENS,
                    "finish_reason": outcome.finish_reason,
                    "completion_tokens": outcome.completion_tokens,
                    "answer_start": outcome.text[:TEXT_KEPT_CHARS],
                    "segments": recorder.segments,
                }
            )
            if len(records) % 50 == 0:
                elapsed = time.monotonic() - started
                print(f"{len(records)}/{len(specs)} conversations, {elapsed:.0f} s", flush=True)

    try:
        await asyncio.gather(*(one(i, spec) for i, spec in enumerate(specs) if i not in done))
    finally:
        engine.shutdown()
    records.sort(key=lambda r: r["id"])
    for record in records:  # the rule of this version, for kept records too
        record["split"] = split_of(record["subject"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    segments = sum(len(r["segments"]) for r in records)
    print(
        f"wrote {len(records)} conversations ({segments} segments) to {out} "
        f"in {time.monotonic() - started:.0f} s"
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1400)
    parser.add_argument("--extend", action="store_true", help="keep the file's conversations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

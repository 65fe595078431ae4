"""The kinds of API call a simulated request may make, and a prompt's length without its tokenizer.

Serving code may import this module (the simulated API's recorded types, the fleet router's
token estimate); the benchmark's trace generators and readers (`bench/workloads.py`) build on it
but are not imported by production code.

`AUGMENTATION_TYPES` are INFERCEPT's six augmentation types (the table in
../shared/design/LAMPS.md, "Workloads") with our choices of per-segment decode and per-call
return lengths; `TOOLBENCH_TOOLS` are the five tool classes of the ToolBench-like workload. Their
names are the fixed set a simulated call may be recorded under (`SIMULATED_API_TYPES` of
tool_workers/simulated_api.py), so every generated workload names its calls from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Characters per token when text is counted without a tokenizer: the usual figure for English
# text under GPT- and Llama-style BPE vocabularies (bench/workloads.py, "Files").
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class ApiTool:
    """One kind of call: its duration's mean and standard deviation (s)."""

    name: str
    mean_s: float
    std_s: float


@dataclass(frozen=True)
class AugmentationType:
    """A request population: calls, their durations, and its token lengths (means).

    `context_tokens` is the mean final context of a request making `calls_per_request` calls;
    `decode_tokens` (per segment) and `return_tokens` (per call) are our choices, and the mean
    prompt is what is left of the context. Each call picks one of `tools` uniformly; when empty,
    the type is its own single tool with `api_time_mean_s` / `api_time_std_s`."""

    name: str
    source: str
    api_time_mean_s: float
    api_time_std_s: float
    calls_per_request: float
    context_tokens: float
    decode_tokens: float
    return_tokens: float
    tools: tuple[ApiTool, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"{self.name}: decodes and returns exceed the context")

    @property
    def prompt_tokens(self) -> float:
        calls = self.calls_per_request
        return self.context_tokens - (calls + 1) * self.decode_tokens - calls * self.return_tokens

    @property
    def call_tools(self) -> tuple[ApiTool, ...]:
        return self.tools or (ApiTool(self.name, self.api_time_mean_s, self.api_time_std_s),)


# INFERCEPT's six types: API time mean / spread (s), calls per request, context (the table in
# LAMPS.md), then our per-segment decode and per-call return means (tokens):
# math: short reasoning steps between calculator calls that return a number;
# qa: a Wikipedia passage per search; virtual_env: ALFWorld's short actions and observations;
# chatbot: the assistant's turn, the "call" being the user's think time, returning their message;
# image / tts: a short prompt for the generator, which returns a handle.
AUGMENTATION_TYPES: dict[str, AugmentationType] = {
    t.name: t
    for t in (
        AugmentationType("math", "GSM8K-XL calculator", 9e-5, 6e-5, 3.75, 1422, 40, 8),
        AugmentationType("qa", "multi-hop Wikipedia", 0.69, 0.17, 2.52, 1846, 40, 250),
        AugmentationType("virtual_env", "ALFWorld", 0.09, 0.014, 28.18, 2185, 15, 30),
        AugmentationType("chatbot", "ShareGPT multi-turn", 28.6, 15.6, 4.45, 753, 90, 35),
        AugmentationType("image", "Stable Diffusion", 20.03, 7.8, 6.91, 1247, 40, 10),
        AugmentationType("tts", "Bark", 17.24, 7.6, 6.91, 1251, 40, 10),
    )
}

TOOLBENCH_TOOLS: tuple[ApiTool, ...] = tuple(
    ApiTool(name, mean, mean / 2)
    for name, mean in (
        ("search", 4.0),
        ("finance", 8.0),
        ("weather", 12.0),
        ("data", 16.0),
        ("media", 20.0),
    )
)
_TOOL_MEAN = sum(t.mean_s for t in TOOLBENCH_TOOLS) / len(TOOLBENCH_TOOLS)
_TOOL_SECOND_MOMENT = sum(t.std_s**2 + t.mean_s**2 for t in TOOLBENCH_TOOLS) / len(TOOLBENCH_TOOLS)
TOOLBENCH = AugmentationType(
    name="toolbench",
    source="ToolBench-like multi-API (shape of ../shared/gpu/README.md)",
    api_time_mean_s=_TOOL_MEAN,  # 12 s
    api_time_std_s=math.sqrt(_TOOL_SECOND_MOMENT - _TOOL_MEAN**2),  # of the mixture, ~8.7 s
    calls_per_request=4.0,
    context_tokens=540 + 5 * 74 + 4 * 50,
    decode_tokens=74,
    return_tokens=50,
    tools=TOOLBENCH_TOOLS,
)

# Every name a generated workload may give a call (`api_type`): what the simulated API records.
API_TYPE_NAMES: frozenset[str] = frozenset(
    {*AUGMENTATION_TYPES, *(tool.name for tool in TOOLBENCH_TOOLS)}
)

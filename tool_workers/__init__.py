"""Tool workers for LAMPS: tools, their registry, call statistics and the worker."""

from tool_workers.calculator import Calculator, CalculatorArgs
from tool_workers.http_get import HttpGet, HttpGetArgs
from tool_workers.registry import ToolRegistry, default_registry
from tool_workers.simulated_api import SimulatedApi, SimulatedApiArgs, sample_duration
from tool_workers.stats import (
    StatsUnavailableError,
    ToolCallCounts,
    ToolDurationEstimate,
    ToolStatsStore,
)
from tool_workers.tools import (
    Tool,
    ToolArgs,
    ToolArgumentsError,
    ToolError,
    ToolOutput,
    ToolResult,
    UnknownToolError,
)
from tool_workers.worker import ToolWorker

__all__ = [
    "Calculator",
    "CalculatorArgs",
    "HttpGet",
    "HttpGetArgs",
    "SimulatedApi",
    "SimulatedApiArgs",
    "StatsUnavailableError",
    "Tool",
    "ToolArgs",
    "ToolArgumentsError",
    "ToolCallCounts",
    "ToolDurationEstimate",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolResult",
    "ToolStatsStore",
    "ToolWorker",
    "UnknownToolError",
    "default_registry",
    "sample_duration",
]

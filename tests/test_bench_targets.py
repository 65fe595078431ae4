"""The engine-only bench target learns call durations in process, as a replica does from Redis."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lamps.bench_targets import LearnedDurations
from lamps_core.call_durations import CallDurationSummary
from tool_workers.stats import API_ESTIMATES_REFRESH_S
from tool_workers.tools import ToolResult


def call(tool: str, seconds: float) -> ToolResult:
    return ToolResult(tool=tool, ok=True, duration_s=seconds, started_at=datetime.now(UTC))


def test_durations_are_learned_per_name_and_refreshed_on_the_replicas_schedule() -> None:
    now = [0.0]
    durations = LearnedDurations(clock=lambda: now[0])
    assert durations.estimates() is None  # nothing recorded: the predictor's default
    for seconds in (1.0, 3.0):
        durations.record(call("search", seconds))
    durations.record(call("qa", 0.2))
    now[0] = API_ESTIMATES_REFRESH_S  # the next refresh
    estimates = durations.estimates()
    assert estimates is not None and set(estimates) == {"search", "qa"}
    search = estimates["search"]
    assert isinstance(search, CallDurationSummary)  # a distribution, as a replica sends
    assert search.mean_s == pytest.approx(2.0, rel=0.2)  # recency-weighted: the newest counts most
    assert search.max_s == 3.0
    durations.record(call("search", 30.0))
    assert durations.estimates() == estimates  # between refreshes: what was sent before
    now[0] += API_ESTIMATES_REFRESH_S
    refreshed = durations.estimates()
    assert refreshed is not None and refreshed["search"].max_s == 30.0  # type: ignore[union-attr]

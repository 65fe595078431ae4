"""The engine-only bench target learns call durations in process, as a replica does from Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from lamps.bench_targets import LearnedDurations, bench_engine_settings, with_engine_settings
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


BENCH_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve-bench-gpu.yaml"


def test_engine_setting_overrides_reach_the_engine_and_its_swap_connector() -> None:
    base = yaml.safe_load(BENCH_CONFIG.read_text())
    config = with_engine_settings(base, ["swap_copy_stream=false", "max_model_len = 2048"])
    settings = bench_engine_settings(config, Path("/project"))
    assert settings.swap_copy_stream is False
    assert settings.max_model_len == 2048
    connector = settings._swap_connector()
    assert connector is not None and connector.kv_connector_extra_config["copy_stream"] is False
    # The file's own config is untouched, and without overrides the default stands.
    assert bench_engine_settings(base, Path("/project")).swap_copy_stream is True


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("swap_copy_stream", "expected KEY=VALUE"),
        ("=true", "expected KEY=VALUE"),
        ("copy_stream=false", "'copy_stream' is not an engine setting"),
        ("swap_copy_stream=[unclosed", "the value is not YAML"),
    ],
)
def test_engine_setting_overrides_refuse_what_is_not_a_setting(item: str, message: str) -> None:
    base = yaml.safe_load(BENCH_CONFIG.read_text())
    with pytest.raises(SystemExit, match=message):
        with_engine_settings(base, [item])


def test_an_engine_setting_of_the_wrong_type_is_a_clear_error() -> None:
    config = with_engine_settings(yaml.safe_load(BENCH_CONFIG.read_text()), ["max_model_len=big"])
    with pytest.raises(
        SystemExit, match="engine settings: max_model_len: Input should be a valid integer"
    ):
        bench_engine_settings(config, Path("/project"))


def test_learned_durations_are_bounded_by_the_tools_timeouts() -> None:
    """As the worker's records are summarised for a replica: the tool's limit bounds a call."""
    now = [0.0]
    durations = LearnedDurations({"search": 4.0}, clock=lambda: now[0])
    for seconds in (1.0, 3.0):
        durations.record(call("search", seconds))
    durations.record(call("qa", 0.2))
    estimates = durations.estimates()
    assert estimates is not None
    search, qa = estimates["search"], estimates["qa"]
    assert isinstance(search, CallDurationSummary) and search.timeout_s == 4.0
    assert isinstance(qa, CallDurationSummary) and qa.timeout_s is None  # no limit known
    assert search.expected_remaining_s(3.5) <= 0.5  # never past the limit

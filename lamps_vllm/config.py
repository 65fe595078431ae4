"""The LAMPS section of a vLLM config: how the engine replica tells the scheduler plugin, which
runs in vLLM's engine-core process, which policy to run (`VllmConfig.additional_config`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lamps_core.policies import POLICY_NAMES

ADDITIONAL_CONFIG_KEY = "lamps"


class SchedulerPluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(default="lamps", description=f"One of {', '.join(POLICY_NAMES)}.")
    policy_options: dict[str, Any] = Field(default_factory=dict)
    swap_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Host<->device copy rate of the swap path; measured (host memory copy) "
        "when unset, which is right for CPU engines only.",
    )
    max_preserve_s: float = Field(
        default=600.0, gt=0, description="Longest a paused request's KV cache is held for it."
    )

    def to_additional_config(self) -> dict[str, Any]:
        return {ADDITIONAL_CONFIG_KEY: self.model_dump()}

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SchedulerPluginConfig:
        if isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config:
            return cls.model_validate(additional_config[ADDITIONAL_CONFIG_KEY])
        return cls()

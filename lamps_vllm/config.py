"""The LAMPS section of a vLLM config: how the engine replica tells the scheduler plugin, which
runs in vLLM's engine-core process, which policy to run (`VllmConfig.additional_config`)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lamps_core.costs import EngineCosts
from lamps_core.policies import POLICY_NAMES, make_policy

ADDITIONAL_CONFIG_KEY = "lamps"
# Variants are built at engine start-up and each is consulted on every finished request: a
# handful (a benchmark's policies) is what they are for.
MAX_POLICY_VARIANTS = 16
VARIANT_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Stand-ins for the engine's measured costs, only to see that a policy's options build; the
# scheduler builds the real objects with the costs it measures.
_TRIAL_COSTS = EngineCosts(
    kv_bytes_per_token=1,
    fwd_intercept_s=0.01,
    fwd_slope_s=1e-4,
    swap_slope_s=1e-9,
    decode_step_s=0.02,
)


def check_policy(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError unless policy `name` builds with `options` (names, types and values),
    so a bad config fails where it is read, not in the engine-core process."""
    make_policy(name, costs=_TRIAL_COSTS, **options)


class PolicyVariant(BaseModel):
    """A policy, with its options, that requests may name by label (`RequestMeta.policy_variant`):
    how a benchmark runs several policies one after another on one engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(description=f"One of {', '.join(POLICY_NAMES)}.")
    policy_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> PolicyVariant:
        check_policy(self.policy, self.policy_options)
        return self


class LengthModelConfig(BaseModel):
    """The learned output-length model of chat segments (lamps_core/length_model.py). The
    engine replica holds it: it forecasts each chat segment's decode length, learns from every
    completed one, and refits in the background."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(
        default=None,
        description="File (.npz) to load the model from at start-up and save it to after each "
        "refit; relative to the project. None: start from the prior, learn in memory only.",
    )
    refit_every_s: float = Field(
        default=300.0, gt=0, description="How often the replica refits it in the background."
    )
    min_new_examples: int = Field(
        default=16, ge=1, description="Completed segments since the last fit that a refit needs."
    )
    buffer_size: int = Field(
        default=4096,
        ge=1,
        le=8192,  # a refit's dense matrix: 8192 x 4096 features x 4 bytes = 128 MiB at most
        description="Most recent segments trained on.",
    )


class SchedulerPluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(default="lamps", description=f"One of {', '.join(POLICY_NAMES)}.")
    policy_options: dict[str, Any] = Field(default_factory=dict)
    policy_variants: dict[str, PolicyVariant] = Field(
        default_factory=dict,
        description="Policies requests may choose by label, all built at start-up; none: every "
        "request runs `policy` (requests cannot choose).",
    )
    swap_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Host<->device copy rate of the swap path; measured (host memory copy) "
        "when unset, which is right for CPU engines only.",
    )
    max_preserve_s: float = Field(
        default=600.0, gt=0, description="Longest a paused request's KV cache is held for it."
    )
    length_model: LengthModelConfig = Field(
        default_factory=LengthModelConfig,
        description="Chat segments' output-length forecasts (the engine replica's; the plugin "
        "reads them from each request's meta).",
    )

    @model_validator(mode="after")
    def _default_builds(self) -> SchedulerPluginConfig:
        check_policy(self.policy, self.policy_options)
        return self

    @field_validator("policy_variants", mode="before")
    @classmethod
    def _bounded_variants(cls, variants: Any) -> Any:
        # Before the variants are built: a config with thousands is refused without building any.
        if not isinstance(variants, dict):
            return variants  # pydantic's own error says what was expected
        if len(variants) > MAX_POLICY_VARIANTS:
            raise ValueError(f"at most {MAX_POLICY_VARIANTS} policy variants, got {len(variants)}")
        for label in variants:
            if not isinstance(label, str) or not VARIANT_LABEL.fullmatch(label):
                raise ValueError(
                    f"policy variant label {label!r} must be 1-64 characters of A-Z a-z 0-9 _ . -"
                )
        return variants

    def to_additional_config(self) -> dict[str, Any]:
        return {ADDITIONAL_CONFIG_KEY: self.model_dump()}

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SchedulerPluginConfig:
        if isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config:
            return cls.model_validate(additional_config[ADDITIONAL_CONFIG_KEY])
        return cls()

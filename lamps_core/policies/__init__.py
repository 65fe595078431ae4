"""The policies a deployment can choose by name in its Serve config."""

from __future__ import annotations

from typing import Any

from lamps_core.policies.fcfs_discard import VllmPolicy
from lamps_core.policy import SchedulingPolicy

_POLICIES: dict[str, type[SchedulingPolicy]] = {VllmPolicy.name: VllmPolicy}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


class UnknownPolicyError(ValueError):
    pass


def make_policy(name: str, **options: Any) -> SchedulingPolicy:
    try:
        policy_cls = _POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown scheduling policy {name!r}; known: {', '.join(POLICY_NAMES)}"
        ) from None
    return policy_cls(**options)

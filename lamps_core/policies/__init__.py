"""The policies a deployment can choose by name in its Serve config.

`make_policy(name, costs=..., **options)`: `options` are the Serve config's `policy_options`, and
`costs` the engine's profiled `EngineCosts` (or a dict of them), passed to the policies that use
them (all but `vllm`). A misspelt or misplaced option is a `ValueError` naming it, not a silently
ignored setting.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from lamps_core.costs import EngineCosts
from lamps_core.policies.fcfs_discard import VllmPolicy
from lamps_core.policies.fixed import FixedStrategyPolicy
from lamps_core.policies.infercept import InferceptPolicy
from lamps_core.policies.lamps import LampsPolicy
from lamps_core.policies.sjf import SjfPolicy
from lamps_core.policy import SchedulingPolicy

_POLICIES: dict[str, type[SchedulingPolicy]] = {
    cls.name: cls
    for cls in (VllmPolicy, InferceptPolicy, SjfPolicy, LampsPolicy, FixedStrategyPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


class UnknownPolicyError(ValueError):
    pass


class PolicyOptionError(ValueError):
    pass


def policy_options(name: str) -> tuple[str, ...]:
    """The keyword options policy `name` takes, `costs` included where it needs them."""
    params = inspect.signature(_policy_class(name)).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def make_policy(
    name: str, costs: EngineCosts | Mapping[str, Any] | None = None, **options: Any
) -> SchedulingPolicy:
    policy_cls = _policy_class(name)
    accepted = policy_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(o for o in accepted if o != "costs") or "none"
        raise PolicyOptionError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for policy {name!r}; "
            f"its options: {known}"
        )
    hints = typing.get_type_hints(policy_cls.__init__)
    for option, value in options.items():
        if option in hints and not _has_type(value, hints[option]):
            raise PolicyOptionError(
                f"option {option!r} of policy {name!r} must be {_type_name(hints[option])}, "
                f"got {value!r}"
            )
    if "costs" in accepted:
        if costs is None:
            raise PolicyOptionError(f"policy {name!r} needs the engine's costs (costs=EngineCosts)")
        options["costs"] = EngineCosts.coerce(costs)
    try:
        return policy_cls(**options)
    except TypeError as error:  # a value of the wrong type deep in a constructor
        raise PolicyOptionError(f"bad options for policy {name!r}: {error}") from error


def _policy_class(name: str) -> type[SchedulingPolicy]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown scheduling policy {name!r}; known: {', '.join(POLICY_NAMES)}"
        ) from None


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits a constructor annotation (the few kinds options use: unions, None,
    numbers, classes). Serve configs come from YAML, so an int passes for a float, never a bool
    for a number."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))

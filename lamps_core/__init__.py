"""The scheduling brain of LAMPS: request models, strategies and policies.

Pure Python: nothing here imports Ray or vLLM, so the same policy code runs inside the vLLM
scheduler plugin, in simulators and in unit tests.
"""

from lamps_core.policies import POLICY_NAMES, make_policy
from lamps_core.policy import EngineView, PausedCall, QueuedRequest, SchedulingPolicy, Strategy
from lamps_core.request_meta import META_KEY, RequestMeta
from lamps_core.trace import TraceScript, TraceSegment

__all__ = [
    "META_KEY",
    "POLICY_NAMES",
    "EngineView",
    "PausedCall",
    "QueuedRequest",
    "RequestMeta",
    "SchedulingPolicy",
    "Strategy",
    "TraceScript",
    "TraceSegment",
    "make_policy",
]

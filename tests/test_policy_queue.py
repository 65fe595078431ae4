"""The waiting queue the scheduler plugin installs orders vLLM's own Request objects by the
policy: with the vLLM baseline, by the arrival of the whole augmented request."""

from __future__ import annotations

from vllm import SamplingParams
from vllm.v1.request import Request

from lamps_core import EngineView, RequestMeta, make_policy
from lamps_vllm.request_queue import PolicyRequestQueue
from lamps_vllm.scheduler import LampsScheduler


def request(engine_id: str, engine_arrival: float, logical_arrival: float | None) -> Request:
    extra = None
    if logical_arrival is not None:
        meta = RequestMeta(request_id=engine_id.split("-")[0], arrival_time=logical_arrival)
        extra = meta.to_extra_args()
    return Request(
        request_id=engine_id,
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(max_tokens=4, extra_args=extra),
        pooling_params=None,
        arrival_time=engine_arrival,
    )


def queue() -> PolicyRequestQueue:
    # The plugin's own view function, without building a whole scheduler.
    view_owner = LampsScheduler.__new__(LampsScheduler)
    view_owner._tracked = {}
    view_owner._scheduling_steps = 0
    view_owner._policies = {}
    view_owner.lamps_policy = make_policy("vllm")
    engine = EngineView(now=0.0, running_tokens=0, free_blocks=100, total_blocks=100, block_size=16)
    return PolicyRequestQueue(view_owner._priority, lambda: engine)


def test_resumed_segment_keeps_its_requests_place() -> None:
    q = queue()
    newcomer = request("b-s0", engine_arrival=10.0, logical_arrival=10.0)
    resumed = request("a-s1", engine_arrival=12.0, logical_arrival=5.0)  # request a came first
    plain = request("c", engine_arrival=11.0, logical_arrival=None)  # not from our serving layer
    for r in (newcomer, resumed, plain):
        q.add_request(r)
    assert [r.request_id for r in q] == ["a-s1", "b-s0", "c"]
    assert q.peek_request() is resumed
    assert [q.pop_request().request_id for _ in range(3)] == ["a-s1", "b-s0", "c"]
    assert not q


def test_remove_and_prepend_keep_policy_order() -> None:
    q = queue()
    rs = [request(f"r{i}-s0", engine_arrival=float(i), logical_arrival=float(i)) for i in range(5)]
    for r in rs:
        q.add_request(r)
    q.remove_requests([rs[1], rs[3]])
    assert [r.request_id for r in q] == ["r0-s0", "r2-s0", "r4-s0"]
    first = q.pop_request()
    q.prepend_request(first)  # vLLM prepends a request it could not schedule this step
    assert q.peek_request() is first and len(q) == 3


def test_rerank_moves_only_what_changed_and_keeps_ties_in_order() -> None:
    boosted: set[str] = set()

    def priority(r: Request, engine: EngineView) -> tuple[float, ...]:
        return (0.0 if r.request_id in boosted else 1.0,)  # everyone ties until boosted

    engine = EngineView(now=0.0, running_tokens=0, free_blocks=100, total_blocks=100, block_size=16)
    q = PolicyRequestQueue(priority, lambda: engine)
    rs = [request(f"r{i}-s0", engine_arrival=float(i), logical_arrival=None) for i in range(5)]
    for r in rs:
        q.add_request(r)
    q.rerank(engine)  # nothing changed: insertion order stands
    assert [r.request_id for r in q] == [f"r{i}-s0" for i in range(5)]
    boosted.update({"r3-s0", "r1-s0"})
    assert q.peek_request() is rs[0]  # a changed priority counts only from the next re-rank
    q.rerank(engine)
    assert [r.request_id for r in q] == ["r1-s0", "r3-s0", "r0-s0", "r2-s0", "r4-s0"]
    assert q.pop_request() is rs[1]

"""A vLLM `RequestQueue` ordered by a priority function (a `lamps_core` policy's).

vLLM's scheduler only peeks, pops, prepends and removes; it never looks at how the queue orders
requests, so replacing its FCFS deque with this queue changes the order and nothing else.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from lamps_core.policy import EngineView, Priority

# (priority, insertion number, request): the number breaks ties in insertion order and keeps
# heapq from ever comparing two Request objects.
_Entry = tuple[Priority, int, Request]


class PolicyRequestQueue(RequestQueue):
    def __init__(
        self,
        priority: Callable[[Request, EngineView], Priority],
        engine_view: Callable[[], EngineView],
    ) -> None:
        self._priority = priority
        self._engine_view = engine_view
        self._heap: list[_Entry] = []
        self._counter = itertools.count()

    def _entry(self, request: Request, engine: EngineView) -> _Entry:
        return (self._priority(request, engine), next(self._counter), request)

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, self._entry(request, self._engine_view()))

    def pop_request(self) -> Request:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[2]

    def head_entry(self) -> tuple[Priority, int]:
        """The head's rank and insertion number: how two queues of one policy compare heads."""
        if not self._heap:
            raise IndexError("peek from an empty queue")
        priority, number, _ = self._heap[0]
        return priority, number

    def peek_request(self) -> Request:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][2]

    # vLLM prepends preempted and skipped requests to retry them first; under a policy their
    # priority decides, and a policy that ranks by arrival puts them back in front anyway.
    def prepend_request(self, request: Request) -> None:
        self.add_request(request)

    def prepend_requests(self, requests: RequestQueue) -> None:
        engine = self._engine_view()
        for request in requests:
            heapq.heappush(self._heap, self._entry(request, engine))

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
        heapq.heapify(self._heap)

    def rerank(self, engine: EngineView) -> None:
        """Recompute every priority: for policies whose priorities change while requests wait.
        Most do not change between two re-ranks (a cached score): the heap is rebuilt only when
        one did, and entries keep their insertion numbers, so ties keep their order."""
        heap, priority, changed = self._heap, self._priority, False
        for i, (old, number, request) in enumerate(heap):
            new = priority(request, engine)
            if new is not old and new != old:
                heap[i] = (new, number, request)
                changed = True
        if changed:
            heapq.heapify(heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])))

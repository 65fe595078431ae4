"""The one table of what the engine holds for paused requests, and the one way it lets go.

A paused request (a segment that ended in an API call) may leave KV behind: its block table kept
on the device (Preserve, Keep) or a copy in the swap connector's host pool (Swap, at the pause or
after a demotion). Each such hold is one `Hold` here, keyed by its owner, the augmented request's
server-issued id, with a deadline set once when the call paused (`max_preserve_s` later) that a
demotion from device to host does not move. Every ending goes through `release`:

    resumed      the next segment was scheduled (it took the blocks, or loaded the copy)
    replaced     a new pause of the same owner while an older hold was still there
    done         the augmented request ended (finished, failed, cancelled): the serving layer's
                 unconditional last word for every request
    expired      past its deadline: its continuation never came
    demoted      the policy gave the device blocks back (Discard) to free memory

A device hold that the policy demotes to Swap is not released: it moves to the host
(`moved_to_host`) and keeps its deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lamps_core.policy import PausedCall, Strategy


@dataclass(slots=True)
class Hold:
    owner: str  # the augmented request's server-issued id
    call: PausedCall  # the policy's view of the paused call (its strategy may change)
    deadline: float  # time.time() past which nothing is held for it
    request: Any | None  # the finished segment owning the kept blocks (vLLM Request); None on host
    num_blocks: int  # device blocks held (0 once on the host)
    on_host: bool = False  # its KV is a copy in the host pool

    @property
    def promised(self) -> bool:
        """Blocks admission counts as taken: a preserved call's (its continuation comes back to
        them); kept blocks are promised to nobody and go first when memory is needed."""
        return not self.on_host and self.call.strategy is Strategy.PRESERVE


class HoldTable:
    """`free_blocks(request)` gives a kept block table back to vLLM's pool (where the prefix cache
    may still find it); `drop_host(owner)` drops a host-pool copy (None: no swap path)."""

    def __init__(
        self,
        free_blocks: Callable[[Any], None],
        drop_host: Callable[[str], bool] | None,
        max_hold_s: float,
    ) -> None:
        self._free_blocks = free_blocks
        self._drop_host = drop_host
        self.max_hold_s = max_hold_s
        self._holds: dict[str, Hold] = {}
        # Kept up to date as holds come, move and go: the engine reads them at every step, and
        # a replica at load holds hundreds of calls (no pass over the table per read).
        self._device = self._device_blocks = self._promised_blocks = self._kept = 0
        self._earliest_deadline = math.inf  # a lower bound: no hold expires before it

    # ---- reading ----

    def __contains__(self, owner: object) -> bool:
        return owner in self._holds

    def __len__(self) -> int:
        return len(self._holds)

    def get(self, owner: str) -> Hold | None:
        return self._holds.get(owner)

    def on_device(self) -> Iterator[Hold]:
        return (h for h in self._holds.values() if not h.on_host)

    def device_blocks(self) -> int:
        return self._device_blocks

    def promised_blocks(self) -> int:
        return self._promised_blocks

    def has_promised(self) -> bool:
        """Whether some hold is preserved on the device (a policy reviews those every step)."""
        return self._device > self._kept

    def snapshot(self) -> dict[str, int]:
        return {
            "holds": len(self._holds),
            "device_holds": self._device,
            "device_blocks": self._device_blocks,
            "kept_holds": self._kept,
            "host_holds": len(self._holds) - self._device,
        }

    def _count(self, hold: Hold, sign: int) -> None:
        if hold.on_host:
            return
        self._device += sign
        self._device_blocks += sign * hold.num_blocks
        if hold.promised:
            self._promised_blocks += sign * hold.num_blocks
        if hold.call.strategy is Strategy.KEEP:
            self._kept += sign

    def _add(self, hold: Hold) -> None:
        self._holds[hold.owner] = hold
        self._count(hold, +1)
        self._earliest_deadline = min(self._earliest_deadline, hold.deadline)

    # ---- adding ----

    def hold_on_device(self, owner: str, call: PausedCall, request: Any, num_blocks: int) -> None:
        """The pausing segment's block table stays (Preserve, Keep)."""
        self._add(Hold(owner, call, call.paused_at + self.max_hold_s, request, num_blocks))

    def hold_on_host(self, owner: str, call: PausedCall) -> None:
        """The pausing segment's KV is being copied to the host pool (Swap at the pause)."""
        self._add(Hold(owner, call, call.paused_at + self.max_hold_s, None, 0, True))

    def moved_to_host(self, owner: str) -> None:
        """A device hold demoted to Swap: the connector copies the blocks out and frees them
        itself; the hold stays, on the host, with its deadline."""
        hold = self._holds[owner]
        self._count(hold, -1)
        hold.request, hold.num_blocks, hold.on_host = None, 0, True
        hold.call.strategy = Strategy.SWAP

    # ---- letting go: the one path ----

    def release(self, owner: str, reason: str) -> Hold | None:
        """Whatever is held for `owner` goes now; the hold released (None: nothing was)."""
        hold = self._holds.pop(owner, None)
        if hold is None:
            return None
        self._count(hold, -1)
        if hold.request is not None:
            self._free_blocks(hold.request)
        if self._drop_host is not None and reason != "resumed":
            # A resumed continuation consumed the copy itself (or the connector dropped it as
            # not matching); any other ending drops it.
            self._drop_host(owner)
        return hold

    def expired(self, now: float) -> list[str]:
        if now < self._earliest_deadline:
            return []
        expired = [owner for owner, hold in self._holds.items() if hold.deadline <= now]
        self._earliest_deadline = min(
            (h.deadline for h in self._holds.values() if h.deadline > now), default=math.inf
        )
        return expired

"""Engine costs measured on the engine that serves, from inside its scheduler.

- `M` (KV bytes per token) comes from the KV cache the engine allocated.
- `T_fwd(C)` and the decode step time come from timing the engine's own steps: the scheduler
  sees each step's schedule leave and its output come back, so a step that only prefilled
  gives a (tokens, seconds) point, and every step that decoded a sample of the decode step's
  cost by batch size and context (`costs.fit_decode_step`, fitted over all recent steps, so it
  follows the load; a median of decode-only steps went stale under load). The engine
  replica runs a few prefills of different sizes at start-up so the fit exists before traffic;
  serving keeps refining it (`refresh` starts over, e.g. after a hardware change).
- `T_swap(C)`: the copy rate of the engine's swap path; on a CPU engine a host memory copy,
  measured here; on GPUs the configured host<->device rate (the engine-core process must not
  create a CUDA context of its own).
The latest fit is cached on disk, keyed by model and engine shape, and read at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections import deque
from pathlib import Path

import torch

from lamps_core.costs import EngineCosts, StepSample, fit_decode_step, fit_linear

logger = logging.getLogger(__name__)

_MAX_POINTS = 256
# Until an engine has been measured: a prefill of C tokens ~ 10 ms + 0.1 ms per token, a decode
# step 20 ms. Replaced by the first fit, seconds after start-up.
_UNMEASURED = {"fwd_intercept_s": 0.01, "fwd_slope_s": 1e-4, "decode_step_s": 0.02}
# The fit changes with almost every prefill-only step while serving; the cache on disk only has
# to survive a restart, so it is written at most this often (the first fit at once).
_SAVE_EVERY_S = 60.0
# The decode-step fit (a least squares over the window, ~0.2 ms) runs every this many decoding
# steps, not at every one: a GPU step is ~10 ms.
_DECODE_FIT_EVERY = 32


def host_copy_seconds_per_byte(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Seconds per byte of a host memory copy: the swap rate of a CPU engine."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch pages outside the timing
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return best / nbytes


class StepProfiler:
    def __init__(
        self, kv_bytes_per_token: int, swap_seconds_per_byte: float, cache_file: Path | None
    ) -> None:
        self._m = kv_bytes_per_token
        self._swap_s_per_byte = swap_seconds_per_byte
        self._cache_file = cache_file
        self._prefill: deque[tuple[int, float]] = deque(maxlen=_MAX_POINTS)
        self._decode: deque[float] = deque(maxlen=_MAX_POINTS)  # decode-only steps
        self._steps: deque[StepSample] = deque(maxlen=_MAX_POINTS)  # every step that decoded
        self._steps_since_fit = 0
        self._fitted = dict(_UNMEASURED)
        self._saved_at = -_SAVE_EVERY_S
        self._load()
        self.costs = self._make_costs()

    def observe(
        self,
        prefill_tokens: int,
        decode_requests: int,
        seconds: float,
        decode_context_tokens: int = 0,
    ) -> bool:
        """One step's work and time; returns True when the costs changed."""
        if prefill_tokens and not decode_requests:
            self._prefill.append((prefill_tokens, seconds))
            return self._refit()
        if decode_requests and not prefill_tokens:
            self._decode.append(seconds)
        if not decode_requests:
            return False
        self._steps.append(
            StepSample(prefill_tokens, decode_requests, decode_context_tokens, seconds)
        )
        self._steps_since_fit += 1
        if self._steps_since_fit < _DECODE_FIT_EVERY and len(self._decode) != 8:
            return False
        self._steps_since_fit = 0
        return self._refit()

    def refresh(self) -> None:
        self._prefill.clear()
        self._decode.clear()
        self._steps.clear()
        self._saved_at = -_SAVE_EVERY_S  # the new measurements replace the cached ones at once

    def _refit(self) -> bool:
        fitted = dict(self._fitted)
        if len({tokens for tokens, _ in self._prefill}) >= 2:
            fitted["fwd_intercept_s"], fitted["fwd_slope_s"] = fit_linear(list(self._prefill))
        decode_step = fit_decode_step(self._steps) if len(self._steps) >= 16 else None
        if decode_step is not None:
            fitted["decode_step_s"] = decode_step
        elif len(self._decode) >= 8:  # too little variety to fit: the decode-only median
            fitted["decode_step_s"] = statistics.median(self._decode)
        if fitted == self._fitted:
            return False
        self._fitted = fitted
        self.costs = self._make_costs()
        self._save()
        return True

    def _make_costs(self) -> EngineCosts:
        return EngineCosts(
            kv_bytes_per_token=self._m,
            swap_slope_s=self._swap_s_per_byte * self._m,
            **self._fitted,
        )

    def _load(self) -> None:
        if self._cache_file is None or not self._cache_file.exists():
            return
        try:
            cached = json.loads(self._cache_file.read_text())
            self._fitted = {key: float(cached[key]) for key in _UNMEASURED}
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable engine cost cache %s: %s", self._cache_file, exc)

    def _save(self) -> None:
        now = time.monotonic()
        if self._cache_file is None or now - self._saved_at < _SAVE_EVERY_S:
            return
        self._saved_at = now
        try:
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._make_costs().to_dict(), indent=1))
            tmp.replace(self._cache_file)
        except OSError as exc:
            logger.warning("cannot cache engine costs in %s: %s", self._cache_file, exc)


def cost_cache_file(cache_root: Path, *shape: object) -> Path:
    """The cache file of one engine shape (model, dtype, block size, device...)."""
    digest = hashlib.sha256(json.dumps([str(s) for s in shape]).encode()).hexdigest()[:16]
    return cache_root / "lamps" / f"engine-costs-{digest}.json"

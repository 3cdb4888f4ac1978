"""Downloads in flight sized to the work (Little's law), not fixed.

A run's download rate is downloads in flight ÷ seconds a URL holds a slot. So the run holds

    in flight = URL rate the GPU tier needs × mean slot seconds per URL

where the URL rate the GPU tier needs is its image rate (a configured capacity, or the rate it is
observed to take while images wait for it) × headroom ÷ the share of URLs that yield an image. While
the GPU tier waits on downloads (its rate is then unknown: it takes whatever arrives) and the current
limit (or the fetcher's look-ahead, which follows it) is in use, the limit grows by ``growth`` a
step: the probe ends when images start to queue for the GPU, at a bound, or at overload.

More downloads in flight only help while something else waits: when the seconds a successful
download holds its slot rise to ``overload_factor`` times their unloaded level, the downloads queue
behind something saturated (our CPU, our link, the hosts) and the limit shrinks by ``shrink``; above
that level it grows by 5% a step instead of by ``growth`` (TCP's congestion avoidance).

Bounds: at least the legacy ``prefetch_concurrent_downloads`` (the starting and minimum value), at most
the ceiling, the bodies the byte cap can hold, and this run's share of a machine-wide budget shared
by every live run on the machine (:class:`MachineBudget`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# Bodies are assumed at least this large when the byte cap bounds the count (a few small images
# must not let thousands of downloads in).
MIN_ASSUMED_BODY_BYTES = 64 * 1024
# Weight of the newest step in the running means (slot seconds per URL, images per URL).
SMOOTHING = 0.3
# Share a step lets the unloaded slot time of a successful download rise by.
BASELINE_DRIFT = 0.05
# Steps after a shrink before overload is judged again.
OVERLOAD_COOLDOWN_STEPS = 3


@dataclass(frozen=True)
class InFlightBounds:
    # the legacy prefetch_concurrent_downloads: the starting and the minimum value
    floor: int
    # most downloads in flight for one run
    ceiling: int
    # body bytes all downloads in flight may hold together (None: unbounded here)
    byte_cap: int | None = None
    # image rate the GPU tier can take (images/s); 0 = learn it from the images waiting for it
    gpu_capacity_images_per_s: float = 0.0
    # the target rate is the GPU tier's rate times this
    headroom: float = 1.25
    # factor a step grows the limit by while the GPU tier waits on downloads, until an overload is
    # seen (TCP's slow start doubles per round trip too): from the legacy 15 to 700 in six steps,
    # where 1.25 took eighteen and a shard of a few thousand URLs was half done before the ramp was
    growth: float = 2.0
    # successful downloads holding their slot this many times longer than unloaded mean overload
    overload_factor: float = 4.0
    # factor a step shrinks the limit by under overload
    shrink: float = 0.8
    # share of the GPU-side queue filled at which the GPU tier counts as the bottleneck
    gpu_backlog_fill: float = 0.5


@dataclass
class Sample:
    """Cumulative counters at one instant (the controller takes differences)."""

    at: float
    urls_completed: int
    slot_seconds: float
    # downloads that brought an image, and the seconds their slots were held
    ok_completed: int
    ok_slot_seconds: float
    images_to_gpu: int
    body_bytes: int
    in_flight: int | None
    gpu_queue_fill: float
    # leased URLs the fetcher has not taken yet (it takes a look-ahead that follows its limit)
    waiting_for_fetcher: int = 0


@dataclass
class InFlightController:
    bounds: InFlightBounds
    budget: MachineBudget | None = None
    limit: int = 0
    slot_s_per_url: float | None = None
    images_per_url: float | None = None
    bytes_per_image: float | None = None
    # seconds a successful download holds its slot: now, and the unloaded level (the lowest seen,
    # drifting up slowly so a web that is slower for good becomes the new level)
    ok_slot_s: float | None = None
    unloaded_ok_slot_s: float | None = None
    # the limit an overload was last seen below: multiplicative growth up to it, additive above
    # (TCP's slow start and congestion avoidance), and steps left before overload is judged again
    threshold: int | None = None
    cooldown: int = 0
    reason: str = "start"
    _last: Sample | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.limit = self._clamp(self.bounds.floor)

    def step(self, now: Sample) -> int:
        """The new limit after one interval whose counters end at ``now``."""
        last, self._last = self._last, now
        if last is None:
            return self.limit
        urls = now.urls_completed - last.urls_completed
        seconds = max(now.at - last.at, 1e-6)
        if urls > 0:
            self.slot_s_per_url = _mean(self.slot_s_per_url, (now.slot_seconds - last.slot_seconds) / urls)
            self.images_per_url = _mean(self.images_per_url, (now.images_to_gpu - last.images_to_gpu) / urls)
        oks = now.ok_completed - last.ok_completed
        if oks > 0:
            self.ok_slot_s = _mean(self.ok_slot_s, (now.ok_slot_seconds - last.ok_slot_seconds) / oks)
            drifted = (self.unloaded_ok_slot_s or self.ok_slot_s) * (1 + BASELINE_DRIFT)
            self.unloaded_ok_slot_s = min(drifted, self.ok_slot_s)
        images = now.images_to_gpu - last.images_to_gpu
        if images > 0 and now.body_bytes > last.body_bytes:
            self.bytes_per_image = _mean(self.bytes_per_image, (now.body_bytes - last.body_bytes) / images)
        gpu_rate = self.bounds.gpu_capacity_images_per_s or None
        if gpu_rate is None and now.gpu_queue_fill >= self.bounds.gpu_backlog_fill:
            gpu_rate = images / seconds  # images wait for the GPU tier: what it takes is what it can take
        self.cooldown = max(self.cooldown - 1, 0)
        if self._overloaded():
            want = self.threshold = max(math.floor(self.limit * self.bounds.shrink), self.bounds.floor)
            self.cooldown = OVERLOAD_COOLDOWN_STEPS  # the running mean needs a few steps to show the effect
            self.reason = (f"a download holds its slot {self.ok_slot_s:.2f} s, unloaded "
                           f"{self.unloaded_ok_slot_s:.2f} s: something is saturated, shrinking")  # fmt: skip
        elif gpu_rate and self.slot_s_per_url:
            url_rate = gpu_rate * self.bounds.headroom / max(self.images_per_url or 1.0, 0.05)
            want = math.ceil(url_rate * self.slot_s_per_url)
            # move at most a factor of two a step, so one odd interval cannot swing the limit
            want = min(max(want, self.limit // 2), self.limit * 2)
            self.reason = f"Little's law: {url_rate:.1f} URLs/s x {self.slot_s_per_url:.2f} s a slot"
        elif now.in_flight is None or now.in_flight >= 0.8 * self.limit or now.waiting_for_fetcher > 0:
            # in use, or the fetcher's look-ahead (which follows the limit) is full of URLs of hosts
            # that make them wait while other hosts' URLs queue here
            want = self._grown()
            self.reason = "the GPU tier waits on downloads and the limit or the look-ahead is in use: growing"
        else:
            want = self.limit
            self.reason = "the limit is not in use: holding"
        self.limit = self._clamp(want)
        return self.limit

    def _overloaded(self) -> bool:
        return (not self.cooldown and bool(self.unloaded_ok_slot_s)
                and self.ok_slot_s > self.bounds.overload_factor * self.unloaded_ok_slot_s)  # fmt: skip

    def _grown(self) -> int:
        if self.threshold is None or self.limit < self.threshold:
            grown = math.ceil(self.limit * self.bounds.growth)
            return grown if self.threshold is None else min(grown, self.threshold)
        return self.limit + max(1, self.limit // 20)

    def _clamp(self, want: int) -> int:
        bounds = self.bounds
        top = bounds.ceiling
        if bounds.byte_cap:
            top = min(top, bounds.byte_cap // max(int(self.bytes_per_image or 0), MIN_ASSUMED_BODY_BYTES))
        if self.budget is not None:
            top = min(top, self.budget.share(want))
        return max(bounds.floor, min(want, top))


def _mean(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value


class MachineBudget:
    """Downloads in flight across every run on this machine, shared through one small file per live
    run in ``folder`` (what the run wants, refreshed every step). A run gets what it wants while the
    others leave room, and never less than an equal share of the budget. Files of runs that stopped
    refreshing (killed) stop counting after ``stale_s``."""

    def __init__(self, folder: Path, owner: str, total: int, stale_s: float = 30.0) -> None:
        self.folder = folder
        self.total = total
        self.stale_s = stale_s
        self._file = folder / f"{owner}.json"
        folder.mkdir(parents=True, exist_ok=True)

    def share(self, want: int) -> int:
        others = self._others()
        fair = self.total // (len(others) + 1)
        allowed = max(fair, self.total - sum(others))
        granted = max(1, min(want, allowed))
        self._write(granted)
        return granted

    def _others(self) -> list[int]:
        now = time.time()
        wants = []
        for path in self.folder.glob("*.json"):
            if path == self._file:
                continue
            try:
                if now - path.stat().st_mtime > self.stale_s:
                    path.unlink(missing_ok=True)
                    continue
                wants.append(int(json.loads(path.read_text())["in_flight"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a file being replaced or removed right now
        return wants

    def _write(self, in_flight: int) -> None:
        scratch = self._file.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps({"in_flight": in_flight, "pid": os.getpid()}))
        scratch.replace(self._file)

    def close(self) -> None:
        self._file.unlink(missing_ok=True)

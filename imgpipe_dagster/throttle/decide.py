"""The throttle's decision, as a pure function: ``decide(inputs, state, settings) -> Decision``.

One tick reads its inputs (recent-window rates, ratios and latencies, GPU /health, backlog, runs in
flight), and this module turns them plus the previous state into what to do:

* **pause** when every known GPU server is down (unreachable, or reporting ``failed``), or when the
  failure ratio over the window (final failures plus retryable ones) reaches
  ``pause_failure_ratio``: then the network or the corpus is broken and more runs only burn
  retry budgets. Runs already in flight are left alone (their URLs keep their leases and retries).
* **resume** a GPU pause as soon as one server answers again; a failure pause after
  ``pause_min_s``, at the conservative profile, as a probe (if the probe fails the same way the
  window shows it and the throttle pauses again).
* **step down** one profile (aggressive → medium → conservative) when the window is *degraded*:
  failure ratio, timeout ratio, p95 download latency or p95 inference latency at or above its
  threshold (the inference threshold is the profile's ``critical_threshold_ms``).
* **step up** one profile only after ``healthy_period_s`` of consecutive *healthy* ticks, where
  healthy means every signal below ``healthy_fraction`` of its step-down threshold (inference
  p95 below the profile's ``slow_threshold_ms``) with at least ``min_samples`` results. The gap
  between the two thresholds, the healthy period, and ``min_dwell_s`` between two changes are the
  hysteresis: one bad window never flaps the profile back and forth.
* **submit** shard runs into the free slots: ``max_concurrent_workers`` of the profile in force
  minus the analysis runs in flight (the throttle's own, backfills and manual runs alike), at most
  ``max_submit_per_tick`` a tick, never a shard already in flight; nothing while the GPU servers'
  queues are nearly full (they already have more work than they can take).

No Dagster here: the sensor in imgpipe_dagster/sensors/throttle.py gathers the inputs and applies
the decision; tests drive this function directly with any clock.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import imgpipe_dagster.throttle.blame as blame
from imgpipe_dagster.profiles import PROFILE_NAMES, STEP_DOWN, STEP_UP, resolve

# Error classes (imgpipe_dagster.fetch.errors.ErrorClass values) that count as timeouts.
TIMEOUT_CLASSES = tuple(sorted(blame.TIMEOUTS))
SETTINGS_ENV_PREFIX = "IMGPIPE_THROTTLE_"

ACTIONS = ("submit", "hold", "idle", "step_down", "step_up", "pause", "resume")
PAUSE_GPU = "gpu_down"
PAUSE_FAILURES = "failures"


@dataclass(frozen=True)
class ProfileLimits:
    """The values of one profile the throttle uses."""

    # shard runs in flight at most
    max_concurrent_workers: int
    # p95 inference latency (ms) below which a window counts as healthy
    slow_threshold_ms: float
    # p95 inference latency (ms) at which the profile steps down
    critical_threshold_ms: float
    # total download deadline of one URL (ms); p95 downloads near it mean the network struggles
    download_timeout_ms: float


def profile_limits() -> dict[str, ProfileLimits]:
    """ProfileLimits of every profile, from profiles/<name>.yaml."""
    limits = {}
    for name in PROFILE_NAMES:
        worker, _ = resolve(name)
        limits[name] = ProfileLimits(
            max_concurrent_workers=worker.max_concurrent_workers,
            slow_threshold_ms=worker.slow_threshold_ms,
            critical_threshold_ms=worker.critical_threshold_ms,
            download_timeout_ms=worker.prefetch_download_timeout * 1000.0,
        )
    return limits


@dataclass(frozen=True)
class ThrottleSettings:
    """Throttle knobs; each can be set by IMGPIPE_THROTTLE_<FIELD> (e.g. IMGPIPE_THROTTLE_WINDOW_S=600)."""

    # seconds of recent results the rate, ratios and latencies are computed over
    window_s: float = 300.0
    # most recent results read per tick at most, so a tick costs the same at any rate
    window_max_rows: int = 50_000
    # results (final + retryable) needed in the window before its ratios and latencies count
    min_samples: int = 50
    # failure share of the window at which the profile steps down
    step_down_failure_ratio: float = 0.20
    # timeout share (read_timeout / connect_timeout / deadline) at which the profile steps down
    step_down_timeout_ratio: float = 0.10
    # p95 download latency, as a share of the profile's download deadline, at which it steps down
    step_down_download_fraction: float = 0.8
    # a window is healthy when every signal is below this share of its step-down threshold
    healthy_fraction: float = 0.5
    # seconds of consecutive healthy ticks before stepping up one profile
    healthy_period_s: float = 900.0
    # seconds after a profile change before the next change (the window must show the new profile)
    min_dwell_s: float = 300.0
    # failure share of the window that means the network or the corpus is broken: pause
    pause_failure_ratio: float = 0.90
    # seconds a failure pause lasts before a conservative probe
    pause_min_s: float = 600.0
    # shard runs requested per tick at most
    max_submit_per_tick: int = 8
    # profile when there is no cursor yet (the legacy default)
    start_profile: str = "medium"
    # highest profile the throttle steps up to
    max_profile: str = "aggressive"
    # GPU queue fill (queue_size / queue_capacity) at which no new runs are requested
    gpu_queue_hold_fraction: float = 0.9
    # seconds one GPU /health probe may take (a tick never waits longer on a server)
    health_timeout_s: float = 1.0
    # profile values by name; empty means profiles/*.yaml
    profiles: Mapping[str, ProfileLimits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (self.start_profile, self.max_profile):
            if name not in PROFILE_NAMES:
                raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}")
        if not self.profiles:
            object.__setattr__(self, "profiles", profile_limits())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ThrottleSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(SETTINGS_ENV_PREFIX + f.name.upper())
            if raw is None or f.name == "profiles":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(
                    f"{SETTINGS_ENV_PREFIX}{f.name.upper()}={raw!r} is not a {kind.__name__}"
                ) from None
        return cls(**{**values, **overrides})


# ----- inputs -----


@dataclass(frozen=True)
class WindowStats:
    """What happened over the recent window (url_analysis_results + URLs that became retryable)."""

    window_s: float
    # final outcomes written in the window (ok + failed)
    results: int = 0
    # final failures among them
    failed: int = 0
    # final failures that were timeouts
    timeouts: int = 0
    # URLs that failed and wait for a retry, last failure in the window
    retryable: int = 0
    retryable_timeouts: int = 0
    p95_inference_ms: float | None = None
    p95_download_ms: float | None = None
    # True when window_max_rows cut the window short (the rate is then a lower bound)
    capped: bool = False
    top_errors: tuple[tuple[str, int], ...] = ()
    # failures (final + retryable) that are the web's fault, not ours (throttle/blame.py), and the
    # timeouts among them: the ratios the throttle acts on leave them out
    web_failed: int = 0
    web_timeouts: int = 0
    # hosts seen in the window, and those with host-level failures (throttle/blame.py)
    hosts: int = 0
    hosts_failing: int = 0

    @property
    def samples(self) -> int:
        return self.results + self.retryable

    @property
    def failure_ratio(self) -> float:
        """Share of the window that failed by our fault (network, GPU tier, our code)."""
        ours = self.failed + self.retryable - self.web_failed
        return ours / self.samples if self.samples else 0.0

    @property
    def web_failure_ratio(self) -> float:
        return self.web_failed / self.samples if self.samples else 0.0

    @property
    def timeout_ratio(self) -> float:
        ours = self.timeouts + self.retryable_timeouts - self.web_timeouts
        return ours / self.samples if self.samples else 0.0

    @property
    def rate_per_s(self) -> float:
        return self.results / self.window_s if self.window_s else 0.0


@dataclass(frozen=True)
class GpuHealth:
    """One GPU server as its /health saw it this tick."""

    url: str
    # answered /health at all
    reachable: bool
    # loading / ready / draining / failed (None when unreachable)
    status: str | None = None
    queue_size: int = 0
    queue_capacity: int = 0
    memory: dict | None = None
    error: str | None = None

    @property
    def down(self) -> bool:
        return not self.reachable or self.status == "failed"

    @property
    def queue_fill(self) -> float:
        return self.queue_size / self.queue_capacity if self.queue_capacity else 0.0


@dataclass(frozen=True)
class Backlog:
    # shards with URLs still to process
    shards_with_work: int
    # unfinished URLs (pending / leased / retryable), counted up to a cap
    urls_unfinished: int
    # True when urls_unfinished stopped at the cap (there are at least that many)
    urls_capped: bool = False
    # claimable shards not in flight and not parked, in shard order (bounded)
    candidates: tuple[str, ...] = ()
    # shards whose retries for one cause are spent (left out until an operator looks)
    parked: tuple[str, ...] = ()


@dataclass(frozen=True)
class TickInputs:
    # the tick's clock (epoch seconds): the state's timestamps are in it
    now: float
    window: WindowStats
    gpus: tuple[GpuHealth, ...]
    backlog: Backlog
    # analysis runs queued, starting or started (the throttle's own, backfills, manual runs)
    runs_in_flight: int
    shards_in_flight: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        window = dataclasses.asdict(self.window) | {
            "samples": self.window.samples, "failure_ratio": round(self.window.failure_ratio, 4),
            "web_failure_ratio": round(self.window.web_failure_ratio, 4),
            "timeout_ratio": round(self.window.timeout_ratio, 4), "rate_per_s": round(self.window.rate_per_s, 3),
        }  # fmt: skip
        backlog = dataclasses.asdict(self.backlog)
        backlog["candidates"] = list(self.backlog.candidates[:20])  # the decision lists what it took
        return {
            "now": self.now, "window": window, "gpus": [dataclasses.asdict(g) for g in self.gpus],
            "backlog": backlog, "runs_in_flight": self.runs_in_flight,
            "shards_in_flight": list(self.shards_in_flight[:50]),
        }  # fmt: skip


# ----- state (the sensor's cursor) -----


@dataclass
class ThrottleState:
    profile: str
    # start of the current run of consecutive healthy ticks (None: the last tick was not healthy)
    healthy_since: float | None = None
    # last profile change (or resume), for min_dwell_s
    last_change_at: float | None = None
    paused: bool = False
    # PAUSE_GPU or PAUSE_FAILURES while paused
    pause_kind: str | None = None
    pause_reason: str | None = None
    paused_since: float | None = None
    last_action: str | None = None
    last_reason: str | None = None
    last_decision_id: int | None = None
    ticks: int = 0

    def to_cursor(self) -> str:
        """JSON a person can read on the sensor's page: spaces where the line may wrap, times to the
        second (that is all min_dwell_s and the healthy period need), nothing left unset."""
        values = {k: round(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return json.dumps({k: v for k, v in values.items() if v is not None}, separators=(", ", ": "))

    @classmethod
    def from_cursor(cls, cursor: str | None, settings: ThrottleSettings) -> ThrottleState:
        """The state a cursor holds; a missing or unreadable cursor starts fresh at the start profile."""
        if cursor:
            try:
                raw = json.loads(cursor)
                known = {f.name for f in dataclasses.fields(cls)}
                state = cls(**{k: v for k, v in raw.items() if k in known})
                if state.profile in PROFILE_NAMES:
                    return state
            except (ValueError, TypeError):
                pass
        return cls(profile=settings.start_profile)


# ----- decision -----


@dataclass(frozen=True)
class Decision:
    action: str
    # the profile in force after this decision (runs requested now use it)
    profile: str
    previous_profile: str
    paused: bool
    reason: str
    # shards to request, in order
    submit: tuple[str, ...]
    # max_concurrent_workers of the profile in force, and the slots left free before submitting
    limit: int
    free_slots: int
    # healthy / degraded / broken / neutral / insufficient
    verdict: str
    state: ThrottleState

    def as_dict(self) -> dict:
        return {
            "action": self.action, "profile": self.profile, "previous_profile": self.previous_profile,
            "paused": self.paused, "reason": self.reason, "submit": list(self.submit), "limit": self.limit,
            "free_slots": self.free_slots, "verdict": self.verdict,
        }  # fmt: skip


def _order(profile: str) -> int:
    return PROFILE_NAMES.index(profile)


def assess(window: WindowStats, limits: ProfileLimits, settings: ThrottleSettings) -> tuple[str, list[str]]:
    """(verdict, reasons): broken, degraded, healthy, neutral (between the thresholds) or
    insufficient (too few results to judge)."""
    if window.samples < settings.min_samples:
        return "insufficient", [f"{window.samples} results in the window (< {settings.min_samples} to judge)"]
    failure, timeouts = window.failure_ratio, window.timeout_ratio
    download_limit = settings.step_down_download_fraction * limits.download_timeout_ms
    if failure >= settings.pause_failure_ratio:
        top = ", ".join(f"{cls} {n}" for cls, n in window.top_errors[:3])
        return "broken", [
            f"failure ratio {failure:.2f} >= {settings.pause_failure_ratio:.2f} over {window.samples} URLs"
            f"{f' ({top})' if top else ''}: the network or the corpus is broken"
        ]
    degraded = []
    if failure >= settings.step_down_failure_ratio:
        degraded.append(f"failure ratio {failure:.2f} >= {settings.step_down_failure_ratio:.2f}")
    if timeouts >= settings.step_down_timeout_ratio:
        degraded.append(f"timeout ratio {timeouts:.2f} >= {settings.step_down_timeout_ratio:.2f}")
    if window.p95_download_ms is not None and window.p95_download_ms >= download_limit:
        degraded.append(f"p95 download {window.p95_download_ms:.0f} ms >= {download_limit:.0f} ms")
    if window.p95_inference_ms is not None and window.p95_inference_ms >= limits.critical_threshold_ms:
        degraded.append(
            f"p95 inference {window.p95_inference_ms:.0f} ms >= {limits.critical_threshold_ms:.0f} ms"
        )
    if degraded:
        return "degraded", degraded
    fraction = settings.healthy_fraction
    unhealthy = []
    if failure >= fraction * settings.step_down_failure_ratio:
        unhealthy.append(f"failure ratio {failure:.2f}")
    if timeouts >= fraction * settings.step_down_timeout_ratio:
        unhealthy.append(f"timeout ratio {timeouts:.2f}")
    if window.p95_download_ms is not None and window.p95_download_ms >= fraction * download_limit:
        unhealthy.append(f"p95 download {window.p95_download_ms:.0f} ms")
    if window.p95_inference_ms is not None and window.p95_inference_ms >= limits.slow_threshold_ms:
        unhealthy.append(
            f"p95 inference {window.p95_inference_ms:.0f} ms >= slow {limits.slow_threshold_ms:.0f} ms"
        )
    if unhealthy:
        return "neutral", ["between the healthy and step-down thresholds: " + ", ".join(unhealthy)]
    return "healthy", [
        f"failure ratio {failure:.2f}, timeout ratio {timeouts:.2f} over {window.samples} URLs"
    ]


def decide(inputs: TickInputs, state: ThrottleState, settings: ThrottleSettings) -> Decision:
    """One tick: the profile step (pause, resume, step down or up), then the runs to submit."""
    previous = state.profile
    new = dataclasses.replace(state, ticks=state.ticks + 1)
    verdict, reasons = assess(inputs.window, settings.profiles[previous], settings)
    action, reason = _profile_step(inputs, new, verdict, "; ".join(reasons), settings)
    limit = settings.profiles[new.profile].max_concurrent_workers
    free = max(0, limit - inputs.runs_in_flight)
    submit: tuple[str, ...] = ()
    if not new.paused:
        action, reason, submit = _submissions(inputs, new.profile, action, reason, limit, free, settings)
    new.last_action, new.last_reason = action, reason
    return Decision(
        action=action or "hold", profile=new.profile, previous_profile=previous, paused=new.paused, reason=reason,
        submit=submit, limit=limit, free_slots=free, verdict=verdict, state=new,
    )  # fmt: skip


_Step = tuple[str | None, str]  # (action or None for "nothing yet", reason)


def _profile_step(inputs: TickInputs, new: ThrottleState, verdict: str, reason: str, settings: ThrottleSettings) -> _Step:
    """Pause, stay paused, resume, step down, step up or keep the profile; updates ``new``."""
    gpus = inputs.gpus
    if gpus and all(g.down for g in gpus):
        down = ", ".join(f"{g.url} ({g.error or g.status})" for g in gpus)
        return _pause(new, inputs.now, PAUSE_GPU, f"every GPU server is down: {down}")
    if new.paused and new.pause_kind == PAUSE_FAILURES and _failure_pause_holds(new, inputs.now, verdict, settings):
        # runs that were in flight at the pause may still be failing: the window must clear first
        return _pause(new, inputs.now, PAUSE_FAILURES, reason if verdict == "broken" else new.pause_reason or "failure ratio")
    if new.paused:
        return _resume(new, inputs.now)
    if verdict == "broken":
        return _pause(new, inputs.now, PAUSE_FAILURES, reason)
    if verdict == "degraded":
        return _step_down(new, inputs.now, reason, settings)
    if verdict == "healthy":
        return _step_up_when_healthy_long_enough(new, inputs.now, reason, settings)
    new.healthy_since = None
    return None, reason


def _pause(new: ThrottleState, now: float, kind: str, why: str) -> _Step:
    action = "hold" if new.paused else "pause"
    if not new.paused:
        new.paused_since = now
    new.paused, new.pause_kind, new.pause_reason = True, kind, why
    new.healthy_since = None
    return action, ("paused: " if action == "pause" else "still paused: ") + why


def _failure_pause_holds(new: ThrottleState, now: float, verdict: str, settings: ThrottleSettings) -> bool:
    paused_for = now - (now if new.paused_since is None else new.paused_since)
    return paused_for < settings.pause_min_s or verdict == "broken"


def _resume(new: ThrottleState, now: float) -> _Step:
    """GPUs answer again, or a failure pause lasted pause_min_s: resume (a failure pause as a
    conservative probe, since whatever broke may still be broken)."""
    was = new.pause_reason
    if new.pause_kind == PAUSE_FAILURES:
        new.profile = "conservative"
    new.paused, new.pause_kind, new.pause_reason, new.paused_since = False, None, None, None
    new.last_change_at, new.healthy_since = now, None
    return "resume", f"resumed at {new.profile} (was: {was})"


def _can_change(new: ThrottleState, now: float, settings: ThrottleSettings) -> bool:
    return new.last_change_at is None or now - new.last_change_at >= settings.min_dwell_s


def _step_down(new: ThrottleState, now: float, reason: str, settings: ThrottleSettings) -> _Step:
    new.healthy_since = None
    previous = new.profile
    if previous != STEP_DOWN[previous] and _can_change(new, now, settings):
        new.profile, new.last_change_at = STEP_DOWN[previous], now
        return "step_down", f"{previous} -> {new.profile}: {reason}"
    held = "already conservative" if previous == "conservative" else "holding the profile (min dwell)"
    return None, f"degraded ({reason}); {held}"


def _step_up_when_healthy_long_enough(new: ThrottleState, now: float, reason: str, settings: ThrottleSettings) -> _Step:
    new.healthy_since = new.healthy_since if new.healthy_since is not None else now
    healthy_for = now - new.healthy_since
    previous, target = new.profile, STEP_UP[new.profile]
    if (
        healthy_for >= settings.healthy_period_s
        and target != previous
        and _order(target) <= _order(settings.max_profile)
        and _can_change(new, now, settings)
    ):
        new.profile, new.last_change_at, new.healthy_since = target, now, now
        return "step_up", f"{previous} -> {target}: healthy for {healthy_for:.0f} s ({reason})"
    return None, f"healthy for {healthy_for:.0f} s of {settings.healthy_period_s:.0f} s ({reason})"


def _submissions(
    inputs: TickInputs, profile: str, action: str | None, reason: str, limit: int, free: int,
    settings: ThrottleSettings,
) -> tuple[str | None, str, tuple[str, ...]]:
    """Shard runs into the free slots, unless the GPU servers' queues are nearly full."""
    in_flight = set(inputs.shards_in_flight)
    up = [g for g in inputs.gpus if not g.down]
    candidates = [s for s in inputs.backlog.candidates if s not in in_flight]
    submit: tuple[str, ...] = ()
    if bool(up) and all(g.queue_fill >= settings.gpu_queue_hold_fraction for g in up):
        action = action or "hold"
        reason += f"; GPU queues full ({', '.join(f'{g.queue_size}/{g.queue_capacity}' for g in up)})"
    else:
        submit = tuple(candidates[: min(free, settings.max_submit_per_tick)])
    if action is None:
        if submit:
            action = "submit"
        elif not candidates:
            action = "idle"
            reason = f"no claimable shard ({inputs.backlog.shards_with_work} with work, all in flight or " \
                     f"parked); {reason}"  # fmt: skip
        else:
            action = "hold"
            reason = f"at the limit: {inputs.runs_in_flight} runs in flight of {limit} ({profile}); {reason}"
    if submit:
        reason = f"{len(submit)} shard run(s) into {free} free slot(s) of {limit} ({profile}); {reason}"
    return action, reason, submit

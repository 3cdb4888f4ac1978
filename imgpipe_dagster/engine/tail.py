"""When a run leaves its tail to a later run (issue 14: no run idles through a tail).

Once no fresh URL is left to claim, a run only finishes what it holds: its tail. A few hosts can
hold that tail for long after everything else is done (a host answering in 2 s serves 8 URLs at a
time; a host answering 429 pauses every few requests and its URLs come back deferred), while the
run's slot and its share of the GPU tier sit nearly idle. Then the run hands the tail back to the
pool with a due time and ends; a later run finishes it, every URL still ends in one final state.

The run hands its tail back when all of these hold:

- fresh work ran out: a claim found less than it asked for;
- for the last ``window_s`` (and ``window_s`` after fresh work ran out) URLs got through the run at
  under ``slow_share`` of its pace (URLs through per second from its start to that window). A URL is
  through when its image is downloaded (or read from the image store), or when it is final without
  one: the tail is a matter of hosts, so the GPU tier's bursts of answers do not count;
- at that recent rate the URLs still left would take longer than another window;
- the hosts of those URLs held at most ``host_share`` of the run's URLs. A run whose tail is its own
  backlog (a corpus of one site, a later run over a tail handed back) keeps going: no other host's
  work could use the time, so ending early would only add a run's start and end.

The URLs left are those the run holds before they are through, and those it put back due within ``wait_for_s`` (the run
would wait for them; see RunSettings.retry_wait_s). Pure bookkeeping: the clock is an argument.
"""

from __future__ import annotations

from collections import Counter, deque


class TailWatch:
    def __init__(self, *, window_s: float, slow_share: float, host_share: float, started_at: float) -> None:
        self.window_s = window_s
        self.slow_share = slow_share
        self.host_share = host_share
        self.started_at = started_at
        self.urls_by_host: Counter[str] = Counter()  # URLs of the run (claimed at least once), by host
        self.held_by_host: Counter[str] = Counter()  # URLs the run holds now, by host
        self._seen: set[bytes] = set()
        self._put_back: dict[bytes, tuple[str, float]] = {}  # url_hash -> (host, due at)
        self.through = 0  # URLs through (above)
        self.fresh_ran_out_at: float | None = None
        self._samples: deque[tuple[float, int]] = deque()  # (time, URLs through by then)

    def claimed(self, url_hash: bytes, host: str) -> None:
        if url_hash not in self._seen:
            self._seen.add(url_hash)
            self.urls_by_host[host] += 1
        self.held_by_host[host] += 1
        self._put_back.pop(url_hash, None)

    def left(self, url_hash: bytes, host: str, *, through: bool, due_at: float | None) -> None:
        """A URL the run held leaves the tail: through (above), or put back (due at ``due_at`` when it
        has a due time)."""
        self.held_by_host[host] -= 1
        if self.held_by_host[host] <= 0:
            del self.held_by_host[host]
        if through:
            self.through += 1
        elif due_at is not None:
            self._put_back[url_hash] = (host, due_at)

    def fresh_ran_out(self, now: float) -> None:
        if self.fresh_ran_out_at is None:
            self.fresh_ran_out_at = now

    def left_over(self, now: float, wait_for_s: float) -> Counter[str]:
        """URLs left to the run by host: held, or put back and due within ``wait_for_s``."""
        left = Counter(self.held_by_host)
        for host, due_at in self._put_back.values():
            if due_at - now <= wait_for_s:
                left[host] += 1
        return left

    def hand_back_reason(self, now: float, wait_for_s: float) -> str | None:
        """Why the tail should go back to the pool now, or None while the run should finish it.
        Call it often in the tail: each call is also a sample of the recent rate."""
        self._samples.append((now, self.through))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        if self.fresh_ran_out_at is None or now - self.fresh_ran_out_at < self.window_s:
            return None
        since, through_then = self._samples[0]
        if now - since < self.window_s or since <= self.started_at:
            return None
        pace = through_then / (since - self.started_at)
        recent = (self.through - through_then) / (now - since)
        if pace <= 0 or recent >= self.slow_share * pace:
            return None
        left = self.left_over(now, wait_for_s)
        remaining = sum(left.values())
        if remaining == 0 or (recent > 0 and remaining / recent <= self.window_s):
            return None
        share = sum(self.urls_by_host[host] for host in left) / max(sum(self.urls_by_host.values()), 1)
        if share > self.host_share:
            return None  # the tail is the run's own backlog
        return (f"{remaining} URLs of {len(left)} hosts ({share:.0%} of the run's URLs) through at "
                f"{recent:.1f}/s for {now - since:.0f}s, the run's pace before {pace:.1f}/s")  # fmt: skip

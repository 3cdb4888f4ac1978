"""Whose fault a failure is: the web's (the URL or its host) or ours (our network, the GPU tier, our code).

The throttle slows down or pauses for *our* failures only: on a real web a fifth of the URLs fail by
their own fault (404s, dead hosts, robots.txt, hosts that hang or trickle), and fewer runs would not
make them succeed. One table here, read by the throttle's window query and its tests:

* **web**: the answer or the content is the URL's or its host's (missing, not an image, too large,
  robots, opt-outs, a host deferred or unreachable, bad URLs, TLS and protocol errors).
* **either** (host-level): one host refusing connections, timing out, resetting, answering 429 or 5xx
  is that host's problem; most hosts doing it at once is our network, our resolver, or our pace.
  The web's faults gather on a few hosts, ours spread over all of them: these count as ours when the
  hosts showing them are at least ``SPREAD_HOST_SHARE`` of the hosts seen in the window, else as the
  web's. (A corpus on a single host cannot tell the two apart: they count as ours.)
* **ours**: everything else (inference errors, GPU outages, our own bugs, unknown classes).
"""

from __future__ import annotations

# fetch.errors.ErrorClass values (kept as strings: the throttle reads them from the database)
WEB_SIDE = frozenset({
    "http_404", "http_410", "http_4xx", "too_large", "not_an_image", "undecodable", "decompression_bomb",
    "blocked_address", "opted_out", "too_many_redirects", "invalid_url", "tls_error", "protocol_error",
    "robots_disallowed", "host_deferred", "host_unreachable",
})  # fmt: skip
EITHER = frozenset({
    "dns_failure", "connect_timeout", "connect_refused", "read_timeout", "deadline", "reset", "ttfb_timeout",
    "too_slow", "http_429", "http_5xx",
})  # fmt: skip
# host-level classes that are timeouts (the throttle's timeout ratio)
TIMEOUTS = frozenset({"read_timeout", "connect_timeout", "deadline", "ttfb_timeout", "too_slow"})
# host-level failures on at least this share of the hosts seen in the window are ours
SPREAD_HOST_SHARE = 0.5


def side(error_class: str | None) -> str:
    """"web", "either" or "ours" for one error class."""
    if error_class in WEB_SIDE:
        return "web"
    if error_class in EITHER:
        return "either"
    return "ours"


def spread_is_ours(hosts: int, hosts_failing: int) -> bool:
    """True when host-level failures show on so many of the hosts seen that they point at our side."""
    return hosts > 0 and hosts_failing >= SPREAD_HOST_SHARE * hosts

"""Whose fault a failure is: the web's (the URL or its host) or ours (our network, the GPU tier, our code).

The throttle slows down or pauses for *our* failures only: on a real web a fifth of the URLs fail by
their own fault (404s, dead hosts, robots.txt, hosts that hang or trickle), and fewer runs would not
make them succeed. One table here, read by the throttle's window query and its tests:

* **web**: the answer or the content is the URL's or its host's (HTTP statuses, not an image, too
  large, robots, opt-outs, a host deferred or unreachable, bad URLs, TLS and protocol errors).
* **network**: could be either. One host refusing connections or timing out is that host's problem;
  every host doing it at once is our network (or resolver). They count as the web's while at least
  ``ANSWERING_HOST_SHARE`` of the hosts seen in the window answered at least once, and as ours below.
* **ours**: everything else (inference errors, GPU outages, our own bugs, unknown classes).
"""

from __future__ import annotations

# fetch.errors.ErrorClass values (kept as strings: the throttle reads them from the database)
WEB_SIDE = frozenset({
    "http_404", "http_410", "http_4xx", "http_429", "http_5xx", "too_large", "not_an_image", "undecodable",
    "decompression_bomb", "blocked_address", "opted_out", "too_many_redirects", "invalid_url", "tls_error",
    "protocol_error", "robots_disallowed", "host_deferred", "host_unreachable",
})  # fmt: skip
NETWORK = frozenset({
    "dns_failure", "connect_timeout", "connect_refused", "read_timeout", "deadline", "reset", "ttfb_timeout",
    "too_slow",
})  # fmt: skip
# network classes that are timeouts (the throttle's timeout ratio)
TIMEOUTS = frozenset({"read_timeout", "connect_timeout", "deadline", "ttfb_timeout", "too_slow"})
# below this share of hosts that answered at least once in the window, network failures are ours
ANSWERING_HOST_SHARE = 0.5


def side(error_class: str | None) -> str:
    """"web", "network" or "ours" for one error class."""
    if error_class in WEB_SIDE:
        return "web"
    if error_class in NETWORK:
        return "network"
    return "ours"


def network_is_ours(hosts: int, hosts_answering: int) -> bool:
    """True when so few of the hosts seen answered that network failures point at our side."""
    return hosts > 0 and hosts_answering < ANSWERING_HOST_SHARE * hosts

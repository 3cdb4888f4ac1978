"""robots.txt rules of one host, matched for our product token (RFC 9309, via urllib.robotparser).

What the fetcher does with each answer to ``GET /robots.txt`` (documented choices):

- 2xx: the first ``robots_max_bytes`` are parsed (a longer file still yields its first rules);
- 4xx other than 429, including 404: no rules, everything allowed (RFC 9309 §2.3.1.3);
- 429, 5xx, a timeout or no connection: not cached; the URL that asked ends with that failure (it
  spends an attempt, so a host that never serves robots.txt cannot bounce URLs forever), the host's
  health counts it as a failure (breaker), and the next URL of the host asks again.
  RFC 9309 says to assume a complete disallow while robots.txt is unreachable: nothing is fetched
  from the host until it answers.
"""

from __future__ import annotations

import urllib.parse
import urllib.robotparser

from imgpipe_dagster.fetch.settings import ROBOTS_TOKEN


class RobotsRules:
    """Allow/disallow decisions for ROBOTS_TOKEN; ``RobotsRules(None)`` allows everything."""

    def __init__(self, text: str | None) -> None:
        self._parser: urllib.robotparser.RobotFileParser | None = None
        if text is not None:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(text.splitlines())
            self._parser = parser

    @classmethod
    def from_body(cls, body: bytes, *, truncated: bool = False) -> RobotsRules:
        if truncated:  # a file cut at the byte cap may end mid-line: drop that partial line
            body = body[: body.rfind(b"\n") + 1]
        return cls(body.decode("utf-8", errors="replace"))

    def allows(self, url: str) -> bool:
        if self._parser is None:
            return True
        parts = urllib.parse.urlsplit(url)
        # robotparser matches on the path; give it the URL without scheme and host quirks
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return self._parser.can_fetch(ROBOTS_TOKEN, path)

"""Lenient parsing of the model's JSON analysis: models wrap JSON in prose or code fences,
use single quotes, leave trailing commas or stop mid-object at the token limit."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")
EXPECTED_KEYS = ("caption", "tags", "objects", "text", "safety")


def parse_analysis(raw: str) -> tuple[dict[str, Any] | None, bool]:
    """Return (analysis, parse_ok). analysis is None when no JSON object can be recovered;
    the caller keeps the raw text either way."""
    if not raw or not raw.strip():
        return None, False
    for candidate in _candidates(raw):
        obj = _try_load(candidate)
        if isinstance(obj, dict):
            return _normalise(obj), True
    return None, False


def _candidates(raw: str):
    text = raw.strip()
    yield text
    for fenced in _FENCE_RE.findall(text):
        yield fenced.strip()
    start = text.find("{")
    if start >= 0:
        end = text.rfind("}")
        if end > start:
            yield text[start : end + 1]
        yield _close_truncated(text[start:])


def _try_load(candidate: str) -> Any:
    for variant in (candidate, _TRAILING_COMMA_RE.sub(r"\1", candidate)):
        try:
            return json.loads(variant)
        except (json.JSONDecodeError, ValueError):
            continue
    return None


def _close_truncated(fragment: str) -> str:
    """Close strings, arrays and objects left open when generation hit the token limit."""
    stack: list[str] = []
    in_string = escaped = False
    for ch in fragment:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    closed = fragment + ('"' if in_string else "")
    closed = re.sub(r",\s*$", "", closed.rstrip())
    closed = re.sub(r':\s*$', ": null", closed)
    return closed + "".join(reversed(stack))


def _normalise(obj: dict[str, Any]) -> dict[str, Any]:
    out = dict(obj)
    for key in ("tags", "objects"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = [part.strip() for part in value.split(",") if part.strip()]
    return out

"""URL normalisation and validation, one URL at a time (``normalise_url``) and a whole Arrow batch
at a time (``normalise_batch``).

Normal form: trimmed, scheme and host lower-case, non-ASCII hosts IDNA-encoded, no fragment, no
default port, an empty path written as ``/``. Everything else (path, query, their case, any
percent-encoding, emoji) is kept byte for byte. Accepted: http/https only, a host, no user
credentials, no control characters, at most ``max_url_length`` UTF-8 bytes.

The batch path keeps 20M URLs out of Python: a regular expression picks the URLs that are already in
normal form (nearly all real ones) and Arrow passes them through untouched; only the rest go through
``normalise_url``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Why a row was dropped. Codes index REASONS; 0 means kept.
REASONS = (
    "ok",
    "invalid_utf8",
    "too_long",
    "control_characters",
    "missing_scheme",
    "unsupported_scheme",
    "credentials",
    "missing_host",
    "invalid_host",
    "invalid_port",
    "invalid_url",
    "missing_url",
    "malformed_row",
    "invalid_json",
)
REASON_CODE = {name: code for code, name in enumerate(REASONS)}
OK = 0

_DEFAULT_PORTS = {"http": 80, "https": 443}
# most octets of a domain name in its dotted form (RFC 1035's 255 on the wire)
MAX_HOST_LENGTH = 253
# DNS caps a label at 63 octets (RFC 1035): a longer one can never resolve, so it is an invalid host
_HOST_LABELS = r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?"
_ASCII_HOST = re.compile(rf"^{_HOST_LABELS}$")
# Already normal: lower-case scheme and host, no port, no credentials, a path, no fragment.
_ALREADY_NORMAL = rf"^https?://{_HOST_LABELS}/[^#]*$"
_CONTROL = r"[\x00-\x1f\x7f]"
_LONG_HOST = rf"^https?://[^/]{{{MAX_HOST_LENGTH + 1},}}"


class UrlRejected(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _ascii_host(hostname: str) -> str:
    """The host in the form the URL keeps: lower-case ASCII, IDNA for international names."""
    if hostname.isascii():
        host = hostname.lower()
        if _ASCII_HOST.match(host):
            if len(host.rstrip(".")) > MAX_HOST_LENGTH:
                raise UrlRejected("invalid_host")
            return host
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise UrlRejected("invalid_host") from None
    try:
        return idna.encode(hostname, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise UrlRejected("invalid_host") from None


def normalise_url(text: str, max_url_length: int = 4096) -> str:
    """The normal form of one URL, or UrlRejected(reason)."""
    url = text.strip()
    if not url:
        raise UrlRejected("missing_url")
    if len(url.encode("utf-8", "surrogatepass")) > max_url_length:
        raise UrlRejected("too_long")
    if re.search(_CONTROL, url):
        raise UrlRejected("control_characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in _DEFAULT_PORTS:
            raise UrlRejected("unsupported_scheme") from None
        raise UrlRejected("invalid_port" if "port" in str(exc).lower() else "invalid_url") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise UrlRejected("missing_scheme")
    if scheme not in _DEFAULT_PORTS:
        raise UrlRejected("unsupported_scheme")
    if "@" in parts.netloc:
        raise UrlRejected("credentials")
    if not parts.hostname:
        raise UrlRejected("missing_host")
    host = _ascii_host(parts.hostname)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    normal = f"{scheme}://{netloc}{parts.path or '/'}"
    if parts.query:
        normal += "?" + parts.query
    if len(normal.encode("utf-8")) > max_url_length:
        raise UrlRejected("too_long")
    return normal


@dataclass
class NormalisedBatch:
    urls: pa.Array  # large_string, null where rejected
    reasons: np.ndarray  # int8 codes into REASONS, OK where kept

    @property
    def kept(self) -> np.ndarray:
        return self.reasons == OK


def decode_utf8(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary values as large_string; rows that are not valid UTF-8 become null and are flagged."""
    values = values.cast(pa.large_binary())
    try:
        return values.cast(pa.large_string()), np.zeros(len(values), dtype=bool)
    except pa.ArrowInvalid:
        pass
    # Rare: find the offending rows in Python, then cast the rest.
    invalid = np.zeros(len(values), dtype=bool)
    for index, raw in enumerate(values.to_pylist()):
        if raw is not None:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                invalid[index] = True
    cleaned = pc.if_else(pa.array(invalid), pa.scalar(None, pa.large_binary()), values)
    return cleaned.cast(pa.large_string()), invalid


def normalise_batch(values: pa.Array, max_url_length: int = 4096,
                    reasons: np.ndarray | None = None) -> NormalisedBatch:
    """Normalise a batch of raw URL values (binary or string, nulls allowed). ``reasons`` carries
    rejections already decided by the reader; those rows stay rejected."""
    count = len(values)
    reasons = np.zeros(count, dtype=np.int8) if reasons is None else reasons.astype(np.int8, copy=True)
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        text, invalid = decode_utf8(values)
        reasons[(reasons == OK) & invalid] = REASON_CODE["invalid_utf8"]
    else:
        text = values.cast(pa.large_string())
    text = pc.utf8_trim_whitespace(text)

    def flag(mask: pa.Array | np.ndarray, reason: str) -> None:
        mask = np.asarray(pc.fill_null(mask, False)) if isinstance(mask, pa.Array) else mask
        reasons[(reasons == OK) & mask] = REASON_CODE[reason]

    lengths = pc.binary_length(text)
    flag(pc.or_kleene(pc.is_null(text), pc.equal(lengths, 0)), "missing_url")
    flag(pc.greater(lengths, max_url_length), "too_long")
    flag(pc.match_substring_regex(text, _CONTROL), "control_characters")

    fast = np.asarray(pc.fill_null(pc.match_substring_regex(text, _ALREADY_NORMAL), False))
    # the fast pattern cannot count a whole host name (no look-ahead in RE2): long ones take the slow path
    fast &= ~np.asarray(pc.fill_null(pc.match_substring_regex(text, _LONG_HOST), False))
    slow_rows = np.flatnonzero((reasons == OK) & ~fast)
    if len(slow_rows):
        replacements: list[str | None] = []
        for row, raw in zip(slow_rows, text.take(pa.array(slow_rows)).to_pylist(), strict=True):
            try:
                replacements.append(normalise_url(raw, max_url_length))
            except UrlRejected as rejected:
                reasons[row] = REASON_CODE[rejected.reason]
                replacements.append(None)
        # Scatter the slow results back over the fast ones.
        positions = np.full(count, -1, dtype=np.int64)
        positions[slow_rows] = np.arange(len(slow_rows))
        is_slow = np.zeros(count, dtype=bool)
        is_slow[slow_rows] = True
        gathered = pa.array(replacements, pa.large_string()).take(pa.array(np.maximum(positions, 0)))
        text = pc.if_else(pa.array(is_slow), gathered, text) if len(replacements) else text
    keep = pa.array(reasons == OK)
    urls = pc.if_else(keep, text, pa.scalar(None, pa.large_string()))
    return NormalisedBatch(urls=urls, reasons=reasons)

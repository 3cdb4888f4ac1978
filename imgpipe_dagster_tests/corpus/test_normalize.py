"""URL normal form and validation: what is kept, what is rewritten, and why a URL is rejected."""

from __future__ import annotations

import pyarrow as pa
import pytest

from imgpipe_dagster.corpus.normalize import REASONS, UrlRejected, normalise_batch, normalise_url


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  HTTP://Example.COM/Path/IMG.jpg  ", "http://example.com/Path/IMG.jpg"),
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
        ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
        ("http://example.com:8080/a.jpg", "http://example.com:8080/a.jpg"),
        ("https://example.com/a.jpg#part", "https://example.com/a.jpg"),
        ("https://example.com", "https://example.com/"),
        ("https://example.com?x=1", "https://example.com/?x=1"),
        ("https://bücher.de/bild.jpg", "https://xn--bcher-kva.de/bild.jpg"),
        ("https://[2001:DB8::1]:443/x", "https://[2001:db8::1]/x"),
        ("https://example.com/😀/שלום.jpg?q=\"a\\b\"", "https://example.com/😀/שלום.jpg?q=\"a\\b\""),
        ("https://example.com/A%2Fb?Q=X", "https://example.com/A%2Fb?Q=X"),
    ],
)
def test_normal_form(raw: str, normal: str):
    assert normalise_url(raw) == normal


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("data:image/png;base64,AAAA", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("example.com/a.jpg", "missing_scheme"),
        ("https://user:secret@example.com/a.jpg", "credentials"),
        ("https://user@example.com/a.jpg", "credentials"),
        ("http:///a.jpg", "missing_host"),
        ("https://", "missing_host"),
        ("https://exa mple.com/a.jpg", "invalid_host"),
        ("https://a..b/a.jpg", "invalid_host"),
        ("https://" + "a" * 64 + ".example.com/a.jpg", "invalid_host"),  # a DNS label holds 63 at most
        ("https://" + "abcdefgh." * 30 + "com/a.jpg", "invalid_host"),  # a name 253
        ("https://example.com:99999/a.jpg", "invalid_port"),
        ("https://example.com:abc/a.jpg", "invalid_port"),
        ("https://example.com/a\x00.jpg", "control_characters"),
        ("https://example.com/a\tb.jpg", "control_characters"),
        ("https://example.com/" + "a" * 5000, "too_long"),
        ("   ", "missing_url"),
    ],
)
def test_rejections(raw: str, reason: str):
    with pytest.raises(UrlRejected) as rejected:
        normalise_url(raw)
    assert rejected.value.reason == reason


def test_batch_matches_one_at_a_time():
    raw = [
        "https://example.com/a.jpg", "HTTPS://EXAMPLE.com/b.jpg", "https://example.com/c.jpg#x", "ftp://x/y",
        "https://u:p@example.com/", "https://example.com/😀", None, "", "https://bücher.de/x",
        "https://example.com:443/d.jpg", "http://example.com/\x7f",
        "https://" + "a" * 64 + ".example.com/e.jpg", "https://" + "abcdefgh." * 30 + "com/f.jpg",
        "https://" + "abcdefgh." * 27 + "com/g.jpg",  # 246 characters: fine
    ]
    batch = normalise_batch(pa.array(raw, pa.string()))
    for value, got, code in zip(raw, batch.urls.to_pylist(), batch.reasons, strict=True):
        try:
            expected, reason = normalise_url(value or ""), "ok"
        except UrlRejected as rejected:
            expected, reason = None, rejected.reason
        assert (got, REASONS[code]) == (expected, reason), value


def test_batch_flags_invalid_utf8_per_row():
    batch = normalise_batch(pa.array([b"https://a.com/ok", b"https://a.com/\xff\xfe", b"https://b.com/"], pa.binary()))
    assert batch.urls.to_pylist() == ["https://a.com/ok", None, "https://b.com/"]
    assert [REASONS[c] for c in batch.reasons] == ["ok", "invalid_utf8", "ok"]


def test_normal_urls_are_fixed_points():
    for url in ["https://example.com/x", "http://a-b.c_d.example.org./p?q=1&r=%20", "https://[::1]:8443/x"]:
        assert normalise_url(normalise_url(url)) == normalise_url(url)

"""The throughput chart of progress_report: valid SVG, right buckets, embedded as a Markdown data URI."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from imgpipe_dagster.plots import (
    BOTTOM,
    HEIGHT,
    LEFT,
    RIGHT,
    TOP,
    WIDTH,
    _bucketed,
    throughput_markdown,
    throughput_svg,
)

END = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def rows():
    """50 ok + 5 failed per minute during the last hour, nothing before."""
    return [(END - timedelta(minutes=m), 50, 5) for m in range(1, 61)]


def test_buckets_average_per_minute_and_drop_rows_outside_the_window():
    ok, failed = _bucketed([*rows(), (END - timedelta(hours=30), 999, 999)], END, hours=24, bucket_minutes=5)

    assert len(ok) == 288
    assert ok[-12:] == [50.0] * 12 and failed[-12:] == [5.0] * 12
    assert sum(ok[:-13]) == 0  # the 999 from 30 hours ago is outside the 24 h window


def test_svg_is_well_formed_and_draws_both_series_to_scale():
    root = ET.fromstring(throughput_svg(rows(), END))

    assert root.tag == f"{SVG}svg" and root.get("width") == str(WIDTH)
    analysed, failed = root.findall(f"{SVG}polyline")
    assert analysed.get("stroke") != failed.get("stroke")
    last_ok_y = float(analysed.get("points").split()[-1].split(",")[1])
    last_failed_y = float(failed.get("points").split()[-1].split(",")[1])
    baseline = HEIGHT - BOTTOM
    assert TOP <= last_ok_y < last_failed_y < baseline  # 50/min drawn higher than 5/min
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "12:00" in labels and "analysed" in labels and "failed" in labels
    assert all(LEFT <= float(p.split(",")[0]) <= WIDTH - RIGHT for p in analysed.get("points").split())


def test_markdown_embeds_the_chart_as_a_data_uri_with_the_totals():
    markdown = throughput_markdown(rows(), END)

    match = re.match(r"!\[[^\]]+\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match
    assert base64.b64decode(match.group(1)).decode().startswith("<svg")
    assert "3,000 analysed, 300 failed" in markdown and "busiest minute 55 URLs" in markdown


def test_an_empty_day_still_draws_a_chart():
    root = ET.fromstring(throughput_svg([], END))

    assert len(root.findall(f"{SVG}polyline")) == 2


def test_the_compact_chart_is_short_enough_for_the_ui_to_show_it_inline():
    from datetime import UTC, datetime, timedelta

    from imgpipe_dagster.plots import INLINE_MARKDOWN_LIMIT, compact_throughput_markdown

    end = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    # the longest case: every hour busy, values spread over the whole height
    busy = [(end - timedelta(minutes=m), (m * 37) % 5000, (m * 11) % 900) for m in range(1, 24 * 60)]
    for series in (busy, []):
        markdown = compact_throughput_markdown(series, end)
        assert len(markdown) < INLINE_MARKDOWN_LIMIT, len(markdown)
        assert markdown.startswith("![last 24 h](data:image/svg+xml;base64,")

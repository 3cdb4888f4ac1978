"""The throughput picture of progress_report: images per minute and failures over the last 24 hours.

A small hand-written SVG (no plotting library in the runtime), embedded in Markdown as a data URI:
the Dagster UI's Markdown renderer accepts ``data:`` image sources, so the chart shows in the
asset's metadata without a file server. Minutes are bucketed (5 minutes by default) and each bucket
shows its average per minute, so a 24-hour chart stays a few kilobytes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 34, 30  # plot margins, px
OK_COLOUR, FAILED_COLOUR = "#3b5bdb", "#e03131"


def _bucketed(series: Sequence[tuple], end: datetime, hours: int, bucket_minutes: int) -> tuple[list, list]:
    """(ok per minute, failed per minute) for each bucket, oldest first; empty minutes count as zero."""
    buckets = hours * 60 // bucket_minutes
    start = end - timedelta(hours=hours)
    ok, failed = [0.0] * buckets, [0.0] * buckets
    for minute, n_ok, n_failed in series:
        index = int((minute - start).total_seconds() // (bucket_minutes * 60))
        if 0 <= index < buckets:
            ok[index] += n_ok / bucket_minutes
            failed[index] += n_failed / bucket_minutes
    return ok, failed


def _nice_ceiling(value: float) -> float:
    """1, 2, 5 x 10^k at or above ``value`` (a readable top for the y axis)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 0.1
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def throughput_svg(series: Sequence[tuple], end: datetime | None = None, hours: int = 24,
                   bucket_minutes: int = 5) -> str:  # fmt: skip
    """SVG of ``series`` rows (minute, ok, failed) as from store.stats.throughput_series."""
    end = (end or datetime.now(UTC)).astimezone(UTC)
    ok, failed = _bucketed(series, end, hours, bucket_minutes)
    top = _nice_ceiling(max([*ok, *failed, 0.0]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + plot_w * (i + 0.5) / len(ok)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    def line(values: list[float], colour: str) -> str:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        return f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{points}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">Images per minute, last {hours} h '
        f"(UTC, {bucket_minutes}-minute average)</text>",
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        value = top * fraction
        label = f"{value:g}" if value < 10 else f"{value:,.0f}"
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#e9ecef"/>')  # fmt: skip
        parts.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" fill="#495057">{label}</text>')
    start = end - timedelta(hours=hours)
    for tick_hours in range(0, hours + 1, max(1, hours // 6)):
        tick = start + timedelta(hours=tick_hours)
        tx = LEFT + plot_w * tick_hours / hours
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 4}" stroke="#495057"/>')
        parts.append(f'<text x="{tx:.1f}" y="{HEIGHT - 10}" text-anchor="middle" fill="#495057">'
                     f"{escape(tick.strftime('%H:%M'))}</text>")  # fmt: skip
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#adb5bd"/>')
    parts += [line(ok, OK_COLOUR), line(failed, FAILED_COLOUR)]
    legend_x = WIDTH - RIGHT - 230
    parts += [
        f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="12" y2="12" stroke="{OK_COLOUR}" stroke-width="3"/>',
        f'<text x="{legend_x + 24}" y="16">analysed</text>',
        f'<line x1="{legend_x + 100}" x2="{legend_x + 118}" y1="12" y2="12" stroke="{FAILED_COLOUR}" '
        'stroke-width="3"/>',
        f'<text x="{legend_x + 124}" y="16">failed</text>',
        "</svg>",
    ]
    return "".join(parts)


def throughput_markdown(series: Sequence[tuple], end: datetime | None = None, hours: int = 24) -> str:
    """The chart as a Markdown image with a data URI, plus the totals it shows in words."""
    svg = throughput_svg(series, end, hours)
    data = base64.b64encode(svg.encode()).decode()
    total_ok = sum(int(row[1]) for row in series)
    total_failed = sum(int(row[2]) for row in series)
    peak = max((int(row[1]) + int(row[2]) for row in series), default=0)
    return (
        f"![Images per minute and failures over the last {hours} h](data:image/svg+xml;base64,{data})\n\n"
        f"Last {hours} h: {total_ok:,} analysed, {total_failed:,} failed; busiest minute {peak:,} URLs."
    )


# The Dagster UI shows Markdown metadata inline only below this many characters (else behind a
# "[Show Markdown]" button), so the compact chart must stay under it.
INLINE_MARKDOWN_LIMIT = 1000
COMPACT_W, COMPACT_H = 288, 48


def compact_throughput_markdown(series: Sequence[tuple], end: datetime | None = None, hours: int = 24) -> str:
    """A small chart of images per minute (hourly averages, failures in red) short enough for the UI to
    show inline; the detailed chart stays in ``throughput_markdown``."""
    end = (end or datetime.now(UTC)).astimezone(UTC)
    ok, failed = _bucketed(series, end, hours, 60)
    top = max([*ok, *failed, 1e-9])
    step = COMPACT_W / len(ok)

    def points(values: list[float]) -> str:
        return " ".join(f"{i * step + step / 2:.0f},{COMPACT_H - 2 - (COMPACT_H - 4) * v / top:.0f}"
                        for i, v in enumerate(values))  # fmt: skip

    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{COMPACT_W}" height="{COMPACT_H}">'
           f'<rect width="{COMPACT_W}" height="{COMPACT_H}" fill="#f8f9fa"/>'
           f'<polyline fill="none" stroke="{OK_COLOUR}" stroke-width="2" points="{points(ok)}"/>'
           f'<polyline fill="none" stroke="{FAILED_COLOUR}" stroke-width="1" points="{points(failed)}"/></svg>')  # fmt: skip
    data = base64.b64encode(svg.encode()).decode()
    peak = max(ok, default=0.0)
    return f"![last {hours} h](data:image/svg+xml;base64,{data}) peak {peak:,.0f}/min"

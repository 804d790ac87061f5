"""Delivery figures as server-rendered SVG: stacked bars per time bucket, no script, no
library. Colours are presentation attributes (allowed by the Content-Security-Policy)."""

from __future__ import annotations

from .html import e
from .search import iso

COLOURS = {"delivered": "#2e9e4f", "deferred": "#e0a800", "bounced": "#c93c3c",
           "expired": "#8a1f1f", "suppressed": "#7b55c7", "rejected": "#555f73",
           "complained": "#e8590c"}
WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM = 640, 180, 44, 22


def stacked_bars(title: str, series: dict[int, dict[str, int]], start: float, end: float,
                 bucket: int) -> str:
    buckets = list(range(int(start // bucket) * bucket, int(end), bucket))
    if not buckets:
        return ""
    peak = max([sum(series.get(b, {}).values()) for b in buckets] + [1])
    slot = (WIDTH - PAD_LEFT) / len(buckets)
    plot_h = HEIGHT - PAD_BOTTOM - 8
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{e(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{e(title)}</title>",
             f'<line x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH}" '
             f'y2="{HEIGHT - PAD_BOTTOM}" stroke="#b9c0cc"/>',
             f'<text x="{PAD_LEFT - 6}" y="14" text-anchor="end" font-size="11" '
             f'fill="#4a5468">{peak}</text>',
             f'<text x="{PAD_LEFT - 6}" y="{HEIGHT - PAD_BOTTOM}" text-anchor="end" '
             'font-size="11" fill="#4a5468">0</text>']
    for i, b in enumerate(buckets):
        y: float = HEIGHT - PAD_BOTTOM
        x = PAD_LEFT + i * slot + slot * 0.1
        counts = series.get(b, {})
        for status, colour in COLOURS.items():
            n = counts.get(status, 0)
            if not n:
                continue
            h = n / peak * plot_h
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{e(iso(b)[:16])} '
                         f"{e(status)}: {n}</title></rect>")
    for i, anchor in ((0, "start"), (len(buckets) // 2, "middle"),
                      (len(buckets) - 1, "end")):
        x = PAD_LEFT + (i + (1 if anchor == "end" else 0)) * slot
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 6}" font-size="11" '
                     f'text-anchor="{anchor}" fill="#4a5468">{e(iso(buckets[i])[5:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def legend() -> str:
    items = "".join(f'<span class="key key-{s}">{e(s)}</span>' for s in COLOURS)
    return f'<p class="legend">{items}</p>'


def rates(series: dict[int, dict[str, int]], *, complaints: bool = False) -> dict[str, float]:
    """Shares of the delivery attempts; with ``complaints``, also ``complained``: complaints
    per delivered message, as the relays' complaint-rate pause (and mailbox providers) count
    them. ``total`` counts the log's events (complaints are not among them)."""
    total: dict[str, int] = {}
    for counts in series.values():
        for status, n in counts.items():
            total[status] = total.get(status, 0) + n
    attempts = sum(total.get(s, 0) for s in ("delivered", "bounced", "expired", "deferred"))
    out = {s: (total.get(s, 0) / attempts if attempts else 0.0)
           for s in ("delivered", "deferred", "bounced")}
    if complaints:
        delivered = total.get("delivered", 0)
        out["complained"] = total.get("complained", 0) / delivered if delivered else 0.0
    return out | {"total": float(sum(n for s, n in total.items() if s != "complained"))}

"""Server-rendered SVG charts for the operator dashboard: a line chart, horizontal bars, grouped bars.

No JavaScript and no external resources: each function returns one ``<svg>`` element as a string,
styled by the page's stylesheet through classes (presentation attributes only, so a strict CSP without
``'unsafe-inline'`` styles still applies). Values are integer nano-dollars; axis ticks are integers too
(1, 2 or 5 times a power of ten), and only pixel positions are floats. Every label is HTML-escaped, and
each chart carries a ``<title>``/``<desc>`` pair for screen readers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

_NANOS_PER_USD = 1_000_000_000


def usd(nanos: int) -> str:
    """Nano-dollars for people: ``$1,234.57``, ``$0.0123``, ``$0.000123`` (rounded half-up for display)."""
    if nanos == 0:
        return "$0"
    sign = "−" if nanos < 0 else ""
    value = abs(nanos)
    decimals = 2 if value >= _NANOS_PER_USD else 4 if value >= 10_000_000 else 6
    unit = 10 ** (9 - decimals)
    rounded = (value + unit // 2) // unit
    whole, frac = divmod(rounded, 10**decimals)
    if whole == 0 and frac == 0:
        return f"{sign}<$0.000001"
    return f"{sign}${whole:,}.{frac:0{decimals}d}"


def percent(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with one decimal, or an em dash when ``whole`` is zero."""
    if whole == 0:
        return "—"
    tenths = (abs(part) * 1000 * 2 + abs(whole)) // (2 * abs(whole))  # half-up on magnitudes
    sign = "−" if (part < 0) != (whole < 0) and tenths else ""
    return f"{sign}{tenths // 10}.{tenths % 10}%"


def nice_ticks(low: int, high: int, count: int = 4) -> list[int]:
    """Integer ticks covering ``[low, high]`` (which includes 0), about ``count`` steps of 1, 2 or 5 × 10^k."""
    span = max(high - low, 1)
    raw = -(-span // count)
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = (low // step) * step
    stop = max(-(-high // step) * step, start + step)  # at least two ticks, so that the scale has a height
    return list(range(start, stop + step, step))


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _open(name: str, title: str, desc: str, width: int, height: int) -> list[str]:
    return [f'<svg class="chart" data-chart="{name}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-labelledby="{name}-t {name}-d" '
            f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
            f'<title id="{name}-t">{_esc(title)}</title><desc id="{name}-d">{_esc(desc)}</desc>']


def _empty(name: str, title: str, message: str, width: int, height: int) -> str:
    parts = _open(name, title, message, width, height)
    parts.append(f'<text class="empty" x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                 f'{_esc(message)}</text></svg>')
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    css: str  # class giving the stroke colour: "revenue", "cost", "margin"
    values: Sequence[int]


def line_chart(name: str, title: str, labels: Sequence[str], series: Sequence[Series], *,
               width: int = 1140, height: int = 300) -> str:
    """Lines over evenly spaced periods; points of the ``margin`` series below zero are drawn as losses."""
    if not labels:
        return _empty(name, title, "No usage in this range.", width, height)
    left, right, top, bottom = 78, 16, 14, 34
    values = [v for s in series for v in s.values]
    ticks = nice_ticks(min(0, *values), max(0, *values))
    lo, hi = ticks[0], ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (plot_w / 2 if len(labels) == 1 else plot_w * i / (len(labels) - 1))

    def y(v: int) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    desc = "; ".join(f"{label}: " + ", ".join(f"{s.name} {usd(s.values[i])}" for s in series)
                     for i, label in enumerate(labels))
    parts = _open(name, title, desc, width, height)
    for tick in ticks:
        parts.append(f'<line class="{"zero" if tick == 0 else "grid"}" x1="{left}" x2="{width - right}" '
                     f'y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
                     f'<text class="axis" x="{left - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{usd(tick)}</text>')
    every = max(1, -(-len(labels) // 12))
    for i, label in enumerate(labels):
        if (len(labels) - 1 - i) % every == 0:  # counted back from the newest period, which is always labelled
            parts.append(f'<text class="axis" x="{x(i):.1f}" y="{height - 10}" text-anchor="middle">'
                         f'{_esc(label)}</text>')
    for s in series:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        parts.append(f'<polyline class="line {s.css}" points="{points}"/>')
        if s.css == "margin" or len(labels) <= 31:
            for i, v in enumerate(s.values):
                css = f"dot {s.css}" + (" loss" if s.css == "margin" and v < 0 else "")
                radius = 3.5 if s.css == "margin" else 2.5
                parts.append(f'<circle class="{css}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="{radius}">'
                             f'<title>{_esc(labels[i])} · {_esc(s.name)}: {usd(v)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(name: str, title: str, items: Sequence[tuple[str, int]], *, css: str, empty: str,
              width: int = 540) -> str:
    """Horizontal bars, longest first as given; ``css`` colours them ("margin" or "loss")."""
    row, top = 30, 8
    height = top * 2 + row * max(len(items), 3)
    if not items:
        return _empty(name, title, empty, width, height)
    label_w, value_w = 130, 96
    longest = max(abs(v) for _, v in items) or 1
    bar_room = width - label_w - value_w
    desc = "; ".join(f"{label}: {usd(value)}" for label, value in items)
    parts = _open(name, title, desc, width, height)
    for i, (label, value) in enumerate(items):
        y = top + i * row
        length = max(2.0, bar_room * abs(value) / longest)
        parts.append(f'<g><title>{_esc(label)}: {usd(value)}</title>'
                     f'<text class="label" x="{label_w - 8}" y="{y + 19}" text-anchor="end">'
                     f'{_esc(_clip(label, 16))}</text>'
                     f'<rect class="bar {css}" x="{label_w}" y="{y + 6}" width="{length:.1f}" height="18" rx="3"/>'
                     f'<text class="value" x="{label_w + length + 6:.1f}" y="{y + 19}">{usd(value)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Group:
    label: str
    price_nanos: int
    cost_nanos: int | None  # None: unknown, the price bar is drawn grey and alone
    loss: bool
    note: str = ""  # e.g. "+3 of unknown cost"


def grouped_bars(name: str, title: str, groups: Sequence[Group], *, width: int = 1140,
                 height: int = 320) -> str:
    """Price (revenue) beside provider cost for each group; a group at a loss gets a red marker."""
    if not groups:
        return _empty(name, title, "No usage with a known cost in this range.", width, height)
    left, right, top, bottom = 78, 16, 26, 52
    ticks = nice_ticks(0, max(max(g.price_nanos, g.cost_nanos or 0) for g in groups))
    hi = ticks[-1] or 1
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / len(groups)
    bar_w = min(34.0, slot * 0.32)

    def y(v: int) -> float:
        return top + plot_h * (hi - v) / hi

    desc = "; ".join(f"{g.label}: price {usd(g.price_nanos)}, "
                     f"cost {usd(g.cost_nanos) if g.cost_nanos is not None else 'unknown'}" for g in groups)
    parts = _open(name, title, desc, width, height)
    for tick in ticks:
        parts.append(f'<line class="{"zero" if tick == 0 else "grid"}" x1="{left}" x2="{width - right}" '
                     f'y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
                     f'<text class="axis" x="{left - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{usd(tick)}</text>')
    chars = max(6, int(slot / 7))
    for i, g in enumerate(groups):
        mid = left + slot * (i + 0.5)
        bars = ([(-bar_w - 2, "revenue", g.price_nanos, "price"), (2, "cost", g.cost_nanos, "cost")]
                if g.cost_nanos is not None else [(-bar_w / 2, "unknown", g.price_nanos, "price, cost unknown")])
        for offset, css, value, what in bars:
            top_y = y(value)
            parts.append(f'<rect class="bar {css}" x="{mid + offset:.1f}" y="{top_y:.1f}" width="{bar_w:.1f}" '
                         f'height="{max(1.0, y(0) - top_y):.1f}" rx="2"><title>{_esc(g.label)} · {what}: '
                         f'{usd(value)}</title></rect>')
        label_css = "label loss" if g.loss else "label"
        parts.append(f'<text class="{label_css}" x="{mid:.1f}" y="{height - 32}" text-anchor="middle">'
                     f'{_esc(_clip(g.label, chars))}</text>')
        if g.note:
            parts.append(f'<text class="note" x="{mid:.1f}" y="{height - 16}" text-anchor="middle">'
                         f'{_esc(_clip(g.note, chars + 4))}</text>')
        if g.loss:
            peak = y(max(g.price_nanos, g.cost_nanos or 0))
            parts.append(f'<text class="flag-mark" x="{mid:.1f}" y="{max(top - 6, peak - 8):.1f}" '
                         f'text-anchor="middle">▼ loss</text>')
    parts.append("</svg>")
    return "".join(parts)

"""One self-contained HTML file a person opens in a browser.

No scripts, no fonts, no stylesheets or images from elsewhere (CI machines and
the people reading may be offline): the CSS is inline and every chart is SVG
drawn here, in Python. Every string that comes from a report goes through
``html.escape`` (a frame's content is attacker-chosen text, and this file is
opened in a browser), and every coordinate through ``float``.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import attrs

from partywall import __version__
from partywall.benchreport import BenchReport, as_json
from partywall.errors import HarnessError
from partywall.stats import LatencyHistogram, min_samples_for

METRIC_TITLES: dict[str, str] = {
    "connect": "Connect (handshake until welcome)",
    "agent_startup": "Agent start-up, as the client sees it",
    "first_chunk": "Time to first chunk",
    "response": "Time to the complete reply",
    "history": "History read",
}
COLORS = {
    "connect": "#4c78a8",
    "agent_startup": "#59a14f",
    "fail": "#e15759",
    "server": "#4c78a8",
    "client": "#f28e2b",
    "p50": "#6b6b6b",
    "p95": "#d37a00",
    "p99": "#c4314b",
    "limit": "#8b0000",
    "curve": "#4c78a8",
}
SHARD_COLORS = ("#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac")


def _e(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else str(value), quote=True)


def _is_num(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_ms(value: Any) -> str:
    if value is None:
        return "–"
    if not _is_num(value):
        return _e(value)
    v = float(value)
    if v < 1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def _fmt_rate(value: Any) -> str:
    if value is None:
        return "–"
    if not _is_num(value):
        return _e(value)
    # Floor, not round: 9,999 of 10,000 must not print as 100 %.
    return "100 %" if value >= 1 else f"{math.floor(float(value) * 10000) / 100:.2f} %"


def _fmt_num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if not _is_num(value):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _fmt_threshold(name: str, value: Any) -> str:
    if name.endswith("_ms"):
        return f"{_fmt_ms(value)} ms" if value is not None else "–"
    if name.endswith("_rate"):
        return _fmt_rate(value)
    if name.endswith("_mib"):
        return f"{_fmt_num(value)} MiB" if value is not None else "–"
    return _fmt_num(value)


# ---------------------------------------------------------------------------
# SVG charts
# ---------------------------------------------------------------------------


def _nice_step(span: float, count: int) -> float:
    raw = span / max(1, count)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _decimals(step: float) -> int:
    for d in range(0, 5):
        if abs(round(step, d) - step) < step * 1e-6:
            return d
    return 4


@attrs.frozen
class _Scale:
    """A linear map from data to pixels, with ticks on round numbers."""

    lo: float
    hi: float
    px_lo: float
    px_hi: float
    step: float

    @classmethod
    def nice(cls, lo: float, hi: float, px_lo: float, px_hi: float, ticks: int = 5) -> _Scale:
        if not hi > lo:
            hi = lo + (abs(lo) or 1.0)
        step = _nice_step(hi - lo, ticks)
        return cls(math.floor(lo / step) * step, math.ceil(hi / step) * step, px_lo, px_hi, step)

    def __call__(self, value: float) -> float:
        return self.px_lo + (value - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)

    def ticks(self) -> list[float]:
        n = int(round((self.hi - self.lo) / self.step))
        return [self.lo + i * self.step for i in range(n + 1)]

    def label(self, value: float) -> str:
        return f"{value:,.{_decimals(self.step)}f}"


@attrs.frozen
class _Plot:
    """The drawing area of one chart and its two scales."""

    width: int
    height: int
    x: _Scale
    y: _Scale

    @classmethod
    def make(cls, width: int, height: int, xr: tuple[float, float], yr: tuple[float, float],
             *, left: int = 58, right: int = 18, top: int = 16, bottom: int = 44,
             xticks: int = 6, yticks: int = 5) -> _Plot:
        return cls(width, height,
                   _Scale.nice(xr[0], xr[1], left, width - right, xticks),
                   _Scale.nice(yr[0], yr[1], height - bottom, top, yticks))

    def axes(self, xlabel: str, ylabel: str, ylabel_fmt: Callable[[float], str] | None = None) -> str:
        parts = []
        yfmt = ylabel_fmt or self.y.label
        for t in self.y.ticks():
            py = self.y(t)
            parts.append(f'<line class="grid" x1="{self.x.px_lo:.1f}" x2="{self.x.px_hi:.1f}" y1="{py:.1f}" y2="{py:.1f}"/>')
            parts.append(f'<text class="tick" x="{self.x.px_lo - 6:.1f}" y="{py + 4:.1f}" text-anchor="end">{_e(yfmt(t))}</text>')
        for t in self.x.ticks():
            px = self.x(t)
            parts.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{self.y.px_hi:.1f}" y2="{self.y.px_lo:.1f}"/>')
            parts.append(f'<text class="tick" x="{px:.1f}" y="{self.y.px_lo + 16:.1f}" text-anchor="middle">{_e(self.x.label(t))}</text>')
        parts.append(f'<line class="axis" x1="{self.x.px_lo:.1f}" x2="{self.x.px_hi:.1f}" y1="{self.y.px_lo:.1f}" y2="{self.y.px_lo:.1f}"/>')
        parts.append(f'<line class="axis" x1="{self.x.px_lo:.1f}" x2="{self.x.px_lo:.1f}" y1="{self.y.px_hi:.1f}" y2="{self.y.px_lo:.1f}"/>')
        mid_x = (self.x.px_lo + self.x.px_hi) / 2
        parts.append(f'<text class="label" x="{mid_x:.1f}" y="{self.height - 8}" text-anchor="middle">{_e(xlabel)}</text>')
        mid_y = (self.y.px_lo + self.y.px_hi) / 2
        parts.append(f'<text class="label" transform="translate(14 {mid_y:.1f}) rotate(-90)" text-anchor="middle">{_e(ylabel)}</text>')
        return "".join(parts)


def _svg(plot: _Plot, title: str, body: str, slug: str) -> str:
    return (
        f'<svg class="chart" id="chart-{_e(slug)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {plot.width} {plot.height}" width="{plot.width}" height="{plot.height}" '
        f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{body}</svg>'
    )


def _figure(title: str, inner: str, note: str = "", wide: bool = False) -> str:
    cls = "figure wide" if wide else "figure"
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<figure class="{cls}"><figcaption>{_e(title)}</figcaption>{inner}{note_html}</figure>'


def _no_data(title: str, why: str) -> str:
    return _figure(title, f'<div class="nodata">{_e(why)}</div>')


def _legend(plot: _Plot, entries: Sequence[tuple[str, str, str]], corner: str = "top") -> str:
    """Legend entries (label, colour, kind) at the right, top or bottom; kind is line, dash or box."""
    parts = []
    x = plot.x.px_hi - 8
    height = 15 * len(entries) + 4
    y = plot.y.px_hi + 4 if corner == "top" else plot.y.px_lo - height - 4
    width = 30 + 7 * max(len(label) for label, _, _ in entries)
    # A light backdrop keeps the legend legible where it crosses a series.
    parts.append(f'<rect x="{x - width:.1f}" y="{y - 2:.1f}" width="{width + 4:.1f}" height="{height:.1f}" '
                 'fill="#fff" fill-opacity="0.85" rx="3"/>')
    for i, (label, color, kind) in enumerate(entries):
        yy = y + i * 15
        parts.append(f'<text class="legend" x="{x - 22:.1f}" y="{yy + 9:.1f}" text-anchor="end">{_e(label)}</text>')
        if kind == "box":
            parts.append(f'<rect x="{x - 16:.1f}" y="{yy + 1:.1f}" width="14" height="9" fill="{color}"/>')
        else:
            dash = ' stroke-dasharray="4 3"' if kind == "dash" else ""
            parts.append(f'<line x1="{x - 16:.1f}" x2="{x - 2:.1f}" y1="{yy + 6:.1f}" y2="{yy + 6:.1f}" stroke="{color}" stroke-width="2.5"{dash}/>')
    return f'<g class="legend-box">{"".join(parts)}</g>'


def _floats(values: Iterable[Any]) -> list[float] | None:
    out = []
    for v in values:
        if not _is_num(v):
            return None
        out.append(float(v))
    return out


def _latency_chart(name: str, entry: Mapping[str, Any], limits: Mapping[str, Any]) -> str:
    title = f"{METRIC_TITLES.get(name, name)}: n = {entry.get('n', 0)}, failures = {entry.get('failures', 0)}"
    n = entry.get("n") or 0
    if not n:
        return _no_data(title, "No successful samples, so no distribution to draw.")
    buckets: list[tuple[float, int]] = []
    encoded = entry.get("histogram")
    if isinstance(encoded, str) and encoded:
        try:
            buckets = LatencyHistogram.decode(encoded).buckets_ms()
        except HarnessError:
            buckets = []  # the note below says the histogram was unusable
    present: dict[str, float] = {}
    for key in ("p50", "p95", "p99", "max"):
        value = entry.get(key)
        if _is_num(value):
            present[key] = float(value)
    hi = max([b[0] for b in buckets] + list(present.values()) + [0.001])
    lo = min([b[0] for b in buckets] + list(present.values()))
    # Start at 0 unless the values sit far from it (then the shape would be a
    # thin line at the right edge).
    lo = 0.0 if lo < 0.5 * hi else lo * 0.9
    plot = _Plot.make(560, 270, (lo, hi), (0.0, 1.0))
    body = [plot.axes("latency (ms)", "fraction of successes ≤ x", lambda t: f"{t * 100:.0f}%")]
    note = ""
    if buckets:
        total = sum(c for _, c in buckets)
        cum = 0
        d = [f"M{plot.x(buckets[0][0]):.2f},{plot.y(0):.2f}"]
        for edge, count in buckets:
            cum += count
            d.append(f"H{plot.x(edge):.2f}V{plot.y(cum / total):.2f}")
        d.append(f"H{plot.x.px_hi:.2f}")
        body.append(f'<path class="cdf" d="{"".join(d)}" fill="none" stroke="{COLORS["curve"]}" stroke-width="2"/>')
    else:
        note = "The report carries no usable histogram; only the percentiles are drawn."
        pts = sorted((v, {"p50": 0.5, "p95": 0.95, "p99": 0.99, "max": 1.0}[k]) for k, v in present.items())
        body.append("".join(
            f'<circle cx="{plot.x(v):.2f}" cy="{plot.y(f):.2f}" r="4" fill="{COLORS["curve"]}"/>' for v, f in pts
        ))
    label_row = 0
    for key in ("p50", "p95", "p99"):
        if key not in present:
            continue
        v = present[key]
        px = plot.x(v)
        anchor = "end" if px > plot.x.px_lo + 0.75 * (plot.x.px_hi - plot.x.px_lo) else "start"
        dx = -4 if anchor == "end" else 4
        ty = plot.y.px_hi + 12 + 13 * label_row
        label_row += 1
        body.append(
            f'<g class="marker marker-{key}"><line x1="{px:.2f}" x2="{px:.2f}" y1="{plot.y.px_hi:.1f}" '
            f'y2="{plot.y.px_lo:.1f}" stroke="{COLORS[key]}" stroke-width="1.5" stroke-dasharray="5 3"/>'
            f'<text class="mark" x="{px + dx:.2f}" y="{ty:.1f}" text-anchor="{anchor}" fill="{COLORS[key]}">'
            f"{key} {_e(_fmt_ms(v))} ms</text></g>"
        )
    limit_notes = []
    for key in ("p95", "p99"):
        limit = limits.get(f"{name}_{key}_ms")
        if limit is None or not _is_num(limit):
            continue
        if plot.x.lo <= limit <= plot.x.hi:
            px = plot.x(limit)
            body.append(
                f'<line class="limit" x1="{px:.2f}" x2="{px:.2f}" y1="{plot.y.px_hi:.1f}" y2="{plot.y.px_lo:.1f}" '
                f'stroke="{COLORS["limit"]}" stroke-width="2"/>'
                f'<text class="mark" x="{px - 4:.2f}" y="{plot.y.px_lo - 6:.1f}" text-anchor="end" '
                f'fill="{COLORS["limit"]}">{key} limit {_e(_fmt_ms(limit))} ms</text>'
            )
        else:
            limit_notes.append(f"{key} limit {_fmt_ms(limit)} ms is off the scale")
    if limit_notes:
        note = (note + " " if note else "") + "; ".join(limit_notes) + "."
    return _figure(title, _svg(plot, title, "".join(body), f"latency-{name}"), _e(note))


def _timeline_rows(report: Mapping[str, Any], kind: str) -> list[tuple[float, float, float, bool]]:
    rows = []
    for row in (report.get("timeline") or {}).get(kind) or []:
        if not isinstance(row, Sequence) or len(row) < 4:
            continue
        nums = _floats(row[:2])
        if nums is None:
            continue
        end = row[2] if _is_num(row[2]) else nums[1]
        rows.append((nums[0], nums[1], float(end), bool(row[3])))
    return rows


def _gantt_chart(report: Mapping[str, Any]) -> str:
    title = "Connections and agent start-ups over time, one row per user"
    connect = _timeline_rows(report, "connect")
    startup = _timeline_rows(report, "agent_startup")
    if not connect and not startup:
        return _no_data(title, "The report has no timeline.")
    users = sorted({int(r[0]) for r in connect + startup})
    row_of = {u: i for i, u in enumerate(users)}
    t_end = max(r[2] for r in connect + startup)
    height = max(260, min(620, 60 + 3 * len(users)))
    plot = _Plot.make(1100, height, (0.0, t_end), (0.0, float(len(users))), yticks=6)
    body = [plot.axes("seconds since the run started", "user (plan order)")]
    row_h = abs(plot.y(1) - plot.y(0))
    bar_h = max(0.6, row_h * 0.8)
    titled = len(users) <= 300  # hover titles for every bar would bloat big runs
    for kind, rows in (("connect", connect), ("agent_startup", startup)):
        color = COLORS[kind]
        bars = []
        for user, t0, t1, ok in rows:
            x0 = plot.x(t0)
            w = max(1.0, plot.x(t1) - x0)
            y = plot.y(row_of[int(user)] + 1) + (row_h - bar_h) / 2
            fill = color if ok else COLORS["fail"]
            tip = f"<title>user {int(user)} {kind}: {(t1 - t0) * 1000:.1f} ms{'' if ok else ' (failed)'}</title>" if titled else ""
            bars.append(f'<rect x="{x0:.2f}" y="{y:.2f}" width="{w:.2f}" height="{bar_h:.2f}" fill="{fill}">{tip}</rect>')
        body.append(f'<g class="bars bars-{kind}">{"".join(bars)}</g>')
    body.append(_legend(plot, [("connect", COLORS["connect"], "box"),
                               ("agent start-up", COLORS["agent_startup"], "box"),
                               ("failed", COLORS["fail"], "box")]))
    return _figure(title, _svg(plot, title, "".join(body), "gantt"), wide=True)


def _cumulative_chart(report: Mapping[str, Any]) -> str:
    title = "Established connections and started agents over time"
    series = {k: _timeline_rows(report, k) for k in ("connect", "agent_startup")}
    if not any(series.values()):
        return _no_data(title, "The report has no timeline.")
    t_end = max(r[2] for rows in series.values() for r in rows)
    total = max(len(rows) for rows in series.values())
    plot = _Plot.make(1100, 280, (0.0, t_end), (0.0, float(total)))
    body = [plot.axes("seconds since the run started", "count")]
    failed_total = 0
    for kind, rows in series.items():
        done = sorted(r[2] for r in rows if r[3])
        d = [f"M{plot.x(0):.2f},{plot.y(0):.2f}"]
        for i, t in enumerate(done, start=1):
            d.append(f"H{plot.x(t):.2f}V{plot.y(i):.2f}")
        d.append(f"H{plot.x.px_hi:.2f}")
        body.append(f'<path class="cumulative cumulative-{kind}" d="{"".join(d)}" fill="none" stroke="{COLORS[kind]}" stroke-width="2.2"/>')
        failed = sorted(r[2] for r in rows if not r[3])
        failed_total += len(failed)
        for i, t in enumerate(failed, start=1):
            body.append(f'<circle cx="{plot.x(t):.2f}" cy="{plot.y(i):.2f}" r="3.5" fill="{COLORS["fail"]}"><title>{kind} failure at {t:.3f} s</title></circle>')
    entries = [("connections established", COLORS["connect"], "line"),
               ("agents started", COLORS["agent_startup"], "line")]
    if failed_total:
        entries.append(("failures (cumulative)", COLORS["fail"], "box"))
    body.append(_legend(plot, entries, corner="bottom"))
    return _figure(title, _svg(plot, title, "".join(body), "cumulative"), wide=True)


def _resource_series(report: Mapping[str, Any], key: str) -> dict[str, list[tuple[float, float]]]:
    samples = report.get("samples") or {}
    out: dict[str, list[tuple[float, float]]] = {}
    for who in ("server", "client"):
        for s in samples.get(who) or []:
            if not isinstance(s, Mapping) or not (_is_num(s.get("t")) and _is_num(s.get(key))):
                continue
            label = who if s.get("shard") is None else f"{who} (shard {_e(s['shard'])})"
            out.setdefault(label, []).append((float(s["t"]), float(s[key])))
    for points in out.values():
        points.sort()
    return out


def _resource_chart(report: Mapping[str, Any], key: str, title: str, ylabel: str, slug: str,
                    reference: tuple[float, str] | None = None) -> str:
    series = _resource_series(report, key)
    if not series:
        return _no_data(title, "The report has no resource samples.")
    xs = [t for pts in series.values() for t, _ in pts]
    ys = [v for pts in series.values() for _, v in pts]
    y_hi = max(ys + ([reference[0]] if reference and max(ys) > 0.6 * reference[0] else []) + [1.0])
    plot = _Plot.make(560, 270, (0.0, max(xs + [0.001])), (0.0, y_hi * 1.05))
    body = [plot.axes("seconds since the run started", ylabel)]
    if reference and reference[0] <= plot.y.hi:
        py = plot.y(reference[0])
        body.append(f'<line x1="{plot.x.px_lo:.1f}" x2="{plot.x.px_hi:.1f}" y1="{py:.2f}" y2="{py:.2f}" stroke="#999" stroke-dasharray="2 3"/>'
                    f'<text class="mark" x="{plot.x.px_lo + 4:.1f}" y="{py - 4:.2f}" fill="#777">{_e(reference[1])}</text>')
    entries = []
    shard_i = 0
    for label, pts in series.items():
        if label in COLORS:
            color = COLORS[label]
        else:
            color = SHARD_COLORS[shard_i % len(SHARD_COLORS)]
            shard_i += 1
        d = " ".join(f"{plot.x(t):.2f},{plot.y(v):.2f}" for t, v in pts)
        body.append(f'<polyline class="series series-{_e(label.split()[0])}" points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        entries.append((label, color, "line"))
    body.append(_legend(plot, entries))
    return _figure(title, _svg(plot, title, "".join(body), slug))


# ---------------------------------------------------------------------------
# Tables and the page
# ---------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table; ``head`` is plain text, cells are already-escaped HTML."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _verdict(ok: Any) -> str:
    return '<span class="ok">ok</span>' if ok else '<span class="bad">FAILED</span>'


def _small_n_note(entry: Mapping[str, Any]) -> str:
    n = entry.get("n") or 0
    if not isinstance(n, int) or n <= 0:
        return ""
    capped = [p for p in (95, 99) if n < min_samples_for(p)]
    if not capped:
        return ""
    names = " and ".join(f"p{p}" for p in capped)
    return f"{names} {'is' if len(capped) == 1 else 'are'} the maximum at n = {n} (nearest-rank)"


def _thresholds_section(report: Mapping[str, Any]) -> str:
    thresholds = report.get("thresholds") or {}
    if not thresholds:
        return ""
    rows = [
        (f"<code>{_e(name)}</code>", _fmt_threshold(str(name), t.get("actual")),
         _fmt_threshold(str(name), t.get("limit")), _verdict(t.get("ok")))
        for name, t in thresholds.items()
    ]
    return "<section><h2>Thresholds</h2>" + _table(["threshold", "actual", "limit", "verdict"], rows, "thresholds") + "</section>"


def _violations_section(report: Mapping[str, Any]) -> str:
    violations = report.get("violations") or []
    not_run = report.get("not_run") or []
    parts = ["<section><h2>Violations</h2>"]
    if not violations:
        parts.append('<p class="none">None: every invariant held.</p>')
    else:
        parts.append('<ol class="violations">')
        for v in violations:
            extra = ""
            if v.get("reproduced") is not None:
                extra += f' <span class="dim">reproduced {_e(v["reproduced"])}</span>'
            if v.get("replay"):
                extra += f' <span class="dim">replay <code>{_e(v["replay"])}</code></span>'
            evidence = json.dumps(v.get("evidence") or {}, indent=2, ensure_ascii=False, default=str, sort_keys=True)
            parts.append(
                f'<li><span class="inv">{_e(v.get("invariant", "?"))}</span> {_e(v.get("title", ""))}{extra}'
                f"<details><summary>evidence</summary><pre>{_e(evidence)}</pre></details></li>"
            )
        parts.append("</ol>")
    if not_run:
        items = "".join(f"<li>{_e(item if isinstance(item, str) else json.dumps(item, default=str))}</li>" for item in not_run)
        parts.append(f'<h3>Checks that did not run</h3><ul class="notrun">{items}</ul>')
    parts.append("</section>")
    return "".join(parts)


def _latency_section(report: Mapping[str, Any]) -> str:
    latency = report.get("latency_ms") or {}
    if not latency:
        return ""
    success = report.get("success_rate") or {}
    rows = []
    for name, entry in latency.items():
        attempts = (entry.get("n") or 0) + (entry.get("failures") or 0) if all(
            isinstance(entry.get(k) or 0, int) for k in ("n", "failures")) else None
        rate = success.get(name)
        if rate is None and attempts:
            rate = (entry.get("n") or 0) / attempts
        rows.append((
            f"<code>{_e(name)}</code>", _fmt_num(entry.get("n")), _fmt_num(entry.get("failures")),
            _fmt_rate(rate), _fmt_ms(entry.get("p50")), _fmt_ms(entry.get("p95")),
            _fmt_ms(entry.get("p99")), _fmt_ms(entry.get("max")), _fmt_ms(entry.get("mean")),
            _e(_small_n_note(entry)),
        ))
    table = _table(["metric", "n", "failures", "success", "p50", "p95", "p99", "max", "mean", "note"], rows, "latency")
    rates = "".join(f"<li><code>{_e(k)}</code> {_fmt_rate(v)}</li>" for k, v in success.items())
    overhead = report.get("measurement_overhead_ms")
    over_html = ""
    if isinstance(overhead, Mapping):
        over_html = (
            "<h3>Measurement overhead</h3><p>Client-seen agent start-up minus the server's own "
            "<code>startup_ms</code>: what the suite itself adds.</p>"
            + _table(["n", "p50", "p95", "p99", "max"], [(
                _fmt_num(overhead.get("n")), _fmt_ms(overhead.get("p50")), _fmt_ms(overhead.get("p95")),
                _fmt_ms(overhead.get("p99")), _fmt_ms(overhead.get("max")))], "overhead")
        )
        if overhead.get("merged"):
            over_html += f'<p class="note">{_e(overhead["merged"])}</p>'
    limits = {k: v.get("limit") for k, v in (report.get("thresholds") or {}).items() if isinstance(v, Mapping)}
    charts = "".join(_latency_chart(str(name), entry, limits) for name, entry in latency.items())
    return (
        "<section><h2>Latencies (ms)</h2>"
        "<p>Nearest-rank percentiles over successful requests, measured from when each request "
        "was meant to go out; failures and time-outs are counted beside them, never dropped.</p>"
        f"{table}<h3>Success rates</h3><ul class=\"rates\">{rates}</ul>{over_html}"
        f'<h3>Distributions</h3><div class="grid">{charts}</div></section>'
    )


def _resources_section(report: Mapping[str, Any]) -> str:
    server, client = report.get("server"), report.get("client")
    if not server and not client and not (report.get("samples") or {}):
        return ""
    rows = []
    for who, res in (("server", server), ("client (the suite)", client)):
        if not isinstance(res, Mapping):
            rows.append((_e(who), "not sampled", "", "", "", "", "", ""))
            continue
        rows.append((_e(who), _e(res.get("pid", "–")), _fmt_num(res.get("cpu_percent_peak")),
                     _fmt_num(res.get("cpu_percent_mean")), _fmt_num(res.get("rss_mib_peak")),
                     _fmt_num(res.get("rss_mib_mean")), _fmt_num(res.get("open_files_peak")),
                     _fmt_num(res.get("threads_peak"))))
    table = _table(["process", "pid", "CPU peak %", "CPU mean %", "RSS peak MiB", "RSS mean MiB",
                    "open files peak", "threads peak"], rows, "resources")
    charts = (
        _resource_chart(report, "cpu_percent", "Server and client CPU over time", "% of one core",
                        "cpu", reference=(100.0, "one core"))
        + _resource_chart(report, "rss_mib", "Server and client memory over time", "RSS (MiB)", "memory")
    )
    return (
        "<section><h2>Resources</h2><p>Read by pid with psutil: the server's own process (the "
        "one listening on the port) and the suite's. CPU is percent of one core, so two busy "
        f"cores read 200.</p>{table}<div class=\"grid\">{charts}</div></section>"
    )


def _header(report: Mapping[str, Any]) -> str:
    if report.get("error"):
        state, cls = "could not run", "state-error"
    elif report.get("ok"):
        state, cls = "passed", "state-ok"
    else:
        state, cls = "failed", "state-fail"
    kind = "bench" if "plan_fingerprint" in report else "run"
    target = report.get("target") or {}
    target_text = (f"{target.get('kind', '?')} {target.get('url') or ''}".strip()
                   if isinstance(target, Mapping) else str(target))
    facts = [
        ("users", _fmt_num(report.get("users"))),
        ("seed", _e(report.get("seed", "–"))),
        ("plan fingerprint", f"<code>{_e(report.get('plan_fingerprint', '–'))}</code>"),
        ("target", _e(target_text or "–")),
        ("duration", f"{_fmt_num(report.get('duration_s'), 2)} s"),
    ]
    if report.get("shards"):
        facts.append(("shards", _fmt_num(report.get("shards"))))
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{v}</dd></div>" for k, v in facts)
    error = f'<p class="error">{_e(report["error"])}</p>' if report.get("error") else ""
    return (
        f'<header><h1>partywall {kind} report <span class="badge {cls}">{state}</span></h1>'
        f'<dl class="facts">{dl}</dl>{error}</header>'
    )


_CSS = """
:root{--fg:#1d2330;--dim:#5b6472;--line:#d9dde3;--bg:#fff;--soft:#f5f7fa}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
header{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin-bottom:18px}
h1{font-size:22px;margin:0 0 10px}
h2{font-size:18px;margin:0 0 10px}
h3{font-size:15px;margin:18px 0 8px}
section{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin-bottom:18px}
.badge{display:inline-block;font-size:13px;padding:2px 10px;border-radius:12px;vertical-align:middle;margin-left:8px;color:#fff}
.state-ok{background:#2e7d32}.state-fail{background:#c62828}.state-error{background:#8d6e00}
.facts{display:flex;flex-wrap:wrap;gap:8px 28px;margin:0}
.facts div{min-width:120px}.facts dt{color:var(--dim);font-size:12px}.facts dd{margin:0;font-weight:600;word-break:break-all}
.error{background:#fff4e5;border-left:4px solid #8d6e00;padding:8px 12px;margin:12px 0 0}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:right;padding:5px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td:last-child{white-space:normal}
th{font-size:12px;color:var(--dim);font-weight:600}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:700}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:10px;background:#fff}
figure.wide{margin:10px 0}
figcaption{font-weight:600;margin-bottom:6px}
svg.chart{display:block;width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#3b4350}
svg text.label{font-size:12px;fill:var(--dim)}
svg text.mark{font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
svg .grid{stroke:#eceff3}svg .axis{stroke:#9aa3ae}
.note{color:var(--dim);font-size:12px;margin:6px 0 0}
.nodata{color:var(--dim);padding:30px;text-align:center}
.violations li{margin-bottom:8px}.inv{font-family:ui-monospace,monospace;background:#fdecea;color:#b71c1c;padding:1px 6px;border-radius:4px}
pre{background:var(--soft);padding:10px;overflow:auto;max-height:360px;font-size:12px}
.dim{color:var(--dim)}.none{color:#2e7d32}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
footer{color:var(--dim);font-size:12px;text-align:center}
"""


def render_html(report: BenchReport | Mapping[str, Any]) -> str:
    """The whole page as a string (see `write_html`); a bench report is read through its model."""
    report = as_json(report)
    title = "partywall " + ("bench" if "plan_fingerprint" in report else "run") + " report"
    timeline = ""
    if report.get("timeline"):
        timeline = ("<section><h2>Over time</h2>" + _cumulative_chart(report) + _gantt_chart(report)
                    + "</section>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No network at all: a report must never phone home, and CI has none.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + _header(report)
        + _thresholds_section(report)
        + _violations_section(report)
        + _latency_section(report)
        + timeline
        + _resources_section(report)
        + f"<footer>partywall {_e(__version__)}: one self-contained file, no scripts, no network.</footer>"
        "</main></body></html>\n"
    )


def write_html(report: BenchReport | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the report as one self-contained HTML file with inline SVG charts."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")

"""`vllm-mw report`: one self-contained HTML file (inline CSS and SVG, no script, no network).

Figures come from DuckDB over the `logs` view (`_query`), so the tree is read once per section
in DuckDB's own constant-memory aggregation. Percentiles are exact and interpolated:
DuckDB's `quantile_cont`, the same definition as numpy's default (`method="linear"`).
"""

from __future__ import annotations

import html
import os
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from ._exceptions import ConfigurationError
from ._query import connect
from ._reader import DateLike

__all__ = ["ReportOptions", "build_report", "figures", "load_prices", "render"]

_PCTS = "quantile_cont({col}, 0.5), quantile_cont({col}, 0.9), quantile_cont({col}, 0.99)"
_TOP = 20
_COLORS = ("#2f6fdf", "#e0822b", "#c23b3b", "#3a9a5b", "#8a55c9", "#7f7f7f")


@dataclass
class ReportOptions:
    since: DateLike | None = None
    until: DateLike | None = None
    by: str = "model"  # model | host | meta.KEY
    prices: dict[str, tuple[float, float]] | None = None  # model -> ($/M input, $/M output)


def load_prices(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """`[models."NAME"] input = 0.20  output = 0.60` (price per million tokens)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read the price table {str(path)!r}: {exc}") from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise ConfigurationError('the price table needs [models."NAME"] tables')
    prices = {}
    for name, entry in models.items():
        try:
            prices[name] = (float(entry["input"]), float(entry["output"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigurationError(
                f"price for model {name!r} needs numbers 'input' and 'output'"
            ) from None
    return prices


def _dimension(by: str) -> str:
    if by in ("model", "host", "endpoint"):
        return f"coalesce(CAST({by} AS VARCHAR), '(none)')"
    if by.startswith("meta.") and len(by) > 5:
        key = by[5:].replace("'", "''")
        return f"coalesce(metadata->>'{key}', '(none)')"
    raise ConfigurationError(f"--by takes model, host, endpoint or meta.KEY, not {by!r}")


def _day(value: DateLike | None, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    digits = value.strip().replace("-", "")
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        raise ConfigurationError(f"{name} must be YYYY-MM-DD or YYYYMMDD, not {value!r}") from None


def _where(options: ReportOptions) -> str:
    clauses = []
    lo = _day(options.since, "--since")
    hi = _day(options.until, "--until")
    if lo:
        clauses.append(f"date >= DATE '{lo}'")
    if hi:
        clauses.append(f"date <= DATE '{hi}'")
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(header)}" class="empty">none</td></tr>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def svg_lines(title: str, labels: list[str], series: dict[str, list[float | None]]) -> str:
    """A line chart as inline SVG: one polyline per series over the labels."""
    width, height, left, bottom, top = 760, 260, 56, 40, 24
    plot_w, plot_h = width - left - 16, height - top - bottom
    values = [v for vs in series.values() for v in vs if v is not None]
    peak = max(values) if values else 1.0
    peak = peak if peak > 0 else 1.0
    n = max(len(labels), 1)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / peak

    parts = [
        f'<svg class="chart" role="img" aria-label="{_esc(title)}" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" class="title">{_esc(title)}</text>',
    ]
    for k in range(5):
        v = peak * k / 4
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" class="tick" text-anchor="end">'
            f"{_num(v)}</text>"
        )
    step = max(1, len(labels) // 8)
    for i, label in enumerate(labels):
        if i % step == 0:
            parts.append(
                f'<text x="{x(i):.1f}" y="{height - bottom + 16}" class="tick" '
                f'text-anchor="middle">{_esc(label)}</text>'
            )
    for idx, (name, vs) in enumerate(series.items()):
        color = _COLORS[idx % len(_COLORS)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vs) if v is not None)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, point in enumerate(vs):
            if point is not None:
                parts.append(
                    f'<circle cx="{x(i):.1f}" cy="{y(point):.1f}" r="2.5" fill="{color}">'
                    f"<title>{_esc(name)} {_esc(labels[i])}: {_num(point)}</title></circle>"
                )
        parts.append(
            f'<rect x="{left + idx * 110}" y="{height - 14}" width="10" height="10" '
            f'fill="{color}"/><text x="{left + idx * 110 + 14}" y="{height - 5}" '
            f'class="tick">{_esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(title: str, labels: list[str], values: list[float]) -> str:
    """A horizontal bar chart as inline SVG."""
    row, left, width = 22, 200, 760
    height = 30 + row * max(len(labels), 1)
    peak = max(values) if values and max(values) > 0 else 1.0
    parts = [
        f'<svg class="chart" role="img" aria-label="{_esc(title)}" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="4" y="14" class="title">{_esc(title)}</text>',
    ]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        top = 24 + i * row
        bar = (width - left - 90) * value / peak
        short = label if len(label) <= 30 else label[:29] + "…"
        parts.append(
            f'<text x="{left - 6}" y="{top + 14}" class="tick" text-anchor="end">{_esc(short)}'
            f"<title>{_esc(label)}</title></text>"
            f'<rect x="{left}" y="{top + 3}" width="{bar:.1f}" height="{row - 6}" '
            f'fill="{_COLORS[0]}"/><text x="{left + bar + 6:.1f}" y="{top + 14}" '
            f'class="tick">{_num(value, 2)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def figures(log_dir: str | os.PathLike[str], options: ReportOptions) -> dict[str, Any]:
    """Every figure the report shows, as query results (rows of tuples)."""
    dim = _dimension(options.by)
    where = _where(options)
    con = connect(log_dir)
    try:

        def q(sql: str) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = con.execute(sql).fetchall()
            return rows

        src = f"(SELECT * FROM logs {where})"
        (total, errors, tin, tout, first, last) = q(
            f"SELECT count(*), count(error), sum(input_tokens), sum(output_tokens), "
            f"min(date), max(date) FROM {src}"
        )[0]
        lat = q(f"SELECT {_PCTS.format(col='latency_ms')} FROM {src}")[0]
        ttft = q(f"SELECT {_PCTS.format(col='ttft_ms')} FROM {src}")[0]
        hourly = first is not None and first == last
        bucket = "strftime(ts, '%H:00')" if hourly else "strftime(date, '%Y-%m-%d')"
        over_time = q(
            f"SELECT {bucket} AS b, count(*), count(error), {_PCTS.format(col='latency_ms')}, "
            f"{_PCTS.format(col='ttft_ms')} FROM {src} GROUP BY b ORDER BY b"
        )
        by_dim = q(
            f"SELECT {dim} AS d, count(*), count(error), sum(input_tokens), sum(output_tokens), "
            f"{_PCTS.format(col='latency_ms')}, {_PCTS.format(col='ttft_ms')} FROM {src} "
            f"GROUP BY d ORDER BY 2 DESC, 1"
        )
        costs = []
        if options.prices is not None:
            costs = q(
                f"SELECT {dim} AS d, model, sum(input_tokens), sum(output_tokens) FROM {src} "
                f"GROUP BY d, model ORDER BY d, model"
            )
        streams = q(
            f"SELECT coalesce(stream_end, '(not recorded)'), count(*) FROM {src} "
            f"WHERE stream GROUP BY 1 ORDER BY 2 DESC"
        )
        slowest = q(
            f"SELECT request_id, timestamp, model, host, latency_ms, error FROM {src} "
            f"WHERE latency_ms IS NOT NULL ORDER BY latency_ms DESC LIMIT {_TOP}"
        )
        failing = q(
            f"SELECT request_id, timestamp, model, host, status_code, error FROM {src} "
            f"WHERE error IS NOT NULL ORDER BY timestamp DESC LIMIT {_TOP}"
        )
    finally:
        con.close()
    return {
        "totals": (total, errors, tin, tout, first, last),
        "latency": lat,
        "ttft": ttft,
        "hourly": hourly,
        "over_time": over_time,
        "by_dim": by_dim,
        "costs": costs,
        "streams": streams,
        "slowest": slowest,
        "failing": failing,
    }


def build_report(log_dir: str | os.PathLike[str], options: ReportOptions) -> str:
    """The report as one HTML document."""
    return render(figures(log_dir, options), options)


def render(figs: dict[str, Any], options: ReportOptions) -> str:
    """The HTML document for `figures`' results."""
    total, errors, tin, tout, first, last = figs["totals"]
    lat, ttft, hourly = figs["latency"], figs["ttft"], figs["hourly"]
    over_time, by_dim, costs = figs["over_time"], figs["by_dim"], figs["costs"]
    streams, slowest, failing = figs["streams"], figs["slowest"], figs["failing"]
    rate = (errors / total) if total else 0.0
    cards = [
        ("requests", _num(total)),
        ("errors", f"{_num(errors)} ({rate:.2%})"),
        ("tokens in / out", f"{_num(tin or 0)} / {_num(tout or 0)}"),
        ("latency p50 / p90 / p99 ms", " / ".join(_num(v) for v in lat)),
        ("TTFT p50 / p90 / p99 ms", " / ".join(_num(v) for v in ttft)),
    ]
    body = [
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="label">{_esc(k)}</div><div class="value">{v}</div>'
            "</div>"
            for k, v in cards
        )
        + "</div>"
    ]
    labels = [str(r[0]) for r in over_time]
    unit = "hour (UTC)" if hourly else "day (UTC)"
    body.append(
        _section(
            f"Over time, by {unit}",
            svg_lines(
                f"requests and errors per {unit}",
                labels,
                {
                    "requests": [float(r[1]) for r in over_time],
                    "errors": [float(r[2]) for r in over_time],
                },
            )
            + svg_lines(
                "latency ms",
                labels,
                {
                    "p50": [r[3] for r in over_time],
                    "p90": [r[4] for r in over_time],
                    "p99": [r[5] for r in over_time],
                },
            )
            + svg_lines(
                "time to first token ms",
                labels,
                {
                    "p50": [r[6] for r in over_time],
                    "p90": [r[7] for r in over_time],
                    "p99": [r[8] for r in over_time],
                },
            ),
        )
    )
    header = ["requests", "errors", "error rate", "tokens in", "tokens out"]
    header += ["latency p50", "p90", "p99", "TTFT p50", "p90", "p99"]
    rows = [
        [
            _esc(r[0]),
            _num(r[1]),
            _num(r[2]),
            f"{(r[2] / r[1]) if r[1] else 0:.2%}",
            _num(r[3] or 0),
            _num(r[4] or 0),
            *(_num(v) for v in r[5:11]),
        ]
        for r in by_dim
    ]
    body.append(
        _section(
            f"By {options.by}",
            svg_bars(
                f"requests by {options.by}",
                [str(r[0]) for r in by_dim][:30],
                [float(r[1]) for r in by_dim][:30],
            )
            + _table([options.by, *header], rows, "by-dim"),
        )
    )
    if options.prices is not None:
        body.append(_section("Cost", _cost_table(costs, options)))
    body.append(
        _section(
            "Streams by how they ended",
            _table(["stream_end", "streams"], [[_esc(r[0]), _num(r[1])] for r in streams]),
        )
    )
    body.append(
        _section(
            f"The {_TOP} slowest requests",
            _table(
                ["request_id", "time", "model", "host", "latency ms", "error"],
                [
                    [
                        f"<code>{_esc(r[0])}</code>",
                        _esc(r[1]),
                        _esc(r[2]),
                        _esc(r[3]),
                        _num(r[4]),
                        _esc(r[5]),
                    ]
                    for r in slowest
                ],
            ),
        )
    )
    body.append(
        _section(
            f"The {_TOP} latest failing requests",
            _table(
                ["request_id", "time", "model", "host", "status", "error"],
                [
                    [
                        f"<code>{_esc(r[0])}</code>",
                        _esc(r[1]),
                        _esc(r[2]),
                        _esc(r[3]),
                        _esc(r[4]),
                        _esc(r[5]),
                    ]
                    for r in failing
                ],
            ),
        )
    )
    span = f"{first} to {last}" if first is not None else "no records"
    css = resources.files("vllm_middleware").joinpath("_assets/report.css").read_text()
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>vllm-middleware report {_esc(span)}</title><style>{css}</style></head><body>"
        f"<header><h1>vllm-middleware report</h1><p>{_esc(span)} · by {_esc(options.by)} · "
        f"made {made} · percentiles exact (linear interpolation)</p></header>"
        + "".join(body)
        + "</body></html>"
    )


def _cost_table(costs: list[tuple[Any, ...]], options: ReportOptions) -> str:
    prices = options.prices or {}
    totals: dict[str, float] = {}
    unpriced: set[str] = set()
    for dim, model, tin, tout in costs:
        price = prices.get(str(model))
        if price is None:
            unpriced.add(str(model))
            continue
        cost = ((tin or 0) * price[0] + (tout or 0) * price[1]) / 1_000_000
        totals[str(dim)] = totals.get(str(dim), 0.0) + cost
    rows = [[_esc(d), f"{c:,.4f}"] for d, c in sorted(totals.items(), key=lambda kv: -kv[1])]
    note = ""
    if unpriced:
        note = f'<p class="note">no price for: {_esc(", ".join(sorted(unpriced)))}</p>'
    return _table([options.by, "cost"], rows) + note

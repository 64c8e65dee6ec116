"""`vllm-mw ui`: a local, read-only web viewer of the logs (the `[ui]` extra: Starlette, uvicorn).

Server-rendered pages, no script and nothing fetched from the network: the request table
(filters, pages) and the counts come from DuckDB over the `logs` view (`_query`), with every
user value passed as a query parameter; a request's page reads its one record back through the
reader (its partition only) with media restored from the media store, and renders the
conversation. The report's page is `vllm-mw report` rendered live. Only GET is served.
"""

from __future__ import annotations

import html
import ipaddress
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson

from ._exceptions import ConfigurationError, VLLMMiddlewareError
from ._query import connect
from ._reader import iter_logs
from ._record_view import answer_text, prompt_text

__all__ = ["check_listen", "create_app", "serve"]

PAGE_SIZE = 50
_CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src data:; media-src data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def check_listen(listen: str, allow_remote: bool) -> tuple[str, int]:
    """(host, port) of `HOST:PORT`; a non-loopback host needs `allow_remote`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigurationError(f"--listen takes HOST:PORT, not {listen!r}")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ConfigurationError(
            f"refusing to listen on {host}: the viewer shows prompts and answers; "
            "use 127.0.0.1, or --allow-remote if you mean it"
        )
    return host, int(port)


@dataclass
class _Filters:
    since: str = ""
    until: str = ""
    model: str = ""
    host: str = ""
    status: str = ""  # "", "ok", "error"
    meta: str = ""  # key=value
    q: str = ""
    page: int = 1

    @classmethod
    def of(cls, params: Any) -> _Filters:
        page = params.get("page", "1")
        return cls(
            **{k: str(params.get(k, "")).strip() for k in ("since", "until", "model", "host")},
            status=str(params.get("status", "")),
            meta=str(params.get("meta", "")).strip(),
            q=str(params.get("q", "")).strip(),
            page=max(1, int(page)) if str(page).isdigit() else 1,
        )

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.since:
            clauses.append("date >= CAST(? AS DATE)")
            args.append(self.since)
        if self.until:
            clauses.append("date <= CAST(? AS DATE)")
            args.append(self.until)
        if self.model:
            clauses.append("model = ?")
            args.append(self.model)
        if self.host:
            clauses.append("host = ?")
            args.append(self.host)
        if self.status == "ok":
            clauses.append("error IS NULL")
        elif self.status == "error":
            clauses.append("error IS NOT NULL")
        if self.meta:
            key, _, value = self.meta.partition("=")
            clauses.append("json_extract_string(metadata, ?) = ?")
            args += ["$." + '"' + key.replace('"', "") + '"', value]
        if self.q:
            clauses.append(
                "(CAST(messages AS VARCHAR) ILIKE ? OR CAST(prompt AS VARCHAR) ILIKE ? "
                "OR CAST(response AS VARCHAR) ILIKE ?)"
            )
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%") + "%"
            args += [pattern] * 3
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", args

    def query(self, **change: Any) -> str:
        values = {**self.__dict__, **change}
        return urlencode({k: v for k, v in values.items() if v not in ("", None, 1) or k == "q"})


def _page(title: str, body: str) -> str:
    nav = '<nav><a href="/">requests</a> <a href="/report">report</a></nav>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{_esc(title)} · vllm-middleware</title><link rel="stylesheet" href="/ui.css">'
        f"</head><body><header><h1>{_esc(title)}</h1>{nav}</header>{body}</body></html>"
    )


def _snippet(text: str, size: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= size else text[: size - 1] + "…"


def _list_page(log_dir: Path, f: _Filters) -> str:
    where, args = f.where()
    con = connect(log_dir)
    try:
        models = [
            r[0] for r in con.execute("SELECT DISTINCT model FROM logs ORDER BY 1").fetchall()
        ]
        hosts = [r[0] for r in con.execute("SELECT DISTINCT host FROM logs ORDER BY 1").fetchall()]
        rows = con.execute(
            "SELECT request_id, timestamp, date, host, model, status_code, error, latency_ms, "
            "ttft_ms, input_tokens, output_tokens, messages, prompt, response FROM logs "
            f"{where} ORDER BY ts DESC NULLS LAST, request_id LIMIT ? OFFSET ?",
            [*args, PAGE_SIZE + 1, (f.page - 1) * PAGE_SIZE],
        ).fetchall()
    finally:
        con.close()
    more = len(rows) > PAGE_SIZE

    def options(name: str, values: list[Any], chosen: str) -> str:
        items = [f'<option value="">all {name}s</option>']
        for v in values:
            if v is None:
                continue
            sel = " selected" if str(v) == chosen else ""
            items.append(f'<option value="{_esc(v)}"{sel}>{_esc(v)}</option>')
        return f'<select name="{name}">{"".join(items)}</select>'

    status = "".join(
        f'<option value="{v}"{" selected" if f.status == v else ""}>{label}</option>'
        for v, label in (("", "any status"), ("ok", "ok"), ("error", "errors"))
    )
    form = (
        '<form method="get" action="/" class="filters">'
        f'<input type="date" name="since" value="{_esc(f.since)}" title="since">'
        f'<input type="date" name="until" value="{_esc(f.until)}" title="until">'
        f"{options('model', models, f.model)}{options('host', hosts, f.host)}"
        f'<select name="status">{status}</select>'
        f'<input name="meta" placeholder="metadata key=value" value="{_esc(f.meta)}">'
        f'<input name="q" placeholder="text in prompt or answer" value="{_esc(f.q)}">'
        '<button type="submit">filter</button></form>'
    )
    body_rows = []
    for row in rows[:PAGE_SIZE]:
        rid, stamp, _day, host, model, code, error, latency, ttft, tin, tout = row[:11]
        record = {
            "messages": _json(row[11]),
            "prompt": _json(row[12]),
            "response": _json(row[13]),
        }
        shown = _snippet(prompt_text(record))
        answer = _snippet(str(error)) if error else _snippet(answer_text(record))
        cls = ' class="error"' if error else ""
        link = "/request/" + _esc(rid) + "?" + urlencode({"date": str(_day), "host": host})
        body_rows.append(
            f'<tr{cls}><td><a href="{link}">{_esc(str(stamp)[:19].replace("T", " "))}</a></td>'
            f"<td>{_esc(host)}</td><td>{_esc(model)}</td><td>{_esc(code)}</td>"
            f"<td class=num>{_ms(latency)}</td><td class=num>{_ms(ttft)}</td>"
            f"<td class=num>{_tokens(tin)}/{_tokens(tout)}</td>"
            f'<td class="text">{_esc(shown)}</td><td class="text">{_esc(answer)}</td></tr>'
        )
    table = (
        '<table class="requests"><thead><tr><th>time (UTC)</th><th>host</th><th>model</th>'
        "<th>status</th><th>latency</th><th>TTFT</th><th>tokens</th><th>prompt</th>"
        "<th>answer</th></tr></thead><tbody>"
        + ("".join(body_rows) or '<tr><td colspan="9" class="empty">no requests</td></tr>')
        + "</tbody></table>"
    )
    pager = []
    if f.page > 1:
        pager.append(f'<a rel="prev" href="/?{f.query(page=f.page - 1)}">← newer</a>')
    pager.append(f"<span>page {f.page}</span>")
    if more:
        pager.append(f'<a rel="next" href="/?{f.query(page=f.page + 1)}">older →</a>')
    return _page("Requests", form + table + f'<p class="pager">{" ".join(pager)}</p>')


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _tokens(value: Any) -> str:
    return "-" if value is None else _esc(value)


def _ms(value: Any) -> str:
    return f"{value:,.0f} ms" if isinstance(value, int | float) else "-"


def find_record(log_dir: Path, request_id: str, day: str, host: str) -> dict[str, Any] | None:
    """The record with `request_id`, read from its partition with media restored."""
    for record in iter_logs(
        log_dir, day or None, day or None, host=host or None, restore_media=True
    ):
        if record.request_id == request_id:
            return record.to_dict()
    return None


def _record_page(log_dir: Path, request_id: str, day: str, host: str) -> str | None:
    from ._ui_chat import render_record

    if not day:  # a link from elsewhere: find the record's partition first
        con = connect(log_dir)
        try:
            found = con.execute(
                "SELECT CAST(date AS VARCHAR), host FROM logs WHERE request_id = ? LIMIT 1",
                [request_id],
            ).fetchone()
        finally:
            con.close()
        if found is None:
            return None
        day, host = found
    record = find_record(log_dir, request_id, day, host)
    if record is None:
        return None
    return _page(f"Request {request_id}", render_record(record))


def create_app(log_dir: str | os.PathLike[str]) -> Any:
    """The viewer as an ASGI app (Starlette) over the tree at `log_dir`."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise ConfigurationError(
            "the viewer needs Starlette and uvicorn: pip install 'vllm-middleware[ui]'"
        ) from None
    root = Path(log_dir)
    if not root.is_dir():
        raise ConfigurationError(f"log directory {str(root)!r} does not exist")
    css = resources.files("vllm_middleware").joinpath("_assets/ui.css").read_bytes()

    def respond(body: str, status: int = 200) -> Response:
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def failed(exc: VLLMMiddlewareError) -> Response:
        return respond(_page("Error", f'<p class="failed">{_esc(exc)}</p>'), 400)

    def index(request: Request) -> Response:
        try:
            return respond(_list_page(root, _Filters.of(request.query_params)))
        except VLLMMiddlewareError as exc:
            return failed(exc)

    def record(request: Request) -> Response:
        params = request.query_params
        try:
            page = _record_page(
                root,
                request.path_params["request_id"],
                str(params.get("date", "")),
                str(params.get("host", "")),
            )
        except VLLMMiddlewareError as exc:
            return failed(exc)
        if page is None:
            return respond(_page("Not found", "<p>no such request</p>"), 404)
        return respond(page)

    def report(request: Request) -> Response:
        from ._report import ReportOptions, build_report

        params = request.query_params
        options = ReportOptions(
            since=params.get("since") or None,
            until=params.get("until") or None,
            by=params.get("by") or "model",
        )
        try:
            document = build_report(root, options)
        except VLLMMiddlewareError as exc:
            return failed(exc)
        nav = '<nav class="back"><a href="/">← requests</a></nav>'
        return respond(document.replace("<header>", nav + "<header>", 1))

    def stylesheet(request: Request) -> Response:
        return Response(css, media_type="text/css", headers=_HEADERS)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/request/{request_id:path}", record, methods=["GET"]),
            Route("/report", report, methods=["GET"]),
            Route("/ui.css", stylesheet, methods=["GET"]),
        ]
    )


_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def serve(log_dir: str | os.PathLike[str], listen: str, *, allow_remote: bool = False) -> int:
    host, port = check_listen(listen, allow_remote)
    app = create_app(log_dir)
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "the viewer needs Starlette and uvicorn: pip install 'vllm-middleware[ui]'"
        ) from None
    print(f"vllm-mw ui: http://{host}:{port}/ (read-only; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

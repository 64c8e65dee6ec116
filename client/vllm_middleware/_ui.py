"""`vllm-mw ui`: a local, read-only web viewer of the logs (the `[ui]` extra: Starlette, uvicorn).

Server-rendered pages, no script and nothing fetched from the network: the request table
(filters, keyset pages) comes from DuckDB through the `logs` view's columns, reading only the
files a page needs (`_ui_pages`), with every user value passed as a query parameter; a
request's page reads its one record back from its partition, stopping at the first match, with
media restored from the media store, and renders the conversation. The report's page is
`vllm-mw report` rendered live. Only GET is served.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from ._exceptions import ConfigurationError, VLLMMiddlewareError
from ._media_files import restore_media_refs
from ._read_files import DEFAULT_MAX_LINE_BYTES, ReadStats, iter_documents
from ._reader import iter_log_files
from ._record import LogRecord
from ._record_view import answer_text, prompt_text
from ._ui_pages import Filters, TreeIndex, fetch_page

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


def _list_page(index: TreeIndex, f: Filters) -> str:
    page = fetch_page(index, f, PAGE_SIZE)
    rows, more = page.rows, page.more
    hosts = index.hosts()
    models = index.models()

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
    for row in rows:
        rid, stamp, _day, host, model, code, error, latency, ttft, tin, tout = row[:11]
        record = {
            "messages": row[11],
            "prompt": row[12],
            "response": row[13],
        }
        shown = _snippet(prompt_text(record))
        answer = _snippet(str(error)) if error else _snippet(answer_text(record))
        cls = ' class="error"' if error else ""
        where = urlencode({"date": _day, "host": host})
        link = "/request/" + quote("" if rid is None else str(rid), safe="") + "?" + where
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
    if f.after:  # pages are read from a cursor forward: back is the browser's, or the newest
        pager.append(f'<a rel="first" href="/?{f.query(page=1, after="")}">⇤ newest</a>')
    pager.append(f"<span>page {f.page}</span>")
    if page.searched_to:
        pager.append(f"<span>(read back to {_esc(page.searched_to)})</span>")
    if more and page.next is not None:
        older = f.query(page=f.page + 1, after=page.next.token())
        pager.append(f'<a rel="next" href="/?{older}">older →</a>')
    return _page("Requests", form + table + f'<p class="pager">{" ".join(pager)}</p>')


def _tokens(value: Any) -> str:
    return "-" if value is None else _esc(value)


def _ms(value: Any) -> str:
    return f"{value:,.0f} ms" if isinstance(value, int | float) else "-"


def find_record(
    log_dir: Path, request_id: str, day: str, host: str | None = None
) -> dict[str, Any] | None:
    """The record with `request_id` from the partitions of `day` (and `host`), media restored.

    Reads the files in order and stops at the first match; a line is parsed only when its bytes
    hold the id (as JSON writes it), so the rest of the partition costs a byte search.
    """
    needle = orjson.dumps(request_id)
    exact = needle.isascii() and b"\\" not in needle  # written the same by every JSON encoder
    media = log_dir / "media"
    stats = ReadStats()
    for path in iter_log_files(log_dir, start_date=day, end_date=day, host=host):
        if path.parent == log_dir:
            continue
        for raw in iter_documents(
            path, follow_symlinks=False, max_line_bytes=DEFAULT_MAX_LINE_BYTES, stats=stats
        ):
            if exact and needle not in raw:
                continue
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("request_id") == request_id:
                if b'"media_ref":' in raw:
                    restore_media_refs(data, media, stats)
                return LogRecord(data).to_dict()
    return None


def _days(log_dir: Path) -> list[str]:
    with os.scandir(log_dir) as entries:
        return sorted(
            (e.name[5:] for e in entries if e.name.startswith("date=") and e.is_dir()),
            reverse=True,
        )


def _record_page(log_dir: Path, request_id: str, day: str, host: str) -> str | None:
    from ._ui_chat import render_record

    if day:
        record = find_record(log_dir, request_id, day, host or None)
    else:  # a bare link: the id's own date first (`req_YYYYMMDD_...`), then newest first
        days = _days(log_dir)
        hint = _id_day(request_id)
        order = ([hint] if hint in days else []) + [d for d in days if d != hint]
        record = None
        for candidate in order:
            record = find_record(log_dir, request_id, candidate)
            if record is not None:
                break
    if record is None:
        return None
    return _page(f"Request {request_id}", render_record(record))


def _id_day(request_id: str) -> str:
    digits = request_id[4:12] if request_id.startswith("req_") else ""
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}" if digits.isdigit() else ""


def create_app(log_dir: str | os.PathLike[str], *, warm: bool = False) -> Any:
    """The viewer as an ASGI app (Starlette) over the tree at `log_dir`.

    `warm` summarises the tree's files in a background thread at once, so the first page
    does not wait for the whole tree to be read (it waits for what is left of it).
    """
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
    tree = TreeIndex(root)
    if warm:
        threading.Thread(target=_warm, args=(tree,), name="vllm-mw-ui-warm", daemon=True).start()

    def respond(body: str, status: int = 200) -> Response:
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def failed(exc: VLLMMiddlewareError) -> Response:
        return respond(_page("Error", f'<p class="failed">{_esc(exc)}</p>'), 400)

    def index(request: Request) -> Response:
        try:
            return respond(_list_page(tree, Filters.of(request.query_params)))
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


def _warm(tree: TreeIndex) -> None:
    with contextlib.suppress(VLLMMiddlewareError):  # the first page reports it
        tree.refresh()


_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def serve(log_dir: str | os.PathLike[str], listen: str, *, allow_remote: bool = False) -> int:
    host, port = check_listen(listen, allow_remote)
    app = create_app(log_dir, warm=True)
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "the viewer needs Starlette and uvicorn: pip install 'vllm-middleware[ui]'"
        ) from None
    print(f"vllm-mw ui: http://{host}:{port}/ (read-only; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

"""`Exchange.complete` (a body the transport had already read) records what `respond`, `feed`
and `finish("done")` record for the same answer: every kind of body."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from vllm_middleware._wire_capture import WireCapture

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
REPLY = orjson.dumps({"id": "x", "model": "m", "choices": [], "usage": {"total_tokens": 3}})
SSE = (
    b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


class _Call:
    """What `Exchange` uses of a recorder's `Call`; keeps what it was asked to log."""

    def __init__(self) -> None:
        self.request_id = "req_1"
        self.params: dict[str, Any] = {}
        self.body_bytes = 0
        self.host = "h"
        self.logged: list[tuple[float, dict[str, Any]]] = []

    def log(self, started: float, **fields: Any) -> None:
        self.logged.append((started, fields))


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.failures = 0

    def start(self, *args: Any, **kwargs: Any) -> _Call:
        call = _Call()
        self.calls.append(call)
        return call

    def logging_failed(self, request_id: Any, exc: BaseException | None = None) -> None:
        self.failures += 1


CASES = {
    "json": (200, {"content-type": "application/json"}, REPLY),
    "json, no content type": (200, {}, REPLY),
    "empty": (200, {"content-type": "application/json"}, b""),
    "text": (200, {"content-type": "text/plain"}, b"fine"),
    "invalid json": (200, {"content-type": "application/json"}, b"{nope"),
    "server error": (500, {"content-type": "application/json"}, b'{"error":{"message":"x"}}'),
    "rate limited": (429, {"content-type": "application/json"}, b'{"error":"slow"}'),
    "event stream": (200, {"content-type": "text/event-stream"}, SSE),
    "event stream cut": (200, {"content-type": "text/event-stream"}, SSE[:-14]),
    "gzip": (
        200,
        {"content-type": "application/json", "content-encoding": "gzip"},
        gzip.compress(REPLY),
    ),
    "brotli": (200, {"content-type": "application/json", "content-encoding": "br"}, b"\x1b\x00"),
    "server id": (200, {"content-type": "application/json", "x-request-id": "srv-1"}, REPLY),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_complete_logs_what_respond_feed_finish_log(case: str) -> None:
    status, headers, content = CASES[case]
    logged = []
    for whole in (False, True):
        recorder = _Recorder()
        capture = WireCapture(recorder)  # type: ignore[arg-type]
        request_headers = {"content-type": "application/json", "x-stainless-retry-count": "0"}
        exchange = capture.begin("POST", "/v1/chat/completions", request_headers, CHAT, 1.0)
        assert exchange is not None
        if whole:
            exchange.complete(status, headers, content)
        else:
            exchange.respond(status, headers)
            exchange.feed(content)
            exchange.finish("done")
        assert exchange.ended
        assert recorder.failures == 0
        (call,) = recorder.calls
        # ttft_ms is a clock reading: compared as present or not.
        logged.append(
            [
                (started, {k: "t" if k == "ttft_ms" and v else str(v) for k, v in fields.items()})
                for started, fields in call.logged
            ]
        )
    assert len(logged[0]) == 1
    assert logged[1] == logged[0]

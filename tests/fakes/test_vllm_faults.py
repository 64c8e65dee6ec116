"""The fake vLLM server's faults and controls: keep-alives, mid-stream errors, drops, delays,
hangs, restarts, aborts, recorded requests, concurrency."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest
from vllm_middleware_testing import FakeVLLMServer, fake_reply

from .vllm_support import data_events, events_of, stream, user


def test_keepalive_comments(client: httpx.Client, server: FakeVLLMServer) -> None:
    server.keepalive_interval = 0.05
    server.token_delay = 0.06
    raw = stream(client, "/chat/completions", {"messages": user("a b")})
    events = events_of(raw)
    assert events.count(": keep-alive") >= 3
    assert events[0].startswith("data: ")  # the first token came without a pause
    chunks = data_events(raw)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: a b"


def test_midstream_error(server: FakeVLLMServer, client: httpx.Client) -> None:
    text = "one two three four [[midstream_error]]"
    raw = stream(client, "/chat/completions", {"messages": user(text)})
    events = events_of(raw)
    assert events[-1] == "data: [DONE]"
    if server.flavor == "v0.33":
        assert events[-2] == (
            'data: {"error":{"message":"Internal server error",'
            '"type":"InternalServerError","param":null,"code":500}}'
        )
    else:
        assert events[-2].startswith('data: {"error": {"message": ')
        assert events[-2].endswith('"type": "BadRequestError", "param": null, "code": 400}}')
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert contents and all(contents)
    assert "".join(contents) != fake_reply(text).content
    plain = client.post("/chat/completions", json={"messages": user(text)})
    assert plain.status_code == (500 if server.flavor == "v0.33" else 400)


def test_drop(client: httpx.Client) -> None:
    seen: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream(
            "POST", "/chat/completions", json={"messages": user("a b c d [[drop]]"), "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        seen.extend(response.iter_lines())
    assert any(line.startswith("data: {") for line in seen)
    assert "data: [DONE]" not in seen
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json={"messages": user("[[drop]]")})
    assert client.post("/chat/completions", json={"messages": user("ok")}).status_code == 200


def first_content_after(http: httpx.Client, body: dict[str, Any]) -> float:
    started = time.monotonic()
    with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if '"content":"E' in line:
                return time.monotonic() - started
    raise AssertionError("no content")


def test_slow_first_token(server: FakeVLLMServer, client: httpx.Client) -> None:
    assert first_content_after(client, {"messages": user("[[slow:0.3]]")}) >= 0.3
    server.first_token_delay = 0.2
    assert first_content_after(client, {"messages": user("fast")}) >= 0.2
    started = time.monotonic()
    client.post("/chat/completions", json={"messages": user("x [[slow:0.2]]")})
    assert time.monotonic() - started >= 0.2


def test_hang_times_out_and_stop_is_prompt() -> None:
    fake = FakeVLLMServer().start()
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.3) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/chat/completions", json={"messages": user("[[hang]]")})
    stuck = socket.create_connection(("127.0.0.1", fake.port))
    body = json.dumps({"messages": user("[[hang]]"), "stream": True}).encode()
    stuck.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(0.1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    stuck.settimeout(2)
    assert stuck.recv(100) == b""  # the hung connection was closed by stop()
    stuck.close()
    assert fake.active_connections == 0


def test_restart_on_same_port() -> None:
    fake = FakeVLLMServer().start()
    port = fake.port
    fake.stop()
    with httpx.Client() as http:
        with pytest.raises(httpx.ConnectError):
            http.get(f"http://127.0.0.1:{port}/health")
        fake.start()
        assert fake.port == port
        assert http.get(fake.url + "/health").status_code == 200
    fake.stop()


def test_client_abort_is_counted(server: FakeVLLMServer) -> None:
    server.token_delay = 0.05
    with (
        httpx.Client(base_url=server.base_url) as http,
        http.stream(
            "POST",
            "/chat/completions",
            json={"messages": user(" ".join(["w"] * 50)), "stream": True},
        ) as response,
    ):
        next(response.iter_lines())
    deadline = time.monotonic() + 5
    while server.aborted_streams == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.aborted_streams == 1


def test_requests_are_recorded_with_extras(server: FakeVLLMServer, client: httpx.Client) -> None:
    body = {
        "messages": user("x"),
        "top_k": 20,
        "guided_json": {"type": "object"},
        "chat_template_kwargs": {"enable_thinking": False},
        "vllm_xargs": {"a": 1},
    }
    assert client.post("/chat/completions", json=body, headers={"X-Trace": "t1"}).status_code == 200
    assert server.request_count == 1
    (recorded,) = server.requests
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body == body
    assert recorded.headers["x-trace"] == "t1"
    assert json.loads(recorded.raw_body) == body
    server.clear_requests()
    assert server.request_count == 0


async def test_many_concurrent_requests() -> None:
    with FakeVLLMServer(token_delay=0.001) as fake:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)

        async def one(http: httpx.AsyncClient, i: int) -> None:
            text = f"request number {i}"
            if i % 2:
                async with http.stream(
                    "POST",
                    "/chat/completions",
                    json={
                        "messages": user(text),
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ) as response:
                    assert response.status_code == 200
                    raw = (await response.aread()).decode()
                chunks = data_events(raw)
                content = "".join(
                    c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                )
                assert content == fake_reply(text).content
            else:
                response = await http.post("/chat/completions", json={"messages": user(text)})
                assert response.json()["choices"][0]["message"]["content"] == (
                    fake_reply(text).content
                )

        # Many small pools: httpx's per-request cost grows with the pool size, not the server's.
        clients = [
            httpx.AsyncClient(base_url=fake.base_url, limits=limits, timeout=60) for _ in range(10)
        ]
        try:
            await asyncio.gather(*(one(clients[i % 10], i) for i in range(1000)))
        finally:
            await asyncio.gather(*(http.aclose() for http in clients))
        assert fake.request_count == 1000
        assert fake.aborted_streams == 0
        assert fake.peak_connections > 100

"""`vllm-mw proxy`: a real proxy process between real clients (httpx, the openai SDK) and the
fake vLLM server, records read back from the files (or Redis) it wrote."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from vllm_middleware import load_logs
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from ..conftest import wait_for

CHAT = {"model": "vllm:qwen-2.5-omni-7b", "messages": [{"role": "user", "content": "hello"}]}


class Proxy:
    """`vllm-mw proxy` in a child process, on a free port."""

    def __init__(self, *args: str, log_dir: Path | None = None) -> None:
        argv = [sys.executable, "-m", "vllm_middleware._cli", "proxy", "--listen", "127.0.0.1:0"]
        if log_dir is not None:
            argv += ["--log-dir", str(log_dir)]
        self.proc = subprocess.Popen(
            [*argv, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", line)
        if found is None:
            self.proc.kill()
            rest = self.proc.stderr.read()
            raise AssertionError(f"the proxy did not start: {line}{rest}")
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.stderr = ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Any]:
    proxies: list[Proxy] = []

    def start(*args: str, record: bool = True) -> Proxy:
        log_dir = tmp_path / "logs" if record and "--redis-url" not in args else None
        if not record:
            args = (*args, "--no-record")
        proxy = Proxy(*args, log_dir=log_dir)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return list(load_logs(tmp_path / "logs")) if (tmp_path / "logs").exists() else []


_CLOCK = re.compile(rb'"(created|created_at)":\s*\d+')
_RANDOM_ID = re.compile(rb"\b(resp|msg|embd|rs|fc|call)[_-][0-9a-f]{8,}\b")


def _stable(body: bytes) -> bytes:
    """The body with what differs between two identical requests blanked: the clock (whole
    seconds, may tick) and the ids the fake draws at random where no X-Request-Id applies."""
    return _RANDOM_ID.sub(rb"\1-ID", _CLOCK.sub(rb'"\1":0', body))


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.multi_items() if k not in ("date",)]


def _connections_to(proxy: Proxy, port: int) -> list[Any]:
    import psutil

    return [
        c
        for c in psutil.Process(proxy.proc.pid).net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


# -- the bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", CHAT),
        ("/chat/completions", {**CHAT, "stream": True}),
        ("/completions", {"model": CHAT["model"], "prompt": "Say hi", "max_tokens": 8}),
        (
            "/completions",
            {"model": CHAT["model"], "prompt": "Say hi", "max_tokens": 8, "stream": True},
        ),
        ("/embeddings", {"model": CHAT["model"], "input": ["a", "b"]}),
        ("/responses", {"model": CHAT["model"], "input": "hi"}),
        ("/responses", {"model": CHAT["model"], "input": "hi", "stream": True}),
        ("/chat/completions", {**CHAT, "model": "no-such-model"}),  # upstream 404
        ("/no/such/route", {"x": 1}),  # forwarded as it is
    ],
)
def test_client_receives_exactly_what_the_upstream_sent(
    start_proxy: Any, fake_vllm: FakeVLLMServer, path: str, body: dict[str, Any]
) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    content = orjson.dumps(body)
    got = []
    for base in (fake_vllm.base_url, proxy.base_url):
        headers = {"content-type": "application/json", "x-request-id": "same-id"}
        with httpx.stream("POST", base + path, content=content, headers=headers) as response:
            chunks = list(response.iter_raw())
            got.append((response.status_code, _headers(response), b"".join(chunks)))
    direct, proxied = got
    assert proxied[0] == direct[0]
    assert _stable(proxied[2]) == _stable(direct[2])
    extra = [("x-accel-buffering", "no")] if body.get("stream") and direct[0] == 200 else []
    assert sorted(proxied[1]) == sorted(direct[1] + extra)  # transfer-encoding comes last


def test_stream_chunks_pass_through_as_they_arrive(start_proxy: Any) -> None:
    """Each event reaches the client while the upstream is still generating (no buffering)."""
    with FakeVLLMServer(token_delay=0.3) as fake:
        proxy = start_proxy("--upstream", fake.base_url)
        body = {**CHAT, "stream": True, "max_tokens": 6}
        arrivals: list[float] = []
        started = time.monotonic()
        with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body) as response:
            for chunk in response.iter_raw():
                if b"content" in chunk:
                    arrivals.append(time.monotonic() - started)
        assert len(arrivals) >= 3
        # Buffered, they would arrive together at the end; streamed, ~0.3 s apart.
        assert arrivals[-1] - arrivals[0] >= 0.5


def test_upstream_connections_are_kept_alive_and_reused(start_proxy: Any) -> None:
    with FakeVLLMServer() as fake:
        proxy = start_proxy("--upstream", fake.base_url, record=False)
        with httpx.Client() as client:
            for _ in range(10):
                assert client.post(proxy.base_url + "/chat/completions", json=CHAT).is_success
            body = {**CHAT, "stream": True}
            for _ in range(5):
                with client.stream("POST", proxy.base_url + "/chat/completions", json=body) as r:
                    r.read()
        assert len(_connections_to(proxy, fake.port)) == 1


# -- the openai SDK -----------------------------------------------------------------------


def test_openai_sdk_through_the_proxy(
    start_proxy: Any, fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    openai = pytest.importorskip("openai")
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-secret-key", max_retries=0)
    reply = client.chat.completions.create(
        model=CHAT["model"],
        messages=[{"role": "user", "content": "hello"}],
        extra_headers={"X-VLLM-MW-Metadata": '{"team": "search"}'},
    )
    assert reply.choices[0].message.content
    text = ""
    with client.chat.completions.create(
        model=CHAT["model"], messages=[{"role": "user", "content": "stream me"}], stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text
    embedded = client.embeddings.create(model=CHAT["model"], input="vector")
    assert len(embedded.data[0].embedding) > 0
    listed = client.models.list()
    assert [m.id for m in listed.data] == [CHAT["model"]]
    client.close()
    assert proxy.stop() == 0
    found = records(tmp_path)
    # GET /models is not traffic: three records
    assert sorted(r["endpoint"] for r in found) == [
        "chat/completions",
        "chat/completions",
        "embeddings",
    ]
    by_stream = {r["stream"]: r for r in found if r["endpoint"] == "chat/completions"}
    assert by_stream[False]["metadata"]["team"] == "search"
    assert by_stream[False]["status_code"] == 200
    assert by_stream[True]["stream_end"] == "completed"
    assert by_stream[True]["response"]["choices"][0]["message"]["content"] == text
    raw = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("*.jsonl"))
    assert b"sk-secret-key" not in raw  # Authorization is forwarded, never recorded
    # ... and the metadata header is ours: it never reaches the upstream
    assert all("x-vllm-mw-metadata" not in r.headers for r in fake_vllm.requests)


def test_proxy_records_equal_the_sdk_doors_for_the_same_traffic(
    start_proxy: Any, fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    from vllm_middleware import CaptureTransport

    proxy = start_proxy("--upstream", fake_vllm.base_url, "--host", "app-1")
    calls = [
        ("/chat/completions", CHAT),
        ("/chat/completions", {**CHAT, "stream": True}),
        ("/embeddings", {"model": CHAT["model"], "input": "x"}),
    ]
    headers = {"x-request-id": "same-id", "X-VLLM-MW-Metadata": '{"k": "v"}'}
    sdk_dir = tmp_path / "sdk-logs"
    with httpx.Client(transport=CaptureTransport(log_dir=str(sdk_dir), host="app-1")) as sdk:
        for base, client in ((fake_vllm.base_url, sdk), (proxy.base_url, httpx.Client())):
            for path, body in calls:
                with client.stream("POST", base + path, json=body, headers=headers) as r:
                    r.read()
    proxy.stop()
    varying = ("request_id", "timestamp", "latency_ms", "ttft_ms", "created")

    def comparable(found: list[dict[str, Any]]) -> list[bytes]:
        out = []
        for record in found:
            kept = {k: v for k, v in record.items() if k not in varying}
            out.append(_stable(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)))
        return sorted(out)

    from_sdk = comparable(list(load_logs(sdk_dir)))
    from_proxy = comparable(records(tmp_path))
    assert len(from_proxy) == 3
    assert from_proxy == from_sdk


# -- streams cut by either side -----------------------------------------------------------


def test_client_disconnect_cancels_the_upstream_and_is_recorded(
    start_proxy: Any, tmp_path: Path
) -> None:
    with FakeVLLMServer(token_delay=0.2) as fake:
        proxy = start_proxy("--upstream", fake.base_url)
        body = {**CHAT, "stream": True, "max_tokens": 50}
        with httpx.stream("POST", proxy.base_url + "/chat/completions", json=body) as response:
            first = next(response.iter_raw())
            assert first.startswith(b"data:")
        # The client is gone: the proxy cancels its upstream read, the fake sees the abort.
        wait_for(lambda: fake.aborted_streams == 1, timeout=10)
        proxy.stop()
    (record,) = records(tmp_path)
    assert record["stream"] is True
    assert record["stream_end"] in ("cancelled", "closed")
    assert record["error"]


def test_client_disconnect_before_the_response_cancels_the_upstream(
    start_proxy: Any, tmp_path: Path
) -> None:
    with FakeVLLMServer() as fake:
        proxy = start_proxy("--upstream", fake.base_url)
        body = {**CHAT, "messages": [{"role": "user", "content": "wait [[slow:30]]"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=0.5)
        # The fake sleeps through it; the proxy's connection to it is what must go.
        wait_for(lambda: not _connections_to(proxy, fake.port), timeout=10)
        assert proxy.stop() == 0
    (record,) = records(tmp_path)
    assert record["error"] and "cancelled" in record["error"]
    assert record["status_code"] is None


def test_upstream_dying_mid_stream_cuts_the_client_and_is_recorded(
    start_proxy: Any, fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "go [[drop]]"}]}
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", proxy.base_url + "/chat/completions", json=body) as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    assert received.startswith(b"data:") and b"[DONE]" not in received
    assert proxy.stop() == 0
    assert "cut the response" in proxy.stderr and "ERROR" not in proxy.stderr
    (record,) = records(tmp_path)
    assert record["stream_end"] == "disconnected"
    assert record["error"]


def test_upstream_unreachable_is_a_502_in_openai_form_and_recorded(
    start_proxy: Any, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proxy = start_proxy("--upstream", f"http://127.0.0.1:{port}/v1")
    response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == 502 and error["type"] == "BadGatewayError"
    assert f"127.0.0.1:{port}" in error["message"]
    proxy.stop()
    (record,) = records(tmp_path)
    assert record["endpoint"] == "chat/completions"
    assert record["error"] and record["status_code"] is None


# -- routing ------------------------------------------------------------------------------


def test_upstreams_by_model(start_proxy: Any, tmp_path: Path) -> None:
    with FakeVLLMServer(model="alpha") as alpha, FakeVLLMServer(model="beta") as beta:
        proxy = start_proxy(
            "--upstream", f"alpha={alpha.base_url}", "--upstream", f"beta={beta.base_url}"
        )
        for model in ("alpha", "beta", "beta"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            response = httpx.post(proxy.base_url + "/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
        assert (alpha.request_count, beta.request_count) == (1, 2)
        missing = httpx.post(proxy.base_url + "/chat/completions", json={**CHAT, "model": "gamma"})
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "model"
        assert "gamma" in missing.json()["error"]["message"]
        listed = httpx.get(proxy.base_url + "/models").json()
        assert sorted(m["id"] for m in listed["data"]) == ["alpha", "beta"]


def test_default_upstream_takes_the_other_models(start_proxy: Any) -> None:
    with FakeVLLMServer(model="alpha") as alpha, FakeVLLMServer(model="beta") as beta:
        proxy = start_proxy("--upstream", alpha.base_url, "--upstream", f"beta={beta.base_url}")
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(proxy.base_url + "/chat/completions", json=body).status_code == 200
        health = httpx.get(proxy.url + "/health")
        assert health.status_code == 200
        assert (alpha.request_count, beta.request_count) == (2, 0)


def test_models_and_health_are_not_recorded_but_other_routes_are(
    start_proxy: Any, fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    assert httpx.get(proxy.base_url + "/models").status_code == 200
    assert httpx.get(proxy.url + "/health").status_code == 200
    assert httpx.post(proxy.url + "/tokenize", json={"model": CHAT["model"], "prompt": "x"})
    unknown = httpx.post(proxy.base_url + "/brand/new", json={"model": CHAT["model"]})
    assert unknown.status_code == 404  # the fake's answer, passed on
    proxy.stop()
    assert sorted(r["endpoint"] for r in records(tmp_path)) == ["brand/new", "tokenize"]


def _transcription(client: httpx.Client, url: str, model: str) -> httpx.Response:
    audio = b"RIFF" + bytes(64000)  # some bytes that are not a form field
    return client.post(
        url + "/audio/transcriptions",
        data={"model": model, "language": "en"},
        files={"file": ("a.wav", audio, "audio/wav")},
    )


def test_multipart_uploads_are_routed_by_their_form_model(start_proxy: Any, tmp_path: Path) -> None:
    with (
        FakeVLLMServer(model="whisper-a") as alpha,
        FakeVLLMServer(model="whisper-b") as beta,
        FakeVLLMServer(model="chat") as default,
        httpx.Client() as client,
    ):
        named = start_proxy(
            "--upstream", f"whisper-a={alpha.base_url}", "--upstream", f"whisper-b={beta.base_url}"
        )
        for model in ("whisper-b", "whisper-a", "whisper-b"):
            response = _transcription(client, named.base_url, model)
            assert response.status_code == 200, response.text
            assert response.json()["text"].startswith("Fake transcript of")
        assert (alpha.request_count, beta.request_count) == (1, 2)
        missing = _transcription(client, named.base_url, "whisper-c")
        assert missing.status_code == 404 and "whisper-c" in missing.json()["error"]["message"]
        # With a default upstream, a form naming a served model still goes to that model's.
        with_default = start_proxy(
            "--upstream", default.base_url, "--upstream", f"whisper-b={beta.base_url}"
        )
        assert _transcription(client, with_default.base_url, "whisper-b").status_code == 200
        assert (default.request_count, beta.request_count) == (0, 3)
        named.stop()
        with_default.stop()
    found = [r for r in records(tmp_path) if r["endpoint"] == "audio/transcriptions"]
    # (the proxy's own 404 for whisper-c is not traffic that reached a model: not recorded)
    assert sorted(r["model"] for r in found) == ["whisper-a", "whisper-b", "whisper-b", "whisper-b"]


def test_control_headers_never_reach_the_upstream(
    start_proxy: Any, fake_vllm: FakeVLLMServer
) -> None:
    for record in (True, False):
        proxy = start_proxy("--upstream", fake_vllm.base_url, record=record)
        headers = {"x-vllm-mw-metadata": '{"team": "a"}', "x-vllm-mw-host": "app-1", "x-other": "1"}
        response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 200
        seen = fake_vllm.requests[-1].headers
        assert "x-vllm-mw-metadata" not in seen and "x-vllm-mw-host" not in seen
        assert seen["x-other"] == "1"


def test_upstream_timeout_is_a_504_and_recorded(start_proxy: Any, tmp_path: Path) -> None:
    with FakeVLLMServer() as fake:
        proxy = start_proxy("--upstream", fake.base_url, "--timeout", "0.5")
        body = {**CHAT, "messages": [{"role": "user", "content": "wait [[slow:30]]"}]}
        response = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "GatewayTimeoutError"
        # The timed-out connection is closed, not given to the next request.
        assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT).status_code == 200
        proxy.stop()
    timed_out, ok = sorted(records(tmp_path), key=lambda r: r["status_code"] or 0)
    assert "timed out" in timed_out["error"] and timed_out["status_code"] is None
    assert ok["status_code"] == 200 and not ok["error"]


def test_large_bodies_pass_whole_both_ways(start_proxy: Any, fake_vllm: FakeVLLMServer) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url, record=False)
    text = "word " * 60_000  # 300 kB: the request goes out in two writes
    body = {"model": CHAT["model"], "input": [text, text[::-1]]}
    got = [
        httpx.post(base + "/embeddings", json=body, timeout=30)
        for base in (fake_vllm.base_url, proxy.base_url)
    ]
    assert got[1].status_code == got[0].status_code == 200
    assert fake_vllm.requests[-1].body == body
    assert _stable(got[1].content) == _stable(got[0].content)


def test_an_upstream_restart_is_not_seen_by_clients(start_proxy: Any) -> None:
    """The kept-alive connection to an upstream that went away is not used again."""
    fake = FakeVLLMServer().start()
    port = fake.port
    proxy = start_proxy("--upstream", fake.base_url, record=False)
    assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT).status_code == 200
    fake.stop()
    with FakeVLLMServer(port=port) as again:
        assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert again.request_count == 1


def test_a_kept_alive_connection_closed_as_a_request_goes_out_is_retried_once(
    start_proxy: Any,
) -> None:
    """An upstream's keep-alive timeout can close an idle connection just as the proxy sends
    on it: nothing of a response came, so the request goes again on a new connection. (A raw
    socket server: the fake cannot close a connection on receiving a request.)"""
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    seen: list[int] = []  # per connection accepted: requests received
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for number in range(2):
            conn, _ = server.accept()
            with conn:
                seen.append(0)
                while conn.recv(65536):
                    seen[-1] += 1
                    if number == 0 and seen[-1] == 2:
                        break  # the second request on the first connection: closed unanswered
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy = start_proxy("--upstream", f"http://127.0.0.1:{port}/v1", record=False)
    with httpx.Client() as client:
        for _ in range(3):
            response = client.post(proxy.base_url + "/chat/completions", json=CHAT)
            assert (response.status_code, response.content) == (200, b"{}")
    assert seen[:2] == [2, 2]  # the second request went twice, the third reused the new one
    server.close()


# -- sinks, shutdown, metrics ---------------------------------------------------------------


def test_redis_mode(
    start_proxy: Any, fake_vllm: FakeVLLMServer, redis_server: RedisServerProcess
) -> None:
    import redis

    proxy = start_proxy("--upstream", fake_vllm.base_url, "--redis-url", redis_server.url)
    headers = {"X-VLLM-MW-Host": "app-7"}
    response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200
    client = redis.Redis.from_url(redis_server.url)
    try:
        wait_for(lambda: client.xlen("vllm:logs") >= 1, timeout=15)
        entries = client.xrange("vllm:logs")
    finally:
        client.close()
    blob = b"".join(value for _, fields in entries for value in fields.values())
    assert b"chat/completions" in blob and b"app-7" in blob


def test_shutdown_drains_requests_in_flight_and_flushes_records(
    start_proxy: Any, fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    body = {**CHAT, "messages": [{"role": "user", "content": "take time [[slow:1.5]]"}]}
    result: dict[str, Any] = {}

    def call() -> None:
        result["response"] = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=30)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(lambda: fake_vllm.active_connections >= 1, timeout=10)
    time.sleep(0.2)  # the request is in the proxy's hands
    proxy.proc.send_signal(signal.SIGTERM)
    caller.join(timeout=30)
    assert result["response"].status_code == 200
    proxy.stop()
    (record,) = records(tmp_path)
    assert record["status_code"] == 200
    assert record["response"]["choices"]


def test_metrics(start_proxy: Any, fake_vllm: FakeVLLMServer) -> None:
    proxy = start_proxy("--upstream", fake_vllm.base_url)
    assert httpx.post(proxy.base_url + "/chat/completions", json=CHAT).status_code == 200
    text = ""
    for _ in range(50):
        text = httpx.get(proxy.url + "/metrics").text
        if "vllm_mw_requests_total{" in text:
            break
        time.sleep(0.1)
    assert re.search(r'vllm_mw_requests_total\{model="[^"]+",status="200"\} 1\.0', text)
    assert "vllm_mw_proxy_requests_total" in text
    assert "vllm_mw_proxy_requests_in_flight 0.0" in text

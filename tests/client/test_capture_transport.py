"""The capture transports on their own: around an SDK client's transport, around any httpx
transport of one's own, with bad data from the server, and the package without the SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_middleware import instrument
from vllm_middleware_testing import FakeVLLMServer

from .test_sdk_capture import SECRET, USER, http_library, records

openai = pytest.importorskip("openai")


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer() as fake:
        yield fake


def test_instrument_twice_and_transport_kept(server: FakeVLLMServer, logs: Path) -> None:
    sdk = openai.OpenAI(base_url=server.base_url, api_key=SECRET)
    inner = sdk._client._transport
    client = instrument(instrument(sdk, log_dir=logs), log_dir=logs)
    assert client is sdk
    wrapper = sdk._client._transport
    assert wrapper.transport is inner  # the SDK's own transport (pool, proxies, TLS) sends
    lib = http_library(sdk)
    assert isinstance(wrapper, lib.BaseTransport)
    client.close()


def test_package_imports_without_openai_or_httpx2() -> None:
    code = (
        "import sys\n"
        "sys.modules['openai'] = None\n"
        "sys.modules['httpx2'] = None\n"
        "import vllm_middleware\n"
        "assert vllm_middleware.instrument and vllm_middleware.CaptureTransport\n"
        "assert 'httpx2' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_capture_transport_on_an_httpx_client_of_ones_own(logs: Path) -> None:
    """The public transport around any httpx transport: a gzip body is recorded decoded, the
    server's request id and the Idempotency-Key are kept, the bytes reach the caller as sent."""
    import gzip

    import httpx
    from vllm_middleware import CaptureTransport

    reply = json.dumps({"id": "x", "choices": [], "usage": {"total_tokens": 3}}).encode()
    packed = gzip.compress(reply)

    class Arriving(httpx.SyncByteStream):  # a body still to be read, in two pieces
        def __iter__(self) -> Iterator[bytes]:
            yield packed[:10]
            yield packed[10:]

    def answer(request: httpx.Request) -> httpx.Response:
        assert "x-vllm-mw-metadata" not in request.headers
        headers = {
            "content-type": "application/json",
            "content-encoding": "gzip",
            "x-request-id": "srv-9",
        }
        if request.url.path.endswith("/embeddings"):  # a body given whole, read by httpx
            return httpx.Response(200, headers=headers, content=packed)
        return httpx.Response(200, headers=headers, stream=Arriving())

    transport = CaptureTransport(httpx.MockTransport(answer), log_dir=logs)
    with httpx.Client(transport=transport, base_url="http://vllm/v1") as client:
        response = client.post(
            "/chat/completions",
            json={"model": "m", "messages": USER, "n": 2},
            headers={"Idempotency-Key": "idem-1", "X-VLLM-MW-Metadata": '["not", "an object"]'},
        )
        whole = client.post("/embeddings", json={"model": "m", "input": "x"})
    assert response.json() == whole.json() == json.loads(reply)
    record, embedded = records(logs)
    assert embedded["response"] == json.loads(reply) and embedded["input"] == "x"
    assert record["response"] == json.loads(reply) and record["usage"] == {"total_tokens": 3}
    assert record["server_request_id"] == "srv-9" and record["parameters"] == {"n": 2}
    assert record["idempotency_key"] == "idem-1" and "attempt" not in record
    assert "not a JSON object" in record["capture_notes"][0]


def test_a_body_the_capture_chokes_on_still_reaches_the_caller(logs: Path) -> None:
    """Bad data from the server (a choice index that is a list) makes folding the stream fail:
    the failure is counted, the caller still gets every byte and no error."""
    import httpx
    from vllm_middleware import CaptureTransport

    events = [
        b'data: {"id":"c","choices":[{"index":[1],"delta":{"content":"hi"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]

    class Events(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield from events

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Events())

    transport = CaptureTransport(httpx.MockTransport(answer), log_dir=logs)
    body = {"model": "m", "messages": USER, "stream": True}
    with httpx.Client(transport=transport, base_url="http://vllm/v1") as client:
        with client.stream("POST", "/chat/completions", json=body) as response:
            received = b"".join(response.iter_raw())
        assert transport.recorder.local_statistics()["logging_errors"] == 1
    assert received == b"".join(events)

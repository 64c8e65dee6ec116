"""The logging proxy's pure pieces: upstream URLs and routing, hop-by-hop headers, what is
traffic, and the command line's refusals."""

from __future__ import annotations

import pytest
from vllm_middleware import ConfigurationError
from vllm_middleware._proxy_routes import (
    Upstream,
    forwarded_request_headers,
    forwarded_response_headers,
    is_traffic,
    model_of,
    parse_upstreams,
)


def test_upstream_urls() -> None:
    upstream = Upstream.parse("http://vllm:8000/v1/")
    assert upstream.target("/v1/chat/completions", b"") == "http://vllm:8000/v1/chat/completions"
    assert upstream.target("/health", b"") == "http://vllm:8000/health"
    assert upstream.target("/v1/models", b"a=1") == "http://vllm:8000/v1/models?a=1"
    other = Upstream.parse("https://api.example.com/openai/v1")
    assert other.target("/v1/embeddings", b"") == "https://api.example.com/openai/v1/embeddings"
    assert Upstream.parse("http://vllm:8000").target("/v1/x", b"") == "http://vllm:8000/x"


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["vllm:8000"],
        ["ftp://x/v1"],
        ["http://a/v1", "http://b/v1"],
        ["m=http://a/v1", "m=http://b/v1"],
        ["=http://a/v1"],
        ["http://user:pw@a/v1"],
        ["http://a:99999/v1"],
    ],
)
def test_bad_upstreams_are_refused(values: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        parse_upstreams(values)


def test_upstream_map_picks_by_model() -> None:
    routes = parse_upstreams(["http://d/v1", "org/m:7b=http://m/v1", "x=http://d/v1"])
    assert routes.pick(b'{"model": "org/m:7b"}')[0] == Upstream.parse("http://m/v1")
    assert routes.pick(b'{"model": "other"}') == (Upstream.parse("http://d/v1"), "other")
    assert routes.pick(b"not json")[0] == Upstream.parse("http://d/v1")
    assert routes.pick(b'["model"]')[0] == Upstream.parse("http://d/v1")
    assert [u.url for u in routes.distinct()] == ["http://d/v1", "http://m/v1"]
    only = parse_upstreams(["m=http://m/v1"])
    assert only.pick(b'{"model": "z"}') == (None, "z")


def _form(fields: dict[str, str], file: bytes) -> tuple[bytes, bytes]:
    import httpx

    request = httpx.Request(
        "POST", "http://p/", data=fields, files={"file": ("a.wav", file, "audio/wav")}
    )
    return request.read(), request.headers["content-type"].encode()


def test_model_of_a_multipart_form() -> None:
    lookalike = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nevil\r\n'
    assert model_of(*_form({"model": "whisper-1", "language": "en"}, lookalike)) == "whisper-1"
    assert model_of(*_form({"language": "en"}, lookalike)) is None  # the file's bytes: not a field
    body, content_type = _form({"model": "m"}, b"x")
    assert model_of(body, b"Multipart/Form-Data; Boundary" + content_type[29:]) == "m"
    assert model_of(body, b"multipart/form-data") is None  # no boundary
    assert model_of(body[:40], content_type) is None  # cut short
    assert model_of(b'{"model": "j"}', b"application/json") == "j"
    routes = parse_upstreams(["http://d/v1", "m=http://m/v1"])
    assert routes.pick(body, content_type)[0] == Upstream.parse("http://m/v1")


def test_hop_by_hop_headers_stay_on_their_hop() -> None:
    sent = forwarded_request_headers(
        [
            (b"host", b"proxy"),
            (b"connection", b"keep-alive, x-private"),
            (b"x-private", b"1"),
            (b"authorization", b"Bearer k"),
            (b"accept-encoding", b"gzip"),
            (b"content-length", b"5"),
            (b"x-request-id", b"r"),
        ]
    )
    assert sent == [(b"authorization", b"Bearer k"), (b"x-request-id", b"r")]
    back = forwarded_response_headers(
        [
            (b"Content-Type", b"text/event-stream; charset=utf-8"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Request-Id", b"r"),
        ]
    )
    assert back == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"x-request-id", b"r"),
        (b"x-accel-buffering", b"no"),
    ]


def test_what_is_traffic() -> None:
    assert not is_traffic("GET", "/v1/models")
    assert not is_traffic("GET", "/v1/models/m")
    assert not is_traffic("GET", "/health")
    assert is_traffic("POST", "/v1/models")
    assert is_traffic("GET", "/v1/responses/resp_1")
    assert is_traffic("POST", "/v1/chat/completions")


def test_cli_refuses_bad_arguments() -> None:
    from vllm_middleware._cli import main

    assert main(["proxy", "--listen", "nowhere"]) == 2
    assert main(["proxy", "--upstream", "http://a/v1", "--listen", "localhost"]) == 2
    assert main(["proxy", "--upstream", "http://a/v1", "--timeout", "0"]) == 2

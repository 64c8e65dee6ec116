"""The fake vLLM server's errors: unknown models, limits, validation, triggers, API keys."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from vllm_middleware_testing import QUEUE_FULL_MESSAGE, FakeVLLMServer

from .vllm_support import MODEL, WEATHER_TOOL, user


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]  # type: ignore[no-any-return]


def test_unknown_model(server: FakeVLLMServer, client: httpx.Client) -> None:
    for path, extra in (
        ("/chat/completions", {"messages": user("x")}),
        ("/completions", {"prompt": "x"}),
    ):
        error = error_of(client.post(path, json={"model": "foo", **extra}), 404)
        assert error["type"] == "NotFoundError"
        if server.flavor == "v0.33":
            assert error["message"] == f"The model `foo` does not exist. Valid aliases: {MODEL}."
            assert error["param"] == "model"
        else:
            assert error["message"] == "The model `foo` does not exist."
            assert error["param"] is None


def test_max_tokens_limits(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.max_model_len = 100
    too_big = client.post("/chat/completions", json={"messages": user("x"), "max_tokens": 101})
    error = error_of(too_big, 400)
    assert error["type"] == "BadRequestError"
    overflow = client.post("/chat/completions", json={"messages": user("a b c"), "max_tokens": 99})
    if server.flavor == "v0.33":
        assert error["param"] == "max_tokens"
        prefix = "max_tokens=101 cannot be greater than max_model_len=100."
        assert error["message"].startswith(prefix)
        assert overflow.status_code == 200  # v0.33 clamps to the room left
        assert overflow.json()["usage"]["completion_tokens"] == 4
    else:
        assert "is too large: 101" in error["message"]
        assert "is too large: 99" in error_of(overflow, 400)["message"]
    long_prompt = client.post("/chat/completions", json={"messages": user("w " * 101)})
    assert "maximum context length is 100" in error_of(long_prompt, 400)["message"]


def test_validation_errors(server: FakeVLLMServer, client: httpx.Client) -> None:
    not_json = client.post(
        "/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert error_of(not_json, 400)["type"] == "Bad Request"
    broken = client.post(
        "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert error_of(broken, 400)["type"] == "Bad Request"
    options = client.post(
        "/chat/completions",
        json={"messages": user("x"), "stream": False, "stream_options": {"include_usage": True}},
    )
    assert (
        "Stream options can only be defined when `stream=True`."
        in error_of(options, 400)["message"]
    )
    empty_tools = client.post("/chat/completions", json={"messages": user("x"), "tools": []})
    error_of(empty_tools, 400)
    unknown_named = client.post(
        "/chat/completions",
        json={
            "messages": user("x"),
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
    )
    error_of(unknown_named, 400)
    error_of(client.post("/chat/completions", json={"model": MODEL}), 400)
    error_of(
        client.post("/completions", json={"prompt": "x", "stream": True, "use_beam_search": True}),
        400,
    )
    auto_ok = client.post(
        "/chat/completions",
        json={"messages": user("x"), "tools": [WEATHER_TOOL], "tool_choice": "auto"},
    )
    assert auto_ok.status_code == 200


def test_flat_error_shape() -> None:
    with FakeVLLMServer(flavor="v0.10.2", error_shape="flat") as fake, httpx.Client() as http:
        response = http.post(
            fake.base_url + "/chat/completions", json={"model": "foo", "messages": user("x")}
        )
        assert response.status_code == 404
        assert response.json() == {
            "object": "error",
            "message": "The model `foo` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        triggered = http.post(fake.base_url + "/completions", json={"prompt": "[[status:503]]"})
        assert triggered.json()["object"] == "error"
        assert triggered.json()["code"] == 503


def test_api_key(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.api_key = "sk-test"
    body = {"messages": user("x")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        response = client.post("/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}
    assert client.get("/models").status_code == 401
    assert client.get(server.url + "/health").status_code == 200
    good = client.post("/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"})
    assert good.status_code == 200


@pytest.mark.parametrize(
    ("status", "err_type"),
    [
        (400, "BadRequestError"),
        (404, "NotFoundError"),
        (429, "TooManyRequestsError"),
        (500, "InternalServerError"),
        (501, "NotImplementedError"),
        (502, "BadGatewayError"),
        (503, "Service Unavailable"),
    ],
)
def test_status_triggers(client: httpx.Client, status: int, err_type: str) -> None:
    for is_stream in (False, True):
        response = client.post(
            "/chat/completions",
            json={"messages": user(f"please [[status:{status}]]"), "stream": is_stream},
        )
        error = error_of(response, status)
        assert error["type"] == err_type
        if status == 503:
            assert error["message"] == QUEUE_FULL_MESSAGE


def test_status_401_trigger(client: httpx.Client) -> None:
    response = client.post("/completions", json={"prompt": "[[status:401]]"})
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}

"""Redaction (`redact=`, `redact_secrets`), content-free capture, sampling (issue 11 item 8)."""

from __future__ import annotations

import copy
import random
import string
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_middleware import (
    APIStatusError,
    ConfigurationError,
    VLLMMiddleware,
    load_logs,
    redact_secrets,
)
from vllm_middleware._redact import REDACTED_KINDS, redact_text
from vllm_middleware_testing import FakeVLLMServer

MODEL = "vllm:qwen-2.5-omni-7b"


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


# -- secrets of every kind, generated -----------------------------------------------------------
ALNUM = string.ascii_letters + string.digits
UPPER_NUM = string.ascii_uppercase + string.digits
B64URL = ALNUM + "_-"


def chars(alphabet: str, low: int, high: int | None = None) -> st.SearchStrategy[str]:
    return st.text(alphabet, min_size=low, max_size=high if high is not None else low)


def luhn_complete(body: str) -> str:
    for check in "0123456789":
        digits = body + check
        total = 0
        for index, char in enumerate(reversed(digits)):
            value = int(char) * (2 if index % 2 else 1)
            total += value - 9 if value > 9 else value
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    length = draw(st.sampled_from([13, 15, 16, 19]))
    digits = luhn_complete(draw(st.sampled_from("3456")) + draw(chars(string.digits, length - 2)))
    separator = draw(st.sampled_from(["", " ", "-"]))
    if not separator:
        return digits
    groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    return separator.join(groups)


# kind -> (strategy for the secret, the part of it that must disappear)
SECRETS: dict[str, st.SearchStrategy[tuple[str, str]]] = {
    "aws_access_key": st.builds(
        lambda p, s: (p + s, p + s), st.sampled_from(["AKIA", "ASIA"]), chars(UPPER_NUM, 16)
    ),
    "gcp_api_key": chars(B64URL, 35).map(lambda s: ("AIza" + s, "AIza" + s)),
    "gcp_oauth_token": chars(B64URL, 20, 60).map(lambda s: ("ya29." + s, "ya29." + s)),
    "github_token": st.builds(
        lambda p, s: (p + s, p + s), st.sampled_from(["ghp_", "gho_", "ghs_"]), chars(ALNUM, 36)
    ),
    "slack_token": chars(ALNUM, 10, 40).map(lambda s: ("xoxb-12345-" + s, "xoxb-12345-" + s)),
    "openai_key": chars(ALNUM, 20, 60).map(lambda s: ("sk-proj-" + s, "sk-proj-" + s)),
    "stripe_key": chars(ALNUM, 16, 30).map(lambda s: ("sk_live_" + s, "sk_live_" + s)),
    "jwt": st.builds(
        lambda a, b, c: (f"eyJ{a}.eyJ{b}.{c}",) * 2,
        chars(B64URL, 6, 30),
        chars(B64URL, 6, 30),
        chars(B64URL, 6, 40),
    ),
    "bearer_token": chars(ALNUM + "._-", 8, 60).map(lambda s: ("Bearer " + s, s)),
    "azure_storage_key": chars(ALNUM + "+/", 40, 88).map(
        lambda s: (f"DefaultEndpointsProtocol=https;AccountKey={s}==;", s)
    ),
    "url_password": chars(ALNUM, 8, 30).map(lambda s: (f"postgres://app:{s}@db:5432/x", s)),
    "secret_assignment": st.builds(
        lambda k, v: (f'{k}="{v}"', v),
        st.sampled_from(["password", "API_KEY", "client_secret", "aws_secret_access_key"]),
        chars(ALNUM + "!#$%", 6, 40),
    ),
    "private_key": chars(ALNUM + "+/\n", 20, 200).map(
        lambda s: (
            f"-----BEGIN RSA PRIVATE KEY-----\n{s}\n-----END RSA PRIVATE KEY-----",
            f"{s}",
        )
    ),
    "card_number": card_numbers().map(lambda s: (s, s)),
}
FILLER = st.text(string.ascii_lowercase + " .,", max_size=200)


def test_every_kind_has_a_generator() -> None:
    assert set(SECRETS) <= set(REDACTED_KINDS)
    assert set(REDACTED_KINDS) - set(SECRETS) <= {"slack_webhook", "azure_sas_token"}


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(SECRETS)),
    data=st.data(),
    before=FILLER,
    after=FILLER,
)
def test_a_secret_of_any_kind_is_replaced_by_its_marker(
    kind: str, data: st.DataObject, before: str, after: str
) -> None:
    secret, hidden = data.draw(SECRETS[kind])
    text = f"{before} {secret} {after}"
    out = redact_text(text)
    assert out.startswith(f"{before} ") and out.endswith(f" {after}")
    middle = out[len(before) + 1 : len(out) - len(after) - 1]
    assert hidden not in middle
    assert f"[REDACTED:{kind}]" in middle


@settings(max_examples=300, deadline=None)
@given(st.text(string.ascii_letters + string.digits[:3] + " .,:;!?'\"()\n", max_size=400))
def test_ordinary_text_is_left_as_it_is(text: str) -> None:
    assert redact_text(text) is text


@settings(max_examples=200, deadline=None)
@given(body=chars(string.digits, 15), wrong=st.integers(1, 9))
def test_card_numbers_failing_luhn_are_not_redacted(body: str, wrong: int) -> None:
    good = luhn_complete("4" + body)
    bad = good[:-1] + str((int(good[-1]) + wrong) % 10)
    assert redact_text(f"pay with {good} now") == "pay with [REDACTED:card_number] now"
    assert redact_text(f"order {bad} shipped") == f"order {bad} shipped"


def test_no_input_makes_the_scan_slow() -> None:
    """Inputs built to make regexes backtrack still cost linear time (bounded quantifiers)."""
    hostile = [
        "-----BEGIN RSA PRIVATE KEY-----" * 2000,
        "4" * 20_000,
        "1 2 3 4 5 6 7 8 9 0 " * 2000,
        "password=" * 5000,
        "a://b:" * 5000,
        "eyJ" * 10_000 + ".eyJ",
        "sk-a-" * 5000,
        "Bearer " * 5000,
    ]
    for text in hostile:
        redact_text(text)  # each returns; a super-linear scan would not finish in CI time


def test_media_blobs_are_not_scanned() -> None:
    blob = "data:image/png;base64," + "AKIA" + "A" * 16 + "=" * 2
    record = {"messages": [{"role": "user", "content": [{"image_url": {"url": blob}}]}]}
    assert redact_secrets(copy.deepcopy(record)) == record


def chat_record() -> dict[str, Any]:
    return {
        "request_id": "r1",
        "messages": [
            {"role": "system", "content": "you are helpful"},
            {"role": "user", "content": "my key is AKIAIOSFODNN7EXAMPLE, card 4111 1111 1111 1111"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {
                            "name": "login",
                            "arguments": '{"password": "hunter2hunter2", "user": "bob"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "token ghp_" + "a" * 36},
            {"role": "user", "content": [{"type": "text", "text": "Bearer abcdefghijklmnop"}]},
        ],
        "response": {
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": "use sk-proj-abcdefghijklmnopqrstuvwxyz",
                        "tool_calls": [
                            {
                                "function": {
                                    "name": "pay",
                                    "arguments": '{"card": "4111-1111-1111-1111"}',
                                }
                            }
                        ],
                    }
                }
            ]
        },
        "parameters": {"temperature": 0.5},
        "model": "m",
    }


def test_redact_secrets_cleans_messages_tool_arguments_and_the_response() -> None:
    record = chat_record()
    original = copy.deepcopy(record)
    messages, response = record["messages"], record["response"]
    cleaned = redact_secrets(record)
    raw = orjson.dumps(cleaned).decode()
    for secret in (
        "AKIAIOSFODNN7EXAMPLE",
        "4111 1111 1111 1111",
        "hunter2hunter2",
        "ghp_aaaa",
        "abcdefghijklmnop",
        "sk-proj-",
        "4111-1111-1111-1111",
    ):
        assert secret not in raw, secret
    for kind in ("aws_access_key", "card_number", "secret_assignment", "github_token"):
        assert f"[REDACTED:{kind}]" in raw
    assert cleaned["messages"][0] is original["messages"][0] or cleaned["messages"][0] == {
        "role": "system",
        "content": "you are helpful",
    }
    # The caller's objects (its messages, the reply it was given) are not changed.
    assert messages == original["messages"] and response == original["response"]


def test_redact_secrets_on_a_prompt() -> None:
    record = {"prompt": ["ok", "key AKIAIOSFODNN7EXAMPLE"], "response": None}
    assert redact_secrets(record)["prompt"] == ["ok", "key [REDACTED:aws_access_key]"]


# -- through the client -------------------------------------------------------------------------
def client_for(server: FakeVLLMServer, tmp_path: Path, **kwargs: Any) -> VLLMMiddleware:
    return VLLMMiddleware(base_url=server.base_url, log_dir=tmp_path, redis_url="", **kwargs)


def file_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*.jsonl")))


async def test_redact_secrets_end_to_end(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    messages = chat_record()["messages"]
    sent = copy.deepcopy(messages)
    fake_vllm.clear_requests()  # the server is shared by the session's tests
    async with client_for(fake_vllm, tmp_path, redact=redact_secrets) as client:
        await client.chat_completion(messages, model=MODEL)
        stream = await client.chat_completion(messages, model=MODEL, stream=True)
        async with stream:
            async for _ in stream:
                pass
    assert messages == sent
    assert fake_vllm.requests[0].body["messages"] == sent  # the server got the real text
    raw = file_bytes(tmp_path)
    assert b"AKIAIOSFODNN7EXAMPLE" not in raw and b"hunter2hunter2" not in raw
    records = load_logs(tmp_path)
    assert len(records) == 2 and all(
        r.stream is s for r, s in zip(records, (False, True), strict=True)
    )
    assert raw.count(b"[REDACTED:aws_access_key]") == 2


async def test_a_redact_hook_can_drop_records_and_a_failing_hook_drops_too(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    def hook(record: dict[str, Any]) -> dict[str, Any] | None:
        text = record["messages"][-1]["content"]
        if "drop me" in text:
            return None
        if "boom" in text:
            raise RuntimeError("hook bug")
        if "odd" in text:
            return "not a record"  # type: ignore[return-value]
        record["metadata"] = {"hooked": True}
        return record

    async with client_for(fake_vllm, tmp_path, redact=hook) as client:
        for text in ("keep", "drop me", "boom", "odd", "keep too"):
            await client.chat_completion([{"role": "user", "content": text}], model=MODEL)
        stats = client.get_statistics()["client"]
    records = load_logs(tmp_path)
    assert [r.messages[-1]["content"] for r in records] == ["keep", "keep too"]
    assert all(r.metadata == {"hooked": True} for r in records)
    assert stats["redacted_out"] == 1 and stats["redact_errors"] == 2
    assert b"boom" not in file_bytes(tmp_path) and b"odd" not in file_bytes(tmp_path)


async def test_metadata_mode_keeps_no_text(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    secret_words = "zebra-quartz-umbrella"
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": secret_words, "parameters": {}},
        }
    ]
    messages = [
        {"role": "system", "content": f"system {secret_words}"},
        {"role": "user", "content": [{"type": "text", "text": f"user {secret_words}"}]},
    ]
    async with client_for(fake_vllm, tmp_path, content="metadata") as client:
        reply = await client.chat_completion(
            messages, model=MODEL, temperature=0.3, max_tokens=50, tools=tools, stop=[secret_words]
        )
        stream = await client.completions(f"prompt {secret_words}", model=MODEL, stream=True)
        async with stream:
            async for _ in stream:
                pass
        with pytest.raises(APIStatusError):
            await client.chat_completion(
                [{"role": "user", "content": f"{secret_words} [[status:500]]"}], model=MODEL
            )
    answer = reply["choices"][0]["message"]["content"]
    raw = file_bytes(tmp_path)
    assert secret_words.encode() not in raw
    assert answer and answer[:40].encode() not in raw
    chat, completion, failed = load_logs(tmp_path)
    assert chat["content"] == "metadata" and chat.model == MODEL
    assert chat.parameters["temperature"] == 0.3 and chat.parameters["max_tokens"] == 50
    assert chat.parameters["tools"] == {"names": ["get_weather"]}
    assert chat.messages == [
        {"role": "system", "chars": len(f"system {secret_words}")},
        {"role": "user", "chars": len(f"user {secret_words}"), "parts": ["text"]},
    ]
    assert chat.usage == reply["usage"] and chat.latency_ms > 0
    choice = chat.response["choices"][0]
    assert choice["message"]["chars"] == len(answer) and choice["finish_reason"]
    assert completion.stream is True and completion.prompt == {"chars": len(secret_words) + 7}
    assert completion.response["choices"][0]["chars"] > 0
    assert failed.error and failed.status_code == 500


async def test_sampling_is_deterministic_by_request_id_and_keeps_errors(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    ids = [f"trace-{i}" for i in range(200)]
    expected = {i for i in ids if zlib.crc32(i.encode()) < 0.3 * 2**32}
    runs = []
    for run in ("a", "b"):
        async with client_for(fake_vllm, tmp_path / run, sample_rate=0.3) as client:
            for request_id in ids:
                await client.chat_completion(
                    [{"role": "user", "content": "hi"}],
                    model=MODEL,
                    headers={"X-Request-Id": request_id},
                )
            for _ in range(20):  # errors: always recorded
                with pytest.raises(APIStatusError):
                    await client.chat_completion(
                        [{"role": "user", "content": "[[status:503]]"}], model=MODEL
                    )
            stats = client.get_statistics()
        records = load_logs(tmp_path / run)
        kept = {r["client_request_id"] for r in records if r.error is None}
        runs.append(kept)
        assert kept == expected
        assert sum(1 for r in records if r.error is not None) == 20
        assert stats["client"]["sampled_out"] == 200 - len(expected)
        assert stats["total_requests"] == 220  # sampled-out calls still count
    assert runs[0] == runs[1] and 30 < len(expected) < 90


async def test_no_option_no_policy(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    client = client_for(fake_vllm, tmp_path)
    assert client.recorder.capture is None  # the request path does nothing more than before
    await client.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 1.5},
        {"sample_rate": float("nan")},
        {"sample_rate": "half"},
        {"content": "none"},
        {"redact": "yes"},
    ],
)
def test_bad_capture_options_are_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(log_dir=tmp_path, redis_url="", **kwargs)


def test_random_records_survive_redaction_unchanged_in_shape() -> None:
    rng = random.Random(7)
    for _ in range(200):
        words = [
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(30)
        ]
        record = {"messages": [{"role": "user", "content": " ".join(words)}], "response": None}
        original = copy.deepcopy(record)
        assert redact_secrets(record) == original

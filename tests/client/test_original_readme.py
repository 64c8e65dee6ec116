"""Every usage example of the original tool's README, run against the fake vLLM server.

The examples are kept as close to the original text as possible; only the server address and
the log directory point at the test's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware_testing import FakeVLLMServer


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


async def test_basic_usage(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url,
        log_dir=str(tmp_path),
        enable_file_logging=True,
    ) as middleware:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]

        response = await middleware.chat_completion(
            messages=messages, model="vllm:qwen-2.5-omni-7b", temperature=0.7, max_tokens=100
        )

        print(response)
    assert response["choices"][0]["message"]["content"]
    (record,) = load_logs(str(tmp_path))
    assert record.messages == messages
    assert record.response == response
    assert record.parameters == {"temperature": 0.7, "max_tokens": 100}
    assert record.model == "vllm:qwen-2.5-omni-7b"


async def test_configuration_text_completion_tools_and_statistics(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    middleware = VLLMMiddleware(
        base_url=fake_vllm.base_url,  # vLLM server URL
        log_dir=str(tmp_path),  # Directory for log files
        enable_file_logging=True,  # Enable/disable file logging
        log_format="jsonl",  # Log format (jsonl or json)
        max_log_size_mb=100,  # Max log file size before rotation
    )
    response = await middleware.chat_completion(
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain quantum computing."},
        ],
        model="vllm:qwen-2.5-omni-7b",
        temperature=0.7,
        max_tokens=200,
    )
    assert response["object"] == "chat.completion"

    response = await middleware.completions(
        prompt="Once upon a time",
        model="vllm:qwen-2.5-omni-7b",
        temperature=0.9,
        max_tokens=100,
    )
    assert response["object"] == "text_completion"

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather",
                "parameters": {
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                },
            },
        }
    ]

    response = await middleware.chat_completion(
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        model="vllm:qwen-2.5-omni-7b",
        tools=tools,
        tool_choice="auto",
    )
    call = response["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"

    await middleware.close()  # flush, so the file statistics below see the records
    stats = middleware.get_statistics()
    print(stats)
    assert stats["total_requests"] == 3
    assert stats["log_directory"] == str(tmp_path)
    assert stats["logging_enabled"] is True
    assert stats["log_files_count"] == 1
    assert stats["total_log_size_mb"] > 0

    records = load_logs(str(tmp_path))
    assert [r.endpoint for r in records] == ["chat/completions", "completions", "chat/completions"]
    assert records[1].prompt == "Once upon a time"
    assert records[2].parameters["tools"] == tools
    assert records[2].parameters["tool_choice"] == "auto"


async def test_loading_analysis_and_use_cases(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=str(tmp_path)) as middleware:
        # A/B testing: the original example omits the model (the server's default)
        temps = [0.5, 0.7, 0.9]
        messages = [{"role": "user", "content": "Write a creative story."}]

        for temp in temps:
            await middleware.chat_completion(messages=messages, temperature=temp)
        with pytest.raises(Exception):  # noqa: B017 - any error: the README wraps calls
            await middleware.chat_completion(messages=messages, model="missing-model")

    # Load all logs
    records = load_logs(str(tmp_path))

    # Load logs for a specific date range
    today = records[0].timestamp[:10].replace("-", "")
    assert len(load_logs(str(tmp_path), start_date=today, end_date=today)) == 4
    assert load_logs(str(tmp_path), start_date="20251021", end_date="20251025") == []

    # Analyze the records
    successful = [r for r in records if r.error is None]
    avg_latency = sum(r.latency_ms for r in successful) / len(successful)

    print(f"Total requests: {len(records)}")
    print(f"Success rate: {len(successful) / len(records) * 100:.1f}%")
    print(f"Average latency: {avg_latency:.2f}ms")
    assert len(records) == 4 and len(successful) == 3 and avg_latency > 0

    # Training data collection
    training_data = [
        {"prompt": r.messages, "completion": r.response}
        for r in records
        if r.error is None and r.latency_ms < 1000
    ]
    assert len(training_data) == 3

    # Performance monitoring
    records = load_logs(str(tmp_path), start_date="20251020")
    latencies = [r.latency_ms for r in records if r.error is None]
    print(f"Min latency: {min(latencies):.2f}ms")
    print(f"Max latency: {max(latencies):.2f}ms")
    print(f"Avg latency: {sum(latencies) / len(latencies):.2f}ms")

    # Error analysis
    errors = [r for r in records if r.error is not None]
    for error in errors:
        print(f"Request {error.request_id}: {error.error}")
    assert len(errors) == 1 and "404" in errors[0].error

    # A/B: the parameters were recorded
    assert sorted(r.parameters["temperature"] for r in successful) == temps


async def test_json_log_format_is_read_back(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=str(tmp_path), log_format="json"
    ) as middleware:
        for i in range(5):
            await middleware.completions(prompt=f"p{i}", model="vllm:qwen-2.5-omni-7b")
    (path,) = tmp_path.rglob("*.json")
    assert path.read_text().startswith("{\n  ")
    assert [r.prompt for r in load_logs(str(tmp_path))] == [f"p{i}" for i in range(5)]


async def test_disabled_logging_writes_nothing(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=str(tmp_path / "logs"), enable_file_logging=False
    ) as middleware:
        await middleware.completions(prompt="x", model="vllm:qwen-2.5-omni-7b")
        stats = middleware.get_statistics()
    assert stats["logging_enabled"] is False and stats["total_requests"] == 1
    assert not (tmp_path / "logs").exists()

"""The record bytes the client writes for fixed traffic, pinned: a reshaping of the client (the
recorder, its doors) must write the same fields, in the same order, with the same values.

`tests/client/data/records_golden.jsonl` was written by this module on the client before the
recorder existed (`python tests/client/test_record_equality.py --write`); only the values that
change from run to run (ids, times, latencies) are replaced by placeholders.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import APIStatusError, VLLMMiddleware
from vllm_middleware_testing import FakeVLLMServer

GOLDEN = Path(__file__).parent / "data" / "records_golden.jsonl"
_VOLATILE = {"timestamp", "request_id", "latency_ms", "ttft_ms", "id", "created", "created_at"}
_VOLATILE_PREFIXES = ("chatcmpl-", "cmpl-", "resp_", "msg_", "rs_", "embd-", "chatcmpl-tool-")


def _normalized(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if key in _VOLATILE and value is not None:
        return f"<{key}>"
    if isinstance(value, str) and value.startswith(_VOLATILE_PREFIXES):
        return "<generated id>"
    return value


async def _traffic(base_url: str, log_dir: Path) -> None:
    client = VLLMMiddleware(
        base_url, log_dir=log_dir, redis_url="", host="golden", metadata={"app": "golden"}
    )
    messages = [{"role": "user", "content": "Hello there"}]
    await client.chat_completion(messages, temperature=0.0, max_tokens=8, metadata={"n": 1})
    await client.completions("Once upon", max_tokens=5, headers={"X-Request-Id": "golden-2"})
    stream = await client.chat_completion(messages, max_tokens=6, stream=True)
    async for _ in stream:
        pass
    stream = await client.completions("Count:", max_tokens=4, stream=True)
    async with stream:
        async for _ in stream:
            break
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}},
        }
    ]
    await client.chat_completion(
        [{"role": "user", "content": "Weather in Paris?"}], tools=tools, tool_choice="required"
    )
    await client.embeddings(["a", "b"], dimensions=4)
    await client.responses("Say hi", max_output_tokens=5)
    events = await client.responses("Say hi twice", max_output_tokens=5, stream=True)
    async for _ in events:
        pass
    await client.tokenize("hello")
    with pytest.raises(APIStatusError):
        await client.chat_completion(messages, max_tokens=-1)
    await client.close()


def records(base_url: str, log_dir: Path) -> list[str]:
    """The records the traffic writes, normalized, one JSON text each, sorted."""
    asyncio.run(_traffic(base_url, log_dir))
    lines = [
        line
        for path in sorted(log_dir.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line
    ]
    return sorted(json.dumps(_normalized(json.loads(line))) for line in lines)


def test_records_match_the_pinned_bytes(tmp_path: Path) -> None:
    with FakeVLLMServer() as server:
        got = records(server.base_url, tmp_path)
    expected = GOLDEN.read_text().splitlines()
    assert len(got) == len(expected)
    for written, pinned in zip(got, expected, strict=True):
        assert written == pinned


if __name__ == "__main__":  # pragma: no cover - writes the golden file
    import tempfile

    assert sys.argv[1:] == ["--write"], "usage: python tests/client/test_record_equality.py --write"
    with FakeVLLMServer() as fake, tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text("\n".join(records(fake.base_url, Path(tmp))) + "\n")

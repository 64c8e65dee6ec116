"""`vllm-mw tail`: one line per record, the newest first read, and `-f` following the writers."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from vllm_middleware import VLLMMiddleware
from vllm_middleware._record_view import RecordFilter
from vllm_middleware._tail import Follower, format_line, last_records, tail
from vllm_middleware_testing import FakeVLLMServer

from ..conftest import wait_for

MODEL = "vllm:qwen-2.5-omni-7b"
TODAY = datetime.now(UTC).date().isoformat()


def rec(rid: str, day: str = "2025-10-21", second: int = 0, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "timestamp": f"{day}T10:00:{second:02d}.000000+00:00",
        "request_id": rid,
        "model": "m",
        "messages": [{"role": "user", "content": f"question {rid}"}],
        "response": {
            "choices": [{"message": {"role": "assistant", "content": f"answer {rid}"}}],
        },
        "latency_ms": 120.5,
        "error": None,
        "status_code": 200,
        "host": "a",
        "usage": {"prompt_tokens": 7, "completion_tokens": 11},
        "ttft_ms": 30.0,
    }
    base.update(extra)
    return base


def append(path: Path, *records: dict[str, Any], raw: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(b"".join(orjson.dumps(r) + b"\n" for r in records) + raw)


def part(root: Path, day: str, host: str, name: str = "w-000001.jsonl") -> Path:
    return root / f"date={day}" / f"host={host}" / name


def test_a_line_shows_time_host_model_status_timings_tokens_and_both_texts() -> None:
    line = format_line(rec("r1", second=5))
    assert line.startswith("2025-10-21 10:00:05  a  m  200  120ms  ttft 30ms  7→11")
    assert "'question r1' → 'answer r1'" in line


def test_a_line_for_errors_tool_calls_long_text_and_metadata_only_records() -> None:
    failed = rec("e", response=None, error="HTTP 500: boom", status_code=500, usage=None)
    assert "500" in format_line(failed) and "!! 'HTTP 500: boom'" in format_line(failed)
    assert "-→-" in format_line(failed)
    calls = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}
    tool = rec("t", response={"choices": [{"message": calls}]})
    assert "[tool_calls: f]" in format_line(tool)
    long = rec("l", messages=[{"role": "user", "content": "word " * 100}])
    assert "…" in format_line(long) and "…" not in format_line(long, full=True)
    # content="metadata": no message text, no response body; still one readable line.
    bare = {"timestamp": "2025-10-21T10:00:00+00:00", "request_id": "x", "model": "m"}
    assert format_line(bare).endswith("'' → ''")
    parts = [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {}}]
    assert "what is [image_url]" in format_line(
        rec("p", messages=[{"role": "user", "content": parts}])
    )
    completion = rec(
        "c", messages=None, prompt="once upon", response={"choices": [{"text": "a time"}]}
    )
    assert "'once upon' → 'a time'" in format_line(completion)


def test_last_records_are_the_newest_across_days_and_hosts_in_time_order(tmp_path: Path) -> None:
    append(
        part(tmp_path, "2025-10-20", "a"), rec("old1", "2025-10-20"), rec("old2", "2025-10-20", 1)
    )
    append(part(tmp_path, "2025-10-21", "b"), rec("b1", second=1), rec("b3", second=3))
    append(part(tmp_path, "2025-10-21", "a"), rec("a2", second=2), rec("a4", second=4))
    got = [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 3)]
    assert got == ["a2", "b3", "a4"]
    got = [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 5)]
    assert got == ["old2", "b1", "a2", "b3", "a4"]
    assert last_records(tmp_path, RecordFilter(host="b"), 1)[0]["request_id"] == "b3"


def test_last_records_stop_at_the_first_day_that_fills_them(tmp_path: Path) -> None:
    append(part(tmp_path, "2025-10-21", "a"), rec("new"))
    # A record misfiled in an older day with a later time: reading that day would pick it.
    append(part(tmp_path, "2025-10-20", "a"), rec("misfiled", "2025-10-22"))
    assert [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 1)] == ["new"]
    got = [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 2)]
    assert got == ["new", "misfiled"]  # asked for more: the older day is read


def test_filters_by_model_errors_and_metadata(tmp_path: Path) -> None:
    append(
        part(tmp_path, "2025-10-21", "a"),
        rec("m1", model="x", metadata={"app": "app-7", "n": 3}),
        rec("m2", error="boom", metadata={"app": "app-7"}),
        rec("m3", metadata={"app": "app-8"}),
    )
    pick = lambda **kw: [r["request_id"] for r in last_records(tmp_path, RecordFilter(**kw), 9)]  # noqa: E731
    assert pick(model="x") == ["m1"]
    assert pick(errors_only=True) == ["m2"]
    assert pick(meta={"app": "app-7"}) == ["m1", "m2"]
    assert pick(meta={"n": "3"}) == ["m1"]
    assert pick(meta={"missing": "1"}) == []


def test_the_follower_shows_complete_lines_only_and_finds_new_files(tmp_path: Path) -> None:
    first = part(tmp_path, TODAY, "a")
    append(first, rec("before", TODAY))
    follower = Follower(tmp_path)
    assert follower.poll() == []  # what existed when it started is history, not news
    line = orjson.dumps(rec("split", TODAY))
    append(first, raw=line[:20])
    assert follower.poll() == []  # a writer's partial line waits for its newline
    append(first, raw=line[20:] + b"\n")
    assert [r["request_id"] for r in follower.poll()] == ["split"]
    # Rotation (a new file), a new host, and a new day directory appear at the next poll.
    append(part(tmp_path, TODAY, "a", "w-000002.jsonl"), rec("rotated", TODAY, 1))
    append(part(tmp_path, TODAY, "b"), rec("other-host", TODAY, 2))
    append(part(tmp_path, "2999-01-01", "a"), rec("next-day", "2999-01-01"))
    got = [r["request_id"] for r in follower.poll()]
    assert got == ["rotated", "other-host", "next-day"]
    # A file replaced under the same name is read again from its start.
    first.unlink()
    append(first, rec("replaced", TODAY, 3))
    assert [r["request_id"] for r in follower.poll()] == ["replaced"]
    append(first, raw=b"{not json\n")
    assert follower.poll() == [] and follower.bad_lines == 1


def test_tail_follow_prints_history_then_new_records_once(tmp_path: Path) -> None:
    path = part(tmp_path, TODAY, "a")
    append(path, rec("h1", TODAY, 1), rec("h2", TODAY, 2))
    out = io.StringIO()
    stop = threading.Event()

    def run() -> None:
        tail(
            tmp_path,
            RecordFilter(errors_only=False, meta={}),
            count=1,
            follow=True,
            interval=0.02,
            out=out,
            render=lambda r: str(r["request_id"]),
            stop=stop.is_set,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: "h2" in out.getvalue())
        append(path, rec("n1", TODAY, 3), rec("n2", TODAY, 4, model="other"))
        wait_for(lambda: "n2" in out.getvalue())
    finally:
        stop.set()
        thread.join(10)
    assert out.getvalue().split() == ["h2", "n1", "n2"]


def test_vllm_mw_tail_follows_what_a_real_client_writes(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:

    env = {**os.environ, "VLLM_MW_LOG_DIR": str(tmp_path)}

    async def calls(*prompts: str) -> None:
        async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, host="h1") as c:
            for prompt in prompts:
                await c.chat_completion([{"role": "user", "content": prompt}], model=MODEL)

    asyncio.run(calls("before tail"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_middleware._cli", "tail", "-f", "--model", MODEL],
        stdout=subprocess.PIPE,
        env=env,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.decode() for line in iter(proc.stdout.readline, b""))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: len(lines) >= 1, timeout=30)  # the history: tail is now following
        asyncio.run(calls("hello tail", "second call"))
        wait_for(lambda: len(lines) >= 3, timeout=30)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "h1" in lines[0] and MODEL in lines[0] and "'before tail' →" in lines[0]
    assert "'hello tail' →" in lines[1] and "'second call' →" in lines[2]
    assert len(lines) == 3


def test_tail_without_a_log_dir_is_one_line_of_error(tmp_path: Path) -> None:
    from vllm_middleware._cli import main

    assert main(["tail", "--log-dir", str(tmp_path / "nope")]) == 2

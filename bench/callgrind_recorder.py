"""Instructions of the recorder alone (callgrind), two versions in the same run.

What a logged request costs the request path over logging off, without the sink's work (a
stub sink whose `submit` does nothing) and without httpx: `Recorder.start` (every call, logged
or not), `Call.log` of a JSON reply (`json`), and a ~23-chunk stream's end (`stream-end`:
`StreamAccumulator.response()` and `Call.log`; the fold of each chunk is measured with it
and subtracted, as logging off pays for it too). The record is the one `client_overhead.py`
and `callgrind_request.py` send (system + user message). Each figure is (instructions of N
iterations - those of N/5) / (4N/5) under `valgrind --tool=callgrind`, `PYTHONHASHSEED=0`:
start-up and imports cancel out, and the machine's load does not change the count.

    python bench/callgrind_recorder.py [--baseline 5917dd1] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
KINDS = ("start", "parse", "json", "fold", "stream")


def child(kind: str, n: int) -> None:
    import orjson
    from _common import sample_messages
    from vllm_middleware._reassembly import StreamAccumulator
    from vllm_middleware._recorder import Recorder

    class StubSink:
        def submit(self, entry: Any) -> None:
            pass

    recorder = Recorder.open(enable_file_logging=False)
    recorder.sink = StubSink()  # type: ignore[assignment]
    messages = sample_messages()
    params = {"temperature": 0.2, "max_tokens": 256}
    usage = {"prompt_tokens": 48, "completion_tokens": 44, "total_tokens": 92}
    reply = orjson.dumps(
        {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000,
            "model": "m", "usage": usage,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Echo: " + "w " * 20}}],
        }
    )  # fmt: skip
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": "m"}  # fmt: skip

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events = [{**head, "choices": choice({"role": "assistant", "content": ""})}]
    events += [{**head, "choices": choice({"content": f"w{i} "})} for i in range(20)]
    events += [{**head, "choices": choice({}, "stop")}, {**head, "choices": [], "usage": usage}]
    frames = [orjson.dumps(event) for event in events]
    end = stream_end() if kind == "stream" else None
    for _ in range(n):
        started = time.perf_counter()
        call = recorder.start("chat/completions", "messages", messages, "m", params, None)
        call.body_bytes = 900
        if kind == "parse":  # what logging off does with the reply too
            orjson.loads(reply)
        elif kind == "json":
            call.log(started, response=orjson.loads(reply), status_code=200, reply_bytes=900)
        elif kind in ("fold", "stream"):
            acc = StreamAccumulator(True, started)
            for frame in frames:
                acc.add(orjson.loads(frame))
            if end is not None:  # what `StreamCore` does at [DONE] (either version)
                end(call, started, acc)


def stream_end() -> Any:
    """`StreamCore._log` on a bare state. Looked up once: a `from package import module` in
    the loop would run importlib's `_handle_fromlist` (~6k instructions) every iteration."""
    from vllm_middleware._stream_core import StreamCore

    if not hasattr(StreamCore, "_log"):
        raise SystemExit("no StreamCore._log in this version")

    def end(call: Any, started: float, acc: Any) -> None:
        state = StreamCore.__new__(StreamCore)
        state.call, state.started, state.acc, state.logged = call, started, acc, False
        state.response = _Status  # only `.status_code` is read
        state._log("completed", None)

    return end


class _Status:
    status_code = 200


def instructions(client_dir: Path | None, kind: str, n: int, scratch: Path) -> int:
    from _common import callgrind_total

    out = scratch / f"cg.{kind}.{n}.{'base' if client_dir else 'new'}"
    return callgrind_total(SCRIPT, [kind, str(n)], out, client_dir=client_dir, keep=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=4, help="valgrind runs at a time")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    from _common import banner, print_table
    from _versions import baseline_client

    banner("callgrind_recorder", args)
    baseline = baseline_client(args.baseline)
    versions = [(f"before ({args.baseline})", baseline), ("after (this checkout)", None)]
    big, small = args.iterations, args.iterations // 5
    scratch = Path(tempfile.mkdtemp(prefix="bench-recorder-"))
    # Counts do not depend on the load, so the runs go in parallel.
    jobs = {
        (kind, name, n): (client_dir, kind, n)
        for kind in KINDS
        for name, client_dir in versions
        for n in (big, small)
    }
    with ThreadPoolExecutor(args.jobs) as pool:
        found = pool.map(lambda job: instructions(*job, scratch), jobs.values())
        counts = dict(zip(jobs, found, strict=True))
    per = {
        (kind, name): (counts[(kind, name, big)] - counts[(kind, name, small)]) / (big - small)
        for kind in KINDS
        for name, _ in versions
    }
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    rows = []
    for label, kind, minus in (
        ("Recorder.start (every call)", "start", None),
        ("Call.log, JSON reply", "json", "parse"),
        ("stream end: response() + Call.log", "stream", "fold"),
    ):
        cells: list[Any] = [label]
        values = []
        for name, _ in versions:
            value = per[(kind, name)] - (per[(minus, name)] if minus else 0)
            values.append(value)
            cells.append(f"{value / 1000:.1f}k")
        cells.append(f"{(values[1] - values[0]) / 1000:+.1f}k")
        rows.append(cells)
    print_table(
        f"Recorder instructions per call (callgrind; ({big:,} - {small:,}) / {big - small:,})",
        ["work", versions[0][0], versions[1][0], "change"],
        rows,
    )


if __name__ == "__main__":
    main()

"""`vllm-mw ui` over a large live (JSONL) tree: ms per page, main's code vs this branch's.

Builds `--records` records (default 1.5 million, ~1 KB chat records) over `--days` days,
`--hosts` hosts and `--writers` writers per host, written by `PartitionWriter` as the workers
write them (files rotated at `--file-mb`): timestamps spread over each day, five models,
one request in 50 failed, a `team` metadata key. Then, in the same run and on the same tree,
times each page through the real Starlette app (`TestClient`) in a fresh process per code
version, median of `--repeats`:

    list: first page, the next page (its "older" link), the tenth page, filtered by model,
    by host, by status=error, by metadata, free text; a request's page (from a list link,
    and a bare /request/ID link).

"before" is main's `vllm_middleware` (`git archive main client/` into a temp dir, first on
`sys.path` of its process); "after" is this checkout's. Both must show the same rows.
The "after" process also reports its cold start (the first page builds its file summaries).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = ("llama-3-8b", "qwen-2.5-omni-7b", "mistral-7b", "gemma-2-9b", "phi-3-mini")
TEAMS = ("search", "support", "billing", "ads")


def generate(root: Path, records: int, days: int, hosts: int, writers: int, file_mb: int) -> None:
    from _common import _text
    from vllm_middleware.storage import PartitionWriter, RecordEntry

    start = datetime.combine(date(2026, 1, 1), datetime.min.time(), UTC)
    step = timedelta(days=days) / records
    owners = {
        (h, w): PartitionWriter(
            root, f"worker-{h}-{w}", fsync=False, max_bytes=file_mb * 1024 * 1024
        )
        for h in range(hosts)
        for w in range(writers)
    }
    batch: dict[tuple[int, int], list[RecordEntry]] = {key: [] for key in owners}
    texts = [_text(300 + 37 * (i % 11), i) for i in range(97)]
    for i in range(records):
        stamp = start + step * i
        h, w = i % hosts, (i // hosts) % writers
        model = MODELS[(i * 7) % len(MODELS)]
        failed = i % 50 == 7
        record = {
            "timestamp": stamp.isoformat(),
            "request_id": f"req_{stamp:%Y%m%d_%H%M%S}_{h:02d}{w:02d}_{i:08d}",
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": f"question {i}: {texts[i % 97]}"},
            ],
            "response": None
            if failed
            else {
                "id": f"chatcmpl-{i}",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": texts[(i * 3) % 97]},
                        "finish_reason": "stop",
                    }
                ],
            },
            "parameters": {"temperature": 0.2, "max_tokens": 256},
            "latency_ms": (i * 7919) % 5000 / 3.0,
            "error": "HTTP 500: upstream failed" if failed else None,
            "metadata": {"team": TEAMS[i % len(TEAMS)], "user": f"u{i % 1000}"},
            "schema_version": 2,
            "host": f"app-{h}",
            "endpoint": "chat/completions",
            "status_code": 500 if failed else 200,
            "usage": None if failed else {"prompt_tokens": 40, "completion_tokens": i % 300},
            "stream": False,
            "ttft_ms": None,
        }
        key = (h, w)
        batch[key].append(
            RecordEntry(stamp.date().isoformat(), f"app-{h}", False, orjson.dumps(record))
        )
        if len(batch[key]) >= 2000:
            owners[key].write_batch(batch[key])
            batch[key] = []
    for key, entries in batch.items():
        if entries:
            owners[key].write_batch(entries)
    for writer in owners.values():
        writer.close()


# -- the timing process (one per code version) ------------------------------------------------

ROW = re.compile(r'<tr(?: class="error")?><td><a href="(/request/[^"]+)">')


def _links(text: str) -> list[str]:
    return [m.replace("&amp;", "&") for m in ROW.findall(text)]


def _next(text: str) -> str | None:
    found = re.search(r'<a rel="next" href="([^"]+)"', text)
    return found.group(1).replace("&amp;", "&") if found else None


def measure(root: Path, repeats: int) -> dict[str, object]:
    """Run in the child: {page name: [median ms, rows' links]} for this process's code."""
    from starlette.testclient import TestClient
    from vllm_middleware._ui import create_app

    client = TestClient(create_app(root))
    out: dict[str, object] = {}

    def timed(name: str, url: str, repeat: int = repeats) -> str:
        times, text = [], ""
        for _ in range(repeat):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (url, response.status_code, response.text[:300])
            text = response.text
        out[name] = [statistics.median(times), _links(text)]
        return text

    started = time.perf_counter()
    first = client.get("/").text
    out["cold first page"] = [(time.perf_counter() - started) * 1000, _links(first)]
    first = timed("first page", "/")
    second = _next(first)
    assert second is not None
    timed("next page (older link)", second)
    url: str | None = "/"
    if "after=" in second:  # keyset links: follow them as a user does; time the tenth page
        for _ in range(9):
            assert url is not None
            url = _next(client.get(url).text)
    else:  # numbered pages (main): the same page directly
        url = "/?page=10"
    assert url is not None
    timed("tenth page", url)
    timed("model=mistral-7b", "/?model=mistral-7b")
    timed("host=app-1", "/?host=app-1")
    timed("status=error", "/?status=error")
    timed("meta team=ads", "/?meta=team%3Dads")
    timed("free text (recent matches)", "/?q=question+9999")
    links = _links(first)
    timed("request page (list link)", links[7])
    bare = links[7].split("?")[0]
    timed("request page (bare id)", bare)
    return out


def child_main() -> None:
    root, repeats = Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(measure(root, repeats)))


# -- the driver -------------------------------------------------------------------------------


def run_version(code: Path | None, root: Path, repeats: int) -> dict[str, list[object]]:
    env = dict(os.environ)
    path = [str(HERE)] + ([str(code)] if code else [])
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"timing process failed:\n{done.stderr[-3000:]}")
    result: dict[str, list[object]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    from _common import banner, base_parser, print_table

    parser = base_parser(__doc__ or "")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--file-mb", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", default="main", help="the git ref timed as 'before'")
    parser.add_argument("--dir", help="where to build the tree (default: a temp dir)")
    parser.add_argument("--tree", help="an existing tree to time (built there if missing, kept)")
    args = parser.parse_args()
    records = args.records or (100_000 if args.quick else 1_500_000)
    banner("ui_pages", args)
    base = Path(tempfile.mkdtemp(prefix="vllm-mw-ui-", dir=args.dir))
    root = Path(args.tree) if args.tree else base / "logs"
    try:
        started = time.perf_counter()
        if not root.exists():
            generate(root, records, args.days, args.hosts, args.writers, args.file_mb)
        files = [p for p in root.rglob("*.jsonl")]
        size = sum(p.stat().st_size for p in files)
        print(
            f"  generated {records:,} records in {time.perf_counter() - started:.0f} s: "
            f"{len(files)} JSONL files, {size / 2**20:,.0f} MB",
            flush=True,
        )
        old = base / "before"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.base, "client"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        after = run_version(None, root, args.repeats)
        before = run_version(old / "client", root, args.repeats)
        rows = []
        for name, (new_ms, new_links) in after.items():
            old_ms, old_links = before[name]
            same = "yes" if _ids(old_links) == _ids(new_links) else "NO"  # type: ignore[arg-type]
            speed = f"{old_ms / new_ms:,.0f}x"  # type: ignore[operator]
            rows.append([name, f"{old_ms:,.0f}", f"{new_ms:,.1f}", speed, same])
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print_table(
            f"ms per page over {records:,} JSONL records ({len(files)} files, "
            f"{size / 2**20:,.0f} MB; median of {args.repeats}; load {load})",
            ["page", f"before ({args.base}) ms", "after ms", "speed-up", "same rows"],
            rows,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _ids(links: list[str]) -> list[str]:
    return [link.split("?")[0] for link in links]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main()
    else:
        main()

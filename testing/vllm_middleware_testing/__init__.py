"""Test doubles for vllm-middleware: a fake vLLM HTTP server and a real redis-server process.

Both are plain synchronous objects usable from sync and async tests alike, e.g.::

    with FakeVLLMServer(flavor="v0.10.2") as vllm, RedisServerProcess() as redis:
        ...  # point the client at vllm.base_url and redis.url
"""

from ._fake_text import (
    REASONING_TEXT,
    Chunker,
    FakeReply,
    count_tokens,
    default_chunker,
    fake_reply,
    fake_tool_arguments,
)
from ._fake_vllm import FakeVLLMServer, RecordedRequest
from ._fake_wire import QUEUE_FULL_MESSAGE, ErrorShape, Flavor
from ._redis_server import RedisServerError, RedisServerProcess

__all__ = [
    "QUEUE_FULL_MESSAGE",
    "REASONING_TEXT",
    "Chunker",
    "ErrorShape",
    "FakeReply",
    "FakeVLLMServer",
    "Flavor",
    "RecordedRequest",
    "RedisServerError",
    "RedisServerProcess",
    "count_tokens",
    "default_chunker",
    "fake_reply",
    "fake_tool_arguments",
]

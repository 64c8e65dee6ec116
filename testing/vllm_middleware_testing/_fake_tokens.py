"""The fake's token-level outputs: token ids, logprobs and prompt logprobs (section 2 and 4).

A "token" is a word with the whitespace before it (what `default_chunker` cuts), so a piece of
a stream holds a whole number of tokens whatever chunker splits it, and the per-chunk lists of
a stream concatenate to the non-streaming lists. Values are deterministic functions of the
token text, so two identical requests get identical numbers.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

_TOKEN = re.compile(r"\s*\S+|\s+$")
_VOCAB = 151_000


def tokens_of(text: str) -> list[str]:
    """The fake tokenizer's tokens of ``text`` (trailing whitespace is a token of its own)."""
    return _TOKEN.findall(text)


def token_id(token: str) -> int:
    return zlib.crc32(token.encode()) % _VOCAB


def token_ids(text: str) -> list[int]:
    return [token_id(token) for token in tokens_of(text)]


def _logprob(token: str, rank: int) -> float:
    return -round((zlib.crc32(token.encode()) % 997) / 1000 + rank * 0.5, 4)


def _alternatives(token: str, k: int) -> list[str]:
    # The sampled token first, then made-up alternatives, as if ranked by probability.
    return [token] + [f"{token.strip()}~{rank}" for rank in range(1, k)]


def chat_logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """The ``logprobs.content`` entries of ``text``'s tokens (chat)."""
    entries = []
    for token in tokens_of(text):
        alternatives = [
            {"token": alt, "logprob": _logprob(alt, rank), "bytes": list(alt.encode())}
            for rank, alt in enumerate(_alternatives(token, top))
        ]
        entries.append(
            {
                "token": token,
                "logprob": _logprob(token, 0),
                "bytes": list(token.encode()),
                "top_logprobs": alternatives,
            }
        )
    return entries


def completion_logprobs(text: str, top: int, offset: int) -> dict[str, Any]:
    """The legacy parallel lists of ``text``'s tokens (completions); offsets start at
    ``offset`` (the length of what came before in the same choice)."""
    out: dict[str, Any] = {
        "text_offset": [],
        "token_logprobs": [],
        "tokens": [],
        "top_logprobs": [],
    }
    position = offset
    for token in tokens_of(text):
        out["text_offset"].append(position)
        out["token_logprobs"].append(_logprob(token, 0))
        out["tokens"].append(token)
        out["top_logprobs"].append(
            {alt: _logprob(alt, rank) for rank, alt in enumerate(_alternatives(token, top))}
        )
        position += len(token)
    return out


def prompt_logprobs(text: str, top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: null for the first token, then per position a map from
    token id to ``{logprob, rank, decoded_token}``."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for position, token in enumerate(tokens_of(text)):
        if position == 0:
            out.append(None)
            continue
        entry: dict[str, dict[str, Any]] = {}
        for rank, alt in enumerate(_alternatives(token, max(1, top)), start=1):
            entry[str(token_id(alt))] = {
                "logprob": _logprob(alt, rank - 1),
                "rank": rank,
                "decoded_token": alt,
            }
        out.append(entry)
    return out

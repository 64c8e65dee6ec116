"""`redact_secrets`: credentials and card numbers out of a record's text, before it is encoded.

Each secret found in the record's messages or prompt, its response and tool-call arguments is
replaced by a typed marker, `[REDACTED:<kind>]`, so analyses can still count what was there.
The patterns are for credentials with a recognisable shape (vendor prefixes, JWTs, PEM blocks,
`key = value` assignments, URL passwords) and card numbers that pass the Luhn check; free-form
personal data is out of scope (use a dedicated tool through `redact=`).

The caller's objects are never changed: strings are replaced in copies of the containers that
hold them (copy-on-write), and a record without secrets comes back as the same objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["REDACTED_KINDS", "redact_secrets", "redact_text"]


class _Rule(NamedTuple):
    kind: str
    triggers: tuple[str, ...]  # the rule's regex runs only on text holding one of these
    ignore_case: bool  # triggers are looked up in the lower-cased text
    regex: re.Pattern[str]  # a `label` group, when present, is kept before the marker
    on_lower: bool = False  # the regex (lower case) matches the lower-cased text: much faster


def _rule(
    kind: str,
    triggers: tuple[str, ...],
    pattern: str,
    ignore_case: bool = False,
    on_lower: bool = False,
) -> _Rule:
    return _Rule(kind, triggers, ignore_case, re.compile(pattern), on_lower)


# Each rule runs only when a literal it needs is in the text (a substring test is ~50x cheaper
# than a regex scan), so ordinary text costs a few substring tests per rule. Quantifiers are
# bounded or anchored on literals: no input makes a scan super-linear.
_RULES: tuple[_Rule, ...] = (
    _rule(
        "private_key",
        ("PRIVATE KEY-----",),
        r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY-----[\s\S]*?"
        r"(?:-----END[A-Z0-9 ]{0,40} PRIVATE KEY-----|\Z)",
    ),
    _rule("jwt", ("eyJ",), r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}"),
    _rule(
        "aws_access_key",
        ("AKIA", "ASIA", "ABIA", "ACCA"),
        r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b",
    ),
    _rule("gcp_api_key", ("AIza",), r"\bAIza[0-9A-Za-z_-]{35}"),
    _rule("gcp_oauth_token", ("ya29.",), r"\bya29\.[0-9A-Za-z_-]{20,}"),
    _rule(
        "github_token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    ),
    _rule("slack_token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    _rule(
        "slack_webhook",
        ("hooks.slack.com",),
        r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}",
    ),
    _rule("stripe_key", ("k_live_", "k_test_"), r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{16,}"),
    _rule("openai_key", ("sk-",), r"\bsk-(?:[A-Za-z0-9]+-){0,3}[A-Za-z0-9_-]{20,}"),
    _rule(
        "azure_storage_key",
        ("accountkey=",),
        r"(?P<label>(?i:AccountKey=))[A-Za-z0-9+/]{40,}={0,2}",
        ignore_case=True,
    ),
    _rule(
        "azure_sas_token",
        ("sig=",),
        r"(?P<label>(?i:[?&]sig=))[A-Za-z0-9%+/]{20,}={0,2}",
        ignore_case=True,
    ),
    _rule(
        "bearer_token",
        ("bearer",),
        r"(?P<label>(?i:\bbearer\s+))[A-Za-z0-9._~+/-]{8,}=*",
        ignore_case=True,
    ),
    _rule(
        "url_password",
        ("://",),
        r"(?P<label>(?i:\b[a-z][a-z0-9+.-]{1,20}://[^\s/:@]{1,100}:))[^\s/@]{1,200}(?=@)",
    ),
    _rule(
        "secret_assignment",
        # Every keyword of the pattern holds one of these (fewer tests than one per spelling;
        # "token" and "api" are frequent words, but the pattern on lower-cased text is cheap).
        ("api", "secret", "token", "passw"),
        r"(?P<label>(?:aws_secret_access_key|api[_-]?key|secret[_-]?key"
        r"|client[_-]?secret|access[_-]?token|auth[_-]?token|password|passwd)"
        r"[\"']?\s{0,5}[:=]\s{0,5}[\"']?)[^\s\"',;]{6,}",
        ignore_case=True,
        on_lower=True,
    ),
    # 13 to 19 digits, in groups separated by single spaces or dashes; Luhn-checked below.
    # Triggered by 13 digits in a row once spaces and dashes are removed (see `_has_digits`).
    _rule("card_number", (), r"\d{4}(?<![\d-]\d{4})[\d -]{8,21}\d(?!\d)"),
)
REDACTED_KINDS = tuple(rule.kind for rule in _RULES)
_TEXT_RULES = tuple(rule for rule in _RULES if rule.triggers)
(_CARD,) = (rule for rule in _RULES if rule.kind == "card_number")

# bytes.translate: digits to "0", anything else to ".", spaces and dashes removed; one C pass.
_DIGITS_TABLE = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_THIRTEEN = b"0" * 13


def _has_digits(text: str) -> bool:
    """Whether `text` may hold a card number: 13 digits in a row, ignoring spaces and dashes.

    A regex scan costs tens of nanoseconds per character; this costs about one.
    """
    squeezed = text.encode("utf-8", "surrogatepass").translate(_DIGITS_TABLE, b" -")
    return _THIRTEEN in squeezed


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _marker(kind: str) -> Callable[[re.Match[str]], str]:
    marker = f"[REDACTED:{kind}]"

    def replace(match: re.Match[str]) -> str:
        label = match.groupdict().get("label")
        return marker if label is None else label + marker

    def replace_card(match: re.Match[str]) -> str:
        text = match.group()
        digits = text.replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and _luhn(digits) and "  " not in text and "--" not in text:
            return marker
        return text

    return replace_card if kind == "card_number" else replace


_REPLACERS = {rule.kind: _marker(rule.kind) for rule in _RULES}


def _sub_on_lower(kind: str, regex: re.Pattern[str], text: str, lower: str) -> str:
    """`regex` matched on `lower` (same length as `text`), replacements made in `text`."""
    pieces: list[str] = []
    last = 0
    for match in regex.finditer(lower):
        start, end = match.span()
        if start and (lower[start - 1].isalnum() or lower[start - 1] == "_"):
            continue  # inside a longer word ("mypassword=" is not a label we know)
        pieces.append(text[last : match.end("label")])
        pieces.append(f"[REDACTED:{kind}]")
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


# No secret we look for fits in fewer characters ("[REDACTED:...]" markers are longer too).
_MIN_CHARS = 12


def redact_text(text: str) -> str:
    """`text` with every secret replaced by its marker (the same object when none is found)."""
    if len(text) < _MIN_CHARS:
        return text
    if text.startswith("data:") and ";base64," in text[:256]:
        return text  # a media blob, not text
    lower: str | None = None
    out = text
    # Plain tuple unpacking: attribute access on the rules would cost more than the tests.
    for kind, triggers, ignore_case, regex, on_lower in _TEXT_RULES:
        if ignore_case:
            if lower is None:
                lower = text.lower()
            hay = lower
        else:
            hay = text
        for trigger in triggers:
            if trigger in hay:
                break
        else:
            continue
        if on_lower:
            current = out.lower()
            if len(current) == len(out):
                out = _sub_on_lower(kind, regex, out, current)
                continue
            # Lower-casing changed the length (rare letters): match case-insensitively.
            out = re.sub(regex.pattern, _REPLACERS[kind], out, flags=re.IGNORECASE)
            continue
        out = regex.sub(_REPLACERS[kind], out)
    if _has_digits(text):
        out = _CARD.regex.sub(_REPLACERS["card_number"], out)
    return out


# Keys whose string values are media (base64), not text: never scanned.
_MEDIA_KEYS = frozenset(("data", "image_embeds", "audio_embeds", "video_embeds"))


def _scrub(value: Any) -> Any:
    """`value` with secrets redacted in every string; containers copied only where changed."""
    kind = type(value)
    if kind is str:
        return redact_text(value)
    if kind is dict:
        return _scrub_dict(value)
    if kind is list:
        return _scrub_list(value)
    return value


def _scrub_dict(value: dict[str, Any]) -> dict[str, Any]:
    new: dict[str, Any] | None = None
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            if len(item) < _MIN_CHARS or key in _MEDIA_KEYS:
                continue
            cleaned: Any = redact_text(item)
        elif kind is dict:
            cleaned = _scrub_dict(item)
        elif kind is list:
            cleaned = _scrub_list(item)
        else:
            continue
        if cleaned is not item:
            if new is None:
                new = dict(value)
            new[key] = cleaned
    return value if new is None else new


def _scrub_list(value: list[Any]) -> list[Any]:
    new: list[Any] | None = None
    for index, item in enumerate(value):
        kind = type(item)
        if kind is str:
            if len(item) < _MIN_CHARS:
                continue
            cleaned: Any = redact_text(item)
        elif kind is dict:
            cleaned = _scrub_dict(item)
        elif kind is list:
            cleaned = _scrub_list(item)
        else:
            continue
        if cleaned is not item:
            if new is None:
                new = list(value)
            new[index] = cleaned
    return value if new is None else new


# The record fields that carry text a caller or the model wrote. `error` is the server's own
# message (which can quote the input), so it is scrubbed too.
_TEXT_FIELDS = ("messages", "prompt", "response", "error", "error_detail")


def redact_secrets(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with secrets in its messages, prompt, response (tool-call arguments included)
    and error replaced by `[REDACTED:<kind>]` markers. For `VLLMMiddleware(redact=...)`.

    The record is changed in place (it is the middleware's own dict); the values it refers to
    (the caller's messages, the reply returned to the caller) are copied where changed.
    """
    for field in _TEXT_FIELDS:
        value = record.get(field)
        if value is not None and type(value) in (str, dict, list):
            cleaned = _scrub(value)
            if cleaned is not value:
                record[field] = cleaned
    return record

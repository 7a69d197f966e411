"""Secrets out of logs: the gateway's log records and every engine's output.

Two nets. Known secrets (the configured keys, each engine run's internal key) are
registered and masked wherever they appear. Key-shaped text is masked by pattern, for
secrets we never saw: `Authorization: Bearer …`, `x-api-key: …`, `--api-key …`,
`api_key='…'` (SGLang prints its arguments, vLLM its non-default ones), `sk-…`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable

MASK = "***"
MAX_SECRETS = 256  # engine keys are per run: keep the recent ones, not months of them

_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key)(['\"]?\s*[:=]\s*['\"]?)"
    r"((?:bearer|basic|token)\s+)?[^\s'\",;}\]]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{4,}")
_ARG = re.compile(
    r"(?i)(--api-keys?[=\s]+|\bapi[_-]?keys?['\"]?\s*[:=]\s*[\[(]?\s*['\"]?)[^\s'\",\])}]+")
_SK = re.compile(r"\b(sk-)[A-Za-z0-9_-]{8,}")

_lock = threading.Lock()  # log records may come from worker threads
_secrets: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
_known: re.Pattern[str] | None = None


def register(*secrets: str | None) -> None:
    """Mask these values wherever they appear from now on."""
    global _known
    with _lock:
        for s in secrets:
            if s and len(s) >= 6 and s not in _secrets:
                _secrets[s] = None
                if len(_secrets) > MAX_SECRETS:
                    del _secrets[next(iter(_secrets))]
        # Longest first: a key that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _known = re.compile("|".join(map(re.escape, ordered))) if ordered else None


def redact(text: str) -> str:
    known = _known
    if known is not None:
        text = known.sub(MASK, text)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) or "") + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    text = _ARG.sub(lambda m: m.group(1) + MASK, text)
    return _SK.sub(lambda m: m.group(1) + MASK, text)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, traceback and stack before any handler
    formats it (a traceback may quote a header, an argument list or a URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> None:
    """Register `secrets` and filter every handler of `logger` (the root logger): a
    filter on a handler sees the records of every logger that reaches it."""
    register(*secrets)
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())

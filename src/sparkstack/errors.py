"""Errors a client can see, in the OpenAI shape, with their status codes (SPEC section 4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "engine_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "api_error"),
                "param": None,
                "code": self.code,
            }
        }


def shown(text: str, limit: int = 120) -> str:
    """Client input quoted in a message, cut to `limit` characters: an error never
    echoes a 100 KB model name back whole."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"… ({len(text)} characters)"


def retry_headers(seconds: float) -> dict[str, str]:
    """Both retry headers, capped at 60 s (the openai SDK honours up to 120 s, Cline 429 only)."""
    whole = math.ceil(min(60.0, max(1.0, seconds)))
    return {"Retry-After": str(whole), "retry-after-ms": str(whole * 1000)}

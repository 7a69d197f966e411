"""Which model a request names, and the body the engine receives.

The body is read whole and decoded once (JSON from bytes), so multi-byte characters
split across network chunks arrive intact. It is re-encoded only when the model name
must change; otherwise the client's bytes go upstream untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ApiError

# Endpoints that name their model in the body (SPEC section 4); the path form
# /v1/<model>/<endpoint> accepts the same endpoints.
MODEL_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/score",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
)
# What a model must declare in `capabilities` to be sent each endpoint (none: any model).
# Checked before a ticket is taken, so a request no engine of that model can serve
# never loads it.
ENDPOINT_CAPABILITY = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/messages/count_tokens": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/v1/score": "rerank",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "transcription",
}
_PATH_FORM_SUFFIXES = (
    *(e.removeprefix("/v1/") for e in MODEL_ENDPOINTS if e.startswith("/v1/")),
    "tokenize",
    "detokenize",
)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


@dataclass
class ModelRequest:
    name: str | None
    payload: dict[str, Any] | None  # the JSON body, when it is JSON
    body: bytes
    multipart_boundary: bytes | None = None
    reshaped: bool = False  # request shaping replaced the payload: re-encode it

    @property
    def streaming(self) -> bool:
        return bool(self.payload and self.payload.get("stream") is True)

    def replace_payload(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.reshaped = True

    def with_model(self, served_name: str) -> bytes:
        """The body with `model` set to what the engine serves (unchanged if it already is)."""
        if self.name == served_name and not self.reshaped:
            return self.body
        if self.payload is not None:
            self.payload["model"] = served_name
            try:
                return json.dumps(self.payload, ensure_ascii=False,
                                  separators=(",", ":")).encode()
            except RecursionError as e:
                raise ApiError(400, "the body is nested too deeply to be a request",
                               "invalid_json") from e
        if self.multipart_boundary is not None:
            return _multipart_set_model(self.body, self.multipart_boundary, served_name)
        return self.body


def parse_body(body: bytes, content_type: str) -> ModelRequest:
    ctype = content_type.lower()
    if ctype.startswith("multipart/form-data"):
        m = _BOUNDARY.search(content_type)
        if not m:
            raise ApiError(400, "multipart body without a boundary", "invalid_body")
        boundary = m.group(1).encode()
        return ModelRequest(_multipart_model(body, boundary), None, body, boundary)
    if not body:
        return ModelRequest(None, None, body)
    try:
        payload = json.loads(body)
    except RecursionError as e:
        raise ApiError(400, "the body is nested too deeply to be a request",
                       "invalid_json") from e
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8: {e}", "invalid_body") from e
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "invalid_model")
    return ModelRequest(model or None, payload, body)


def split_path_form(tail: str, is_model: Any) -> tuple[str, str] | None:
    """`<model>/<endpoint>` → (model, endpoint path); model ids may contain '/' (aliases)."""
    for suffix in _PATH_FORM_SUFFIXES:
        if tail.endswith("/" + suffix):
            name = tail[: -len(suffix) - 1]
            if name and is_model(name):
                return name, ("/" + suffix if suffix in ("tokenize", "detokenize")
                              else "/v1/" + suffix)
    return None


def _parts(body: bytes, boundary: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, headers) of each part's content."""
    delim = b"--" + boundary
    out = []
    pos = body.find(delim)
    while pos != -1:
        start = pos + len(delim)
        if body[start:start + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", start)
        nxt = body.find(b"\r\n" + delim, head_end)
        if head_end == -1 or nxt == -1:
            break
        out.append((head_end + 4, nxt, body[start:head_end]))
        pos = nxt + 2
    return out


def _is_model_part(headers: bytes) -> bool:
    return re.search(rb'content-disposition:[^\r\n]*\bname="model"', headers, re.I) is not None


def _multipart_model(body: bytes, boundary: bytes) -> str | None:
    for start, end, headers in _parts(body, boundary):
        if _is_model_part(headers):
            try:
                return body[start:end].decode("utf-8").strip() or None
            except UnicodeDecodeError:
                return None
    return None


def _multipart_set_model(body: bytes, boundary: bytes, model: str) -> bytes:
    for start, end, headers in _parts(body, boundary):
        if _is_model_part(headers):
            return body[:start] + model.encode() + body[end:]
    return body

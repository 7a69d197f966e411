"""API keys: who may call, and which models a key may use. Keys are never logged."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from ..config import ApiKey, Config
from ..errors import ApiError


@dataclass(frozen=True)
class Caller:
    name: str
    models: frozenset[str] | None  # None: every model
    admin: bool


class Keyring:
    def __init__(self, config: Config, extra_keys: Sequence[str] = ()) -> None:
        s = config.settings
        self._keys: list[tuple[bytes, Caller]] = []
        admin_open = not s.admin_keys  # without admin keys, any valid key may manage models
        for i, k in enumerate([*s.api_keys, *extra_keys]):
            entry = k if isinstance(k, ApiKey) else ApiKey(key=k, name=f"key{i + 1}")
            models = None if "*" in entry.models else frozenset(
                m for name in entry.models if (m := _resolve(config, name)))
            self._keys.append((entry.key.encode(), Caller(entry.name, models, admin_open)))
        for i, k in enumerate(s.admin_keys):
            self._keys.append((k.encode(), Caller(f"admin{i + 1}", None, True)))

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, request: web.Request) -> Caller:
        presented = _presented_key(request)
        if presented is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>' or "
                           "'x-api-key: <key>'", "missing_api_key")
        given = presented.encode()
        found: Caller | None = None
        for key, caller in self._keys:  # every key compared, in constant time each
            if hmac.compare_digest(key, given) and found is None:
                found = caller
        if found is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        return found

    @staticmethod
    def authorize(caller: Caller, model_id: str) -> None:
        if caller.models is not None and model_id not in caller.models:
            raise ApiError(403, f"this API key may not use model {model_id!r}",
                           "model_not_allowed")

    @staticmethod
    def require_admin(caller: Caller) -> None:
        if not caller.admin:
            raise ApiError(403, "this endpoint needs an admin key (admin_keys)", "admin_required")


def _resolve(config: Config, name: str) -> str | None:
    model = config.resolve(name)
    return model.id if model else None


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None

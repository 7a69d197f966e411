"""API keys: who may call, which models a key may use, and how much.

Every route but `Keyring.public_paths` needs a key: the rule is a middleware, so a route
added later is covered without asking. A request's caller is `request[CALLER]` (its
`name`, never its key, is what logs and telemetry record). Keys are never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import ApiKey, Config
from ..errors import ApiError
from .limits import KeyLimits

log = logging.getLogger("sparkstack.gateway")

PUBLIC_PATHS = frozenset({"/healthz"})  # liveness probes carry no key


@dataclass(frozen=True)
class Caller:
    name: str
    models: frozenset[str] | None  # None: every model
    admin: bool
    max_concurrent: int | None = None  # in-flight requests (gateway/limits.py)
    rpm: int | None = None  # requests per minute


CALLER = web.RequestKey("caller", Caller)


class Keyring:
    def __init__(self, config: Config, extra_keys: Sequence[str] = ()) -> None:
        self._extra = list(extra_keys)
        self._keys: list[tuple[bytes, Caller]] = []
        self.limits = KeyLimits()
        # Paths served without a key: PUBLIC_PATHS, and what the app adds (the dashboard's
        # page and files, /metrics with metrics_public).
        self.public_paths: set[str] = set(PUBLIC_PATHS)
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take the keys of `config` (at start, and on a config reload)."""
        s = config.settings
        self._keys = []
        admin_open = not s.admin_keys  # without admin keys, any valid key may manage models
        for i, k in enumerate([*s.api_keys, *self._extra]):
            entry = k if isinstance(k, ApiKey) else ApiKey(key=k, name=f"key{i + 1}")
            assert entry.key is not None  # load_config read key_file / key_env
            models = None if "*" in entry.models else frozenset(
                m for name in entry.models if (m := _resolve(config, name)))
            self._keys.append((entry.key.encode(), Caller(
                entry.name or f"key{i + 1}", models, admin_open, entry.max_concurrent,
                entry.rpm)))
        for i, k in enumerate(s.admin_keys):
            self._keys.append((k.encode(), Caller(f"admin{i + 1}", None, True)))

    def __len__(self) -> int:
        return len(self._keys)

    def secrets(self) -> list[str]:
        """Every key, for the log redaction (sparkstack/redact.py)."""
        return [k.decode() for k, _ in self._keys]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A key for every route but `public_paths`; an admin key (when `admin_keys` is
        set) for every state-changing `/api/` route. Before routing: an unknown path
        without a key is a 401, so strangers learn nothing about our routes."""
        if request.path in self.public_paths:
            return await handler(request)
        caller = self.authenticate(request)
        request[CALLER] = caller
        if request.method not in ("GET", "HEAD") and request.path.startswith("/api/"):
            self.require_admin(caller)
        return await handler(request)

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
            log.debug("refused an invalid API key from %s", request.remote)
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

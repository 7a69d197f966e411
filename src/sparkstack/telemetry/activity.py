"""The activity record: one row per proxied request, in SQLite in the data directory.

Rows arrive from the event bus and are written in batches by one worker thread (never
on the event loop); reads go through the same thread, after the pending rows, so a
request is visible as soon as it has finished. The table is bounded by rows and by age.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .events import Event, RequestFinished

log = logging.getLogger("sparkstack.activity")

FILE = "activity.sqlite3"
COLUMNS = ("ts", "model", "endpoint", "status", "key", "stream", "prompt_tokens",
           "completion_tokens", "ttft_s", "tokens_per_s", "duration_s", "queue_s", "error")
FLUSH_S = 0.5
PRUNE_EVERY = 500  # rows written between two prunes
# Bound parameters per statement: sqlite allows 32,766 since 3.32, 999 before.
ROWS_PER_INSERT = (32766 if sqlite3.sqlite_version_info >= (3, 32) else 999) // len(COLUMNS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
    key TEXT, stream INTEGER NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
    ttft_s REAL, tokens_per_s REAL, duration_s REAL NOT NULL, queue_s REAL, error TEXT);
CREATE INDEX IF NOT EXISTS activity_ts ON activity (ts);
CREATE INDEX IF NOT EXISTS activity_model_ts ON activity (model, ts);
"""


@functools.lru_cache(maxsize=64)
def _insert(rows: int) -> str:
    marks = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES " + ", ".join([marks] * rows)


def _background() -> None:
    """In the writer's thread: the lowest CPU priority (Linux applies it to the thread).
    The writer is bookkeeping: on a machine with few cores it must not take the CPU from
    the event loop in the middle of requests (docs/performance-history.md)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class ActivityStore:
    def __init__(self, path: Path, max_rows: int = 100_000, max_days: float = 30.0) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_days = max_days
        self._pending: list[tuple[Any, ...]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="activity",
                                        initializer=_background)
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._since_prune = 0

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        self._prune()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self.flush()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ writing

    def on_event(self, event: Event) -> None:
        if not isinstance(event, RequestFinished):
            return
        rec = event.record
        self._pending.append((rec.ts, rec.model, rec.endpoint, rec.status, rec.key,
                              int(rec.stream), rec.prompt_tokens, rec.completion_tokens,
                              rec.ttft_s, rec.tokens_per_s, rec.duration_s, rec.queue_s,
                              rec.error))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_S, self._flush_later)

    def _flush_later(self) -> None:
        self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        self._flusher = None
        rows, self._pending = self._pending, []
        if rows and self._db is not None:
            try:
                await self._run(self._write, rows)
            except sqlite3.Error:
                log.exception("could not record %d requests in %s", len(rows), self.path)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """One INSERT per ROWS_PER_INSERT rows, not one per row: sqlite releases the GIL
        around each statement it runs, and each time this thread takes it back from a busy
        event loop, the loop is interrupted (executemany did that ~2,000 times a second at
        full load, and showed in the gateway's latency, docs/performance-history.md)."""
        assert self._db is not None
        with self._db:
            for i in range(0, len(rows), ROWS_PER_INSERT):
                chunk = rows[i:i + ROWS_PER_INSERT]
                self._db.execute(_insert(len(chunk)), [v for row in chunk for v in row])
        self._since_prune += len(rows)
        if self._since_prune >= PRUNE_EVERY:
            self._prune()

    def _prune(self) -> None:
        assert self._db is not None
        self._since_prune = 0
        with self._db:
            self._db.execute("DELETE FROM activity WHERE ts < ?",
                             (time.time() - self.max_days * 86400,))
            self._db.execute("DELETE FROM activity WHERE id <= "
                             "(SELECT MAX(id) FROM activity) - ?", (self.max_rows,))

    # ------------------------------------------------------------ reading

    async def query(self, model: str | None = None, limit: int = 100,
                    before: float | None = None) -> list[dict[str, Any]]:
        """The newest records first (of one model; older than `before`, a Unix time)."""
        await self.flush()
        if self._db is None:
            return []
        return await self._run(self._query, model, limit, before)

    def _query(self, model: str | None, limit: int,
               before: float | None) -> list[dict[str, Any]]:
        assert self._db is not None
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if before is not None:
            where.append("ts < ?")
            args.append(before)
        sql = (f"SELECT id, {', '.join(COLUMNS)} FROM activity"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY ts DESC, id DESC LIMIT ?")
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        out = []
        for row in rows:
            d = dict(zip(("id", *COLUMNS), row, strict=True))
            d["stream"] = bool(d["stream"])
            out.append(d)
        return out

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

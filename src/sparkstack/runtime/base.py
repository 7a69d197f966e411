"""What every runtime offers: start an engine, watch it, stop it, and keep its log."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import Model
from ..redact import redact
from ..scheduler.refusal import Reason

LOG_ROTATE_BYTES = 10 * 1024 * 1024


class StartError(Exception):
    """The engine could not be launched at all (bad command, missing image...)."""

    def __init__(self, message: str, reason: Reason = Reason.START_FAILED):
        super().__init__(message)
        self.reason = reason


def describe_exit(code: int) -> str:
    """`exited with code 1`, `was killed by SIGILL (illegal instruction)`; a container's
    128+N is the signal N that killed its main process."""
    sig = -code if code < 0 else code - 128 if 128 < code < 160 else 0
    if not sig:
        return f"exited with code {code}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        return f"exited with code {code}"
    what = signal.strsignal(sig) or ""
    where = f" (exit code {code})" if code > 0 else ""
    return f"was killed by {name} ({what.lower()}){where}"


@dataclass(frozen=True)
class LaunchSpec:
    """A concrete engine to run: what the engine template made of a catalog entry."""

    model: Model
    argv: Sequence[str]
    env: Mapping[str, str]
    port: int
    key: str | None = None  # the run's internal API key, if the engine takes one
    cwd: Path | None = None
    identity: str = ""  # hash of everything but port and key: a container is re-used on match


class Engine(Protocol):
    """One running engine (a process or a container)."""

    @property
    def description(self) -> str: ...

    @property
    def port(self) -> int:
        """Where it listens (a re-used container keeps the port it was created with)."""
        ...

    @property
    def key(self) -> str | None:
        """Its internal API key (likewise kept by a re-used container)."""
        ...

    async def wait(self) -> int:
        """Return the exit code once the engine has exited."""
        ...

    async def stop(self, grace: float) -> None:
        """Ask it to stop (SIGTERM); kill it after `grace` seconds. Returns once it is gone."""
        ...


class Runtime(Protocol):
    async def start(self, spec: LaunchSpec, log: LogBuffer) -> Engine: ...

    async def close(self) -> None: ...


def port_is_free(port: int) -> bool:
    """Nobody listens on it (connections of an earlier run in TIME_WAIT do not count:
    servers bind with SO_REUSEADDR, and so does this check)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(avoid: Set[int] = frozenset()) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


@dataclass
class LogBuffer:
    """The last lines an engine printed, mirrored to a per-model log file.

    Followers (the logs API in follow mode) read new lines through `follow()`, each
    from a bounded queue: a reader that does not keep up loses the oldest lines, never
    holds memory without bound.
    """

    path: Path | None = None
    max_lines: int = 2000
    lines: deque[str] = field(init=False)
    followers: set[asyncio.Queue[str | None]] = field(default_factory=set)
    # Called with every line as it is written (load-progress parsing): must be quick.
    listeners: list[Callable[[str], None]] = field(default_factory=list)
    follow_backlog: int = 1000

    def __post_init__(self) -> None:
        self.lines = deque(maxlen=self.max_lines)
        self._file = None

    def begin_run(self, header: str) -> None:
        """Start a new engine run: rotate a large file and mark the run in the log."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > LOG_ROTATE_BYTES:
                self.close()
                self.path.replace(self.path.with_suffix(".log.1"))
            if self._file is None:
                self._file = self.path.open("a", encoding="utf-8", buffering=1)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.write(f"----- {stamp} {header}")

    def write(self, line: str) -> None:
        # Engines print their arguments (SGLang all, vLLM the non-default ones), the
        # internal key among them; this log is served to clients (logs API, errors).
        line = redact(line.rstrip("\r\n"))
        self.lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
        for fn in self.listeners:
            fn(line)
        for q in self.followers:
            if q.full():
                q.get_nowait()
            q.put_nowait(line)

    async def follow(self) -> AsyncIterator[str]:
        """Every line written from now on, until the caller stops iterating."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(self.follow_backlog)
        self.followers.add(queue)
        try:
            while (line := await queue.get()) is not None:
                yield line
        finally:
            self.followers.discard(queue)

    def end_followers(self) -> None:
        """The stack is shutting down: followers stop (they must not hold the exit)."""
        for q in self.followers:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    def tail(self, n: int = 20) -> list[str]:
        return list(self.lines)[-n:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""The process runtime: an engine is a local command in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys

from .base import LaunchSpec, LogBuffer, StartError

_PR_SET_PDEATHSIG = 1
# "\r\n", "\n", or a "\r" that is not the last byte read (it may start a "\r\n").
_LINE_END = re.compile(rb"\r\n|\n|\r(?=[\s\S])")
_MAX_LINE = 1024 * 1024


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the gateway dies without cleaning up (e.g. SIGKILL)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessEngine:
    def __init__(self, proc: asyncio.subprocess.Process, spec: LaunchSpec, log: LogBuffer):
        self.proc = proc
        self.port = spec.port
        self.key = spec.key
        self._reader = asyncio.create_task(self._pump(log))

    @property
    def description(self) -> str:
        return f"pid {self.proc.pid}"

    async def _pump(self, log: LogBuffer) -> None:
        stream = self.proc.stdout
        assert stream is not None
        pending = b""
        while True:
            data = await stream.read(65536)
            if not data:
                if pending:
                    log.write(pending.decode("utf-8", errors="replace"))
                return
            pending += data
            # A progress bar (tqdm) rewrites its line after "\r": each update is a line
            # here, so load progress is seen as it happens, not when the bar completes.
            *lines, pending = _LINE_END.split(pending)
            if len(pending) > _MAX_LINE:  # a line without end: take it in pieces
                lines.append(pending)
                pending = b""
            for line in lines:
                log.write(line.decode("utf-8", errors="replace"))

    async def wait(self) -> int:
        code = await self.proc.wait()
        # Let the last lines reach the log before anyone reads its tail.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        return code

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, grace: float) -> None:
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
                await self.proc.wait()
        # Children the engine left behind in its group go too.
        self._signal_group(signal.SIGKILL)


class ProcessRuntime:
    async def start(self, spec: LaunchSpec, log: LogBuffer) -> ProcessEngine:
        argv = list(spec.argv)
        env = {**os.environ, **spec.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                limit=1024 * 1024,
            )
        except OSError as e:
            raise StartError(f"cannot run {argv[0]!r}: {e.strerror or e}") from e
        shown = " ".join(a.replace(spec.key, "***") if spec.key else a for a in argv)
        log.write(f"started {shown} (pid {proc.pid})")
        return ProcessEngine(proc, spec, log)

    async def close(self) -> None:
        return None

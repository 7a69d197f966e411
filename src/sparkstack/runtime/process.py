"""The process runtime: an engine is a local command in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys

from .base import LaunchSpec, LogBuffer, StartError

_PR_SET_PDEATHSIG = 1


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
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the buffer: take it in pieces
                line = await stream.read(65536)
            if not line:
                return
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

"""The process runtime: an engine is a local command in its own process group.

An engine gets SIGTERM when the gateway dies without cleaning up (`PR_SET_PDEATHSIG`),
which stops a well-behaved one. What that cannot stop (an engine that ignores SIGTERM, a
wrapper script's children, which never get the signal) is found at the next start: each
running engine's process group is recorded in the data directory, and the next gateway
stops the groups its dead predecessor left, before it starts anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from .base import LaunchSpec, LogBuffer, StartError

log = logging.getLogger("sparkstack.runtime")
ENGINES_DIR = "engines"  # in the data directory: one record per running engine

_PR_SET_PDEATHSIG = 1
# "\r\n", "\n", or a "\r" that is not the last byte read (it may start a "\r\n").
_LINE_END = re.compile(rb"\r\n|\n|\r(?=[\s\S])")
_MAX_LINE = 1024 * 1024


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the gateway dies without cleaning up (e.g. SIGKILL)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot): tells a pid from its reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


class ProcessEngine:
    def __init__(self, proc: asyncio.subprocess.Process, spec: LaunchSpec, log: LogBuffer,
                 record: Path | None = None):
        self.proc = proc
        self.port = spec.port
        self.key = spec.key
        self._record = record
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
        if self._record is not None:
            self._record.unlink(missing_ok=True)


class ProcessRuntime:
    def __init__(self, state_dir: Path | None = None) -> None:
        """`state_dir`: where running engines are recorded (None: not recorded)."""
        self.state_dir = state_dir

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
        return ProcessEngine(proc, spec, log, self._note(proc.pid, spec))

    def _note(self, pid: int, spec: LaunchSpec) -> Path | None:
        """Record a started engine's group, for the next gateway if this one is killed."""
        if self.state_dir is None:
            return None
        me = os.getpid()
        record = {"model": spec.model.id, "pgid": pid, "started": start_ticks(pid),
                  "gateway": me, "gateway_started": start_ticks(me),
                  "grace": spec.model.cfg.stop_timeout}
        path = self.state_dir / f"{pid}.json"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
        except OSError as e:
            log.warning("cannot record engine %s (pid %d) in %s: %s", spec.model.id, pid,
                        self.state_dir, e)
            return None
        return path

    async def stop_leftovers(self) -> list[str]:
        """Stop the engine groups a gateway that died left running (SIGTERM, then SIGKILL
        after the model's stop_timeout); the models they ran. Groups of a gateway that
        still runs (another one on this data directory) are left alone."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        stopped = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                pgid, grace = int(rec["pgid"]), float(rec["grace"])
                owner, model = int(rec["gateway"]), str(rec["model"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if owner != os.getpid() and start_ticks(owner) == rec.get("gateway_started"):
                continue  # its gateway is alive
            leader = start_ticks(pgid)
            # A live leader that started at another time is a new process on a reused
            # pid: the group is not ours. (A dead leader's pid is not reused while its
            # group has members.)
            if (leader is None or leader == rec.get("started")) and group_members(pgid):
                await _stop_group(pgid, grace)
                stopped.append(model)
            path.unlink(missing_ok=True)
        if stopped:
            log.warning("stopped engines left running by a gateway that did not shut down "
                        "cleanly: %s", ", ".join(stopped))
        return stopped

    async def close(self) -> None:
        return None


async def _stop_group(pgid: int, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not group_members(pgid):
            return

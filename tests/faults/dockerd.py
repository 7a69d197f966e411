"""Stopping, killing and starting the machine's Docker daemon, the way
scripts/system-deps.sh starts it (`dockerd --bridge=none --iptables=false`, output to
/tmp/sparkstack-dockerd.log), for the daemon fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

DOCKERD = ["dockerd", "--bridge=none", "--iptables=false"]
LOG = Path("/tmp/sparkstack-dockerd.log")
PID_FILE = Path("/var/run/docker.pid")
CONTAINERD_PID_FILE = Path("/var/run/docker/containerd/containerd.pid")
_started: list[subprocess.Popen[bytes]] = []  # daemons we started (reaped once they exit)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed daemon may wait a while to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def daemon_pid(pid_file: Path = PID_FILE) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid) else None


def answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


async def stop(sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> None:
    """SIGTERM: a clean daemon stop (it stops the containers first); SIGKILL: a crash
    (the containers live on in their shims until the next daemon start)."""
    pid = daemon_pid()
    assert pid is not None, "no Docker daemon runs"
    os.kill(pid, sig)
    async with asyncio.timeout(timeout):
        while _running(pid):
            for daemon in _started:
                daemon.poll()  # a daemon we started is our child: reap it
            await asyncio.sleep(0.05)


async def start(timeout: float = 60) -> None:
    """Start the daemon as scripts/system-deps.sh does; return once `docker info` answers."""
    if daemon_pid() is None:
        # The pid files of a daemon (and of its containerd) that died, or are zombies not
        # yet reaped, make the next daemon refuse to start or wait for a dead containerd.
        for pid_file in (PID_FILE, CONTAINERD_PID_FILE):
            if daemon_pid(pid_file) is None:
                with contextlib.suppress(FileNotFoundError):
                    pid_file.unlink()
        with LOG.open("ab") as log:
            _started.append(subprocess.Popen(
                DOCKERD, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(answers):
            await asyncio.sleep(0.2)


async def restart(sig: signal.Signals = signal.SIGTERM) -> None:
    await stop(sig)
    await start()

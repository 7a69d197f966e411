"""Helpers of the fault tests: talk to a gateway and to its engines, and check what runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import Gateway, pid_alive, pids


async def chat(gw: Gateway, model: str, headers: dict[str, str] | None = None,
               **body: Any) -> tuple[int, Any]:
    """A non-streamed chat: status and the JSON body (the text if it is not JSON)."""
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=payload,
                            headers=headers) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def stream(gw: Gateway, model: str, headers: dict[str, str] | None = None,
                 **body: Any) -> tuple[int, list[str]]:
    """A streamed chat read to its end: status and every non-empty line."""
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}],
               "stream": True, **body}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=payload,
                            headers=headers) as resp:
        lines = [ln for ln in (await resp.text()).splitlines() if ln.strip()]
        return resp.status, lines


def last_event(lines: list[str]) -> dict[str, Any]:
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data, lines
    event: dict[str, Any] = json.loads(data[-1].removeprefix("data: "))
    return event


def tokens(lines: list[str]) -> str:
    """The text a streamed chat delivered."""
    out = []
    for ln in lines:
        if ln.startswith("data: {"):
            for choice in json.loads(ln.removeprefix("data: ")).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


async def engine(port: int, path: str, method: str = "GET") -> dict[str, Any]:
    """Ask a fake engine directly (its /stats, /release)."""
    async with aiohttp.ClientSession() as s, s.request(
            method, f"http://127.0.0.1:{port}{path}") as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def release(port: int, gate: str = "default") -> None:
    await engine(port, f"/release?gate={gate}", "POST")


async def until_engine(port: int, key: str, value: int, timeout: float = 20) -> dict[str, Any]:
    """Wait until the engine's /stats shows `key == value` (its counters change when the
    gateway closes a connection: an event in another process, observed by polling)."""
    async with asyncio.timeout(timeout):
        while True:
            stats = await engine(port, "/stats")
            if stats[key] == value:
                return stats
            await asyncio.sleep(0.05)


def alive(starts: Path) -> list[int]:
    return [p for p in pids(starts) if pid_alive(p)]


async def until_dead(pid_list: list[int], timeout: float = 20) -> None:
    """Processes that must go (killed by a parent's death, say): wait for them, bounded."""
    async with asyncio.timeout(timeout):
        while any(pid_alive(p) for p in pid_list):
            await asyncio.sleep(0.05)

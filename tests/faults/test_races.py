"""Races, for real: requests, TTL stops, loads and unloads interleaved on a live gateway
with fake-engine processes. Randomised runs are seeded (FAULT_SEED overrides the seed;
a failure names it) and check the scheduler's invariants as they go."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from sparkstack.scheduler import State

from ..conftest import Gateway, fake, pid_alive, pids
from .common import alive, chat, last_event, stream, tokens

SEED = int(os.environ.get("FAULT_SEED", "20261128"))


def models(tmp_path: Path, names: list[str], *args: str, **fields: object) -> str:
    extra = "".join(f"\n      {k}: {v}" for k, v in fields.items())
    return "".join(f"""
    {m}:
      command: {fake("--served-name", m, *args, starts=tmp_path / f"{m}.starts")}
      memory_gb: 5
      aliases: [{m}-alias]{extra}
    """ for m in names)


def check(gw: Gateway) -> None:
    """The scheduler's own invariants, and the processes agreeing with them: never more
    engines alive than the budget holds."""
    sched = gw.supervisor.scheduler
    sched.check_invariants()
    running = [m for m in sched.models if alive(gw.tmp_path / f"{m}.starts")]
    held = sum(sched.models[m].memory_gb for m in running)
    assert held <= sched.budget_gb, f"engines alive for {running}: {held} GB"


async def watch(gw: Gateway, seen: list[int]) -> None:
    """Check on every scheduler change until cancelled."""
    while True:
        await gw.supervisor.wait_changed()
        check(gw)
        seen[0] += 1


@pytest.fixture
def seeded() -> random.Random:
    return random.Random(SEED)


async def start(start_gateway, tmp_path: Path, yaml: str, **settings: str) -> Gateway:
    gw: Gateway = await start_gateway(yaml, **settings)
    gw.tmp_path = tmp_path  # type: ignore[attr-defined]
    return gw


async def test_ttl_stop_racing_new_requests(start_gateway, tmp_path, seeded):
    gw = await start(start_gateway, tmp_path, models(tmp_path, ["a"], ttl="0.25s"),
                     memory_gb=5)
    seen = [0]
    watcher = asyncio.create_task(watch(gw, seen))
    try:
        # Deterministic: a request that arrives while the TTL stop is under way.
        assert (await chat(gw, "a"))[0] == 200
        await gw.until_state("a", State.STOPPING, timeout=10)
        status, body = await chat(gw, "a")
        assert status == 200, f"seed {SEED}: {body}"
        # Randomised: requests land just before, at and after the idle deadline.
        for i in range(12):
            await asyncio.sleep(seeded.uniform(0.15, 0.35))
            status, body = await (chat(gw, "a-alias") if i % 2 else chat(gw, "a"))
            assert status == 200, f"seed {SEED}, request {i}: {body}"
            check(gw)
    finally:
        watcher.cancel()
    assert seen[0] > 0, "the watcher saw the changes"
    started = pids(tmp_path / "a.starts")
    assert len(started) >= 2 and len(alive(tmp_path / "a.starts")) <= 1
    status, lines = await stream(gw, "a")
    assert lines[-1] == "data: [DONE]"


async def test_unload_racing_load_and_requests(start_gateway, tmp_path, seeded):
    gw = await start(start_gateway, tmp_path, models(tmp_path, ["a"]), memory_gb=5)
    seen = [0]
    watcher = asyncio.create_task(watch(gw, seen))
    outcomes: Counter[str] = Counter()

    async def op(kind: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if kind == "load":
            async with gw.http.post(gw.url + "/api/models/a/load") as resp:
                assert resp.status == 200, await resp.text()
        elif kind == "unload":
            async with gw.http.post(gw.url + "/api/models/a/unload") as resp:
                assert resp.status == 200, await resp.text()
        elif kind == "chat":
            status, body = await chat(gw, "a")
            assert status == 200, body
        else:
            status, lines = await stream(gw, "a")
            assert status == 200 and lines[-1] == "data: [DONE]", lines
        outcomes[kind] += 1
        check(gw)

    try:
        for _ in range(4):
            kinds = seeded.choices(["load", "unload", "chat", "stream"], k=12)
            await asyncio.gather(*(op(k, seeded.uniform(0, 0.3)) for k in kinds))
    except AssertionError as e:
        raise AssertionError(f"seed {SEED}: {e}") from e
    finally:
        watcher.cancel()
    assert sum(outcomes.values()) == 48
    assert gw.state("a").state in (State.READY, State.STOPPED)
    assert len(alive(tmp_path / "a.starts")) == (gw.state("a").state is State.READY)
    assert (await chat(gw, "a"))[0] == 200


async def test_alias_and_id_at_once_start_one_engine(start_gateway, tmp_path):
    gw = await start(start_gateway, tmp_path, models(tmp_path, ["a"], "--start-delay", "0.3"),
                     memory_gb=5)
    results = await asyncio.gather(*(chat(gw, name) for name in ["a", "a-alias"] * 10),
                                   *(stream(gw, name) for name in ["a-alias", "a"] * 3))
    assert all(status == 200 for status, _ in results)
    assert all(lines[-1] == "data: [DONE]" for _, lines in results[20:])
    assert len(pids(tmp_path / "a.starts")) == 1, "one engine for the id and its alias"
    # Again while it stops: the waiters by either name share the next start.
    unloading = asyncio.create_task(gw.supervisor.unload("a"))
    await gw.until_state("a", State.STOPPING)
    results = await asyncio.gather(*(chat(gw, name) for name in ["a-alias", "a"] * 5))
    await unloading
    assert all(status == 200 for status, _ in results)
    assert len(pids(tmp_path / "a.starts")) == 2 and len(alive(tmp_path / "a.starts")) == 1


async def test_200_random_requests_over_5_models_with_room_for_2(start_gateway, tmp_path,
                                                                 seeded):
    names = [f"m{i}" for i in range(5)]
    # min_residency 0: a fresh load may be evicted at once (by default it serves a while
    # first, and every swap here would wait for that). Races need swaps, not waits.
    gw = await start(start_gateway, tmp_path, models(tmp_path, names, "--tokens", "3"),
                     memory_gb=10, min_residency="0s")
    seen = [0]
    watcher = asyncio.create_task(watch(gw, seen))
    in_flight = asyncio.Semaphore(12)
    weights = [5, 3, 2, 1, 1]  # some models asked for more than others, as in real use
    done: Counter[str] = Counter()

    async def one(i: int, name: str, streamed: bool, gone: bool) -> None:
        async with in_flight:
            alias = name + "-alias" if i % 3 == 0 else name
            if gone:  # the client gives up while its model may still be loading
                task = asyncio.create_task(chat(gw, alias))
                await asyncio.sleep(seeded.uniform(0, 0.2))
                task.cancel()
                done["gone"] += 1
            elif streamed:
                status, lines = await stream(gw, alias)
                assert status == 200 and lines[-1] == "data: [DONE]", (i, lines)
                assert tokens(lines) == "tok0 tok1 tok2 ", (i, lines, last_event(lines))
                done["stream"] += 1
            else:
                status, body = await chat(gw, alias)
                assert status == 200 and body["model"] == name, (i, body)
                done["chat"] += 1
        check(gw)

    tasks = []
    try:
        for i in range(200):
            name = seeded.choices(names, weights)[0]
            tasks.append(asyncio.create_task(
                one(i, name, seeded.random() < 0.5, seeded.random() < 0.05)))
            await asyncio.sleep(seeded.expovariate(1 / 0.02))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"seed {SEED}: {len(failures)} failed, first: {failures[0]!r}"
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()
    assert sum(done.values()) == 200 and seen[0] > 200
    starts = {m: len(pids(tmp_path / f"{m}.starts")) for m in names}
    assert sum(starts.values()) >= 10, f"models were swapped: {starts}"
    running = [m for m in names if alive(tmp_path / f"{m}.starts")]
    assert len(running) <= 2 and gw.supervisor.scheduler.queued == 0
    assert all(pid_alive(p) is False for m in names if m not in running
               for p in pids(tmp_path / f"{m}.starts"))
    for m in names:  # nothing wedged: every model still serves
        assert (await chat(gw, m))[0] == 200

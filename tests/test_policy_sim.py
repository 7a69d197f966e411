"""A smoke run of the policy simulator (bench/policy, `make bench-policy`): one day of the
mixed trace through every policy, the real scheduler underneath, figures that make sense
and the fairness bound held."""

from __future__ import annotations

import pytest
from bench.policy.models import catalog_models
from bench.policy.peers import POLICIES, ours
from bench.policy.run import fairness_bound
from bench.policy.sim import Simulation, simulate
from bench.policy.traces import Request, generate, read_csv, write_csv


@pytest.fixture(scope="module")
def models():
    return catalog_models()


@pytest.fixture(scope="module")
def day():
    return generate("mixed", days=1)


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: s.name)
def test_a_day_of_the_mixed_trace_replays_through_every_policy(spec, models, day):
    f = simulate(day, spec, models)
    assert f["requests"] == len(day) > 500
    assert f["failed"] == 0 or spec.name == "original"  # its refusals can outlast a client
    assert 0 <= f["wait_p50"] <= f["wait_p95"] <= f["wait_p99"] <= f["wait_max"]
    assert f["wait_total_h"] * 3600 >= f["wait_max"]
    assert 0 <= f["wasted_loads"] <= f["loads"] and f["loads"] >= 2
    assert 0 < f["memory_util"] <= 1
    # The original refuses while another model runs; the rest only after queue_timeout.
    assert f["refusals"] > 0 if spec.name == "original" else f["refusals"] < 0.05 * len(day)
    assert f["sim_hours"] > 20 and f["wall_s"] < 5
    if not spec.peer:
        assert f["passed_over_max"] <= fairness_bound(spec, f)


def test_the_peers_lose_where_their_policy_is_weak(models):
    """Sanity of the comparison: llama-swap (no memory model) reloads the embedding model
    beside the chat model, Ollama's 5 min keep-alive reloads the agent's model between
    tasks."""
    rag, agent = generate("rag", days=2), generate("agent", days=2)
    by = {s.name: s for s in POLICIES}
    assert (simulate(rag, by["llama-swap"], models)["loads"]
            > 2 * simulate(rag, by["sparkstack"], models)["loads"])
    assert (simulate(agent, by["ollama"], models)["wait_total_h"]
            > 2 * simulate(agent, by["sparkstack"], models)["wait_total_h"])


def test_a_session_waits_for_the_answer_before_its_next_request(models):
    """Closed loop: a load delays the answer, so the person's next question (asked 10 s
    after reading it) comes later too."""
    t = 1000.0  # the utility model has started by then
    trace = [Request(t, "gpt-oss-20b", 10, "ann"), Request(t + 20, "glm-4.5-air-fp4", 10, "ann"),
             Request(t + 20.5, "qwen2.5-1.5b-instruct", 1, "ann/tasks")]
    sim = Simulation(trace, ours(), models)
    sim.run()
    first, second, task = sim.reqs
    load = models["gpt-oss-20b"].load_s
    assert first.wait == pytest.approx(load)
    assert second.after is first and second.issued == pytest.approx(t + 20 + load)
    assert task.after is first and task.issued == pytest.approx(t + 20.5 + load)


def test_a_recorded_trace_replays_from_csv(tmp_path, models):
    path = tmp_path / "activity.csv"
    write_csv(path, [Request(100, "gpt-oss-20b", 5), Request(110, "gpt-oss-20b", 5)])
    trace = read_csv(path)
    assert [r.time for r in trace] == [0, 10] and trace[0].session == ""
    f = simulate(trace, ours(), models)
    assert f["requests"] == 2 and f["loads"] >= 1 and f["wait_max"] > 0
    (tmp_path / "bad.csv").write_text("when,model\n1,a\n")
    with pytest.raises(ValueError, match="duration"):
        read_csv(tmp_path / "bad.csv")


def test_titles_beside_the_exclusive_model_are_answered_by_it(models):
    """A conversation with gpt-oss-120b (it runs alone) and a title request after each
    answer: with the catalog's `stand_ins: any` on the utility model, the 120b answers the
    titles and loads once; without stand-ins (the peers), each title stops it."""
    big, util = "gpt-oss-120b", "qwen2.5-1.5b-instruct"
    assert models[big].exclusive and models[util].stand_ins == "any"
    t, trace = 1000.0, []
    for _ in range(6):
        trace += [Request(t, big, 20, "dana"), Request(t + 20.2, util, 1.5, "dana/tasks")]
        t += 20 + 60  # a minute of reading and typing between turns
    mine = simulate(trace, ours(), models)
    assert mine["wait_max"] < models[big].load_s + 30, "only the first turn waits for a load"
    by = {s.name: s for s in POLICIES}
    swap = simulate(trace, by["llama-swap"], models)
    assert swap["loads"] >= 6 and swap["wait_total_h"] > 3 * mine["wait_total_h"]

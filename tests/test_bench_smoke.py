"""A smoke run of the benchmark's in-process part, so the harness keeps working as the
scheduler changes (the benchmark itself never runs in `make test`: `make bench`)."""

from __future__ import annotations

from bench.decisions import measure


def test_decision_benchmark_drives_the_real_scheduler():
    result = measure(n_models=60, decisions=30)
    assert result["submit_evict"]["n"] == 30
    assert result["residents_at_end"] > 1

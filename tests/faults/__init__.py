"""Fault injection: every fault injected for real, every answer checked (docs/reliability.md)."""

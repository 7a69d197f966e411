"""Telemetry: memory sampling now; metrics and activity records build on it."""

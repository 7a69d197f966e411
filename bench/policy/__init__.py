"""The scheduling-policy simulator: request traces replayed through the real `Scheduler`
on a fake clock, against simulated engines (no processes), for our policy and its
peers'. `make bench-policy` runs it; docs/scheduling.md reports it."""

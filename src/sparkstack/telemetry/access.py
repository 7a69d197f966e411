"""The access log: one line per proxied request, from the bus's request events.

Off by default (`serve --access-log` turns it on, `--log-level debug` too): a home
server's output should show what changed (starts, stops, failures), not every request.
The line names the API key by its name, never the key.
"""

from __future__ import annotations

import logging

from .events import Event, RequestFinished

log = logging.getLogger("sparkstack.access")


def access_line(event: Event) -> None:
    if not isinstance(event, RequestFinished):
        return
    r = event.record
    parts = [f"{r.status} {r.endpoint} model={r.model}", f"key={r.key or '-'}",
             f"{r.duration_s * 1000:.0f}ms"]
    if r.queue_s:
        parts.append(f"waited={r.queue_s:.1f}s")
    if r.ttft_s is not None:
        parts.append(f"ttft={r.ttft_s * 1000:.0f}ms")
    if r.prompt_tokens is not None or r.completion_tokens is not None:
        parts.append(f"tokens={r.prompt_tokens or 0}+{r.completion_tokens or 0}")
    if r.tokens_per_s:
        parts.append(f"{r.tokens_per_s:.1f}tok/s")
    if r.error:
        parts.append(f"error={r.error[:200]!r}")
    log.info("%s", " ".join(parts))

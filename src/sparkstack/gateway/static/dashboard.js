// The sparkstack dashboard: live from /api/events (fetch streaming, so the key travels in
// the Authorization header, never in a URL). No build step, no dependencies.
"use strict";

const KEY_STORE = "sparkstack.key";
const THEME_STORE = "sparkstack.theme";
const ACTIVITY_ROWS = 100;
const LOG_LINES = 4000;

const state = {
  models: new Map(), // id -> the model's view (as /api/models gives it)
  budget: 0,
  queued: 0,
  stream: null, // AbortController of the event stream
  logs: null, // AbortController of the followed log
};

const $ = (id) => document.getElementById(id);
const el = (tag, { dataset, ...props } = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset || {});
  for (const c of children) node.append(c);
  return node;
};

// ------------------------------------------------------------------ formatting

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "—";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
const ago = (t) => (t ? `${duration(Date.now() / 1000 - t)} ago` : "never");
const gb = (x) => (x == null ? "—" : `${x >= 10 ? x.toFixed(0) : x.toFixed(x >= 1 ? 1 : 2)} GB`);
const secs = (x) => (x == null ? "—" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(2)} s`);

// ------------------------------------------------------------------ the key and the API

function key() { return localStorage.getItem(KEY_STORE) || ""; }

function askKey(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${key()}` };
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    askKey("That key was refused: enter a valid one.");
    throw new Error("unauthorized");
  }
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

// One line: a failed load's log tail is in the model's "last error" below.
function notice(text) { $("notice").textContent = (text || "").split("\n")[0].replace(/\. Last log lines:$/, ""); }

// ------------------------------------------------------------------ models

function displayState(m) {
  if (m.state === "stopped" && m.last_error) return "failed";
  return m.state;
}

function modelRow(m) {
  let row = document.querySelector(`#model-rows tr[data-model="${CSS.escape(m.id)}"]`);
  if (row) return row;
  const cell = (label, cls = "") => el("td", { className: cls, dataset: { label } });
  row = el("tr", { dataset: { model: m.id } });
  const name = cell("Model", "name");
  name.append(el("div", { className: "model-id", textContent: m.id }),
    el("div", { className: "sub", textContent: `${m.engine} · ${m.runtime}` +
      (m.pinned ? " · pinned" : "") + (m.exclusive ? " · exclusive" : "") }));
  const load = el("button", { type: "button", className: "load primary", textContent: "Load" });
  load.setAttribute("aria-label", `Load ${m.id}`);
  load.addEventListener("click", () => act(m.id, "load", load));
  const unload = el("button", { type: "button", className: "unload", textContent: "Unload" });
  unload.setAttribute("aria-label", `Unload ${m.id}`);
  unload.addEventListener("click", () => act(m.id, "unload", unload));
  const logs = el("button", { type: "button", className: "logs-button", textContent: "Logs" });
  logs.setAttribute("aria-label", `Follow the log of ${m.id}`);
  logs.addEventListener("click", () => followLogs(m.id));
  const actions = cell("Actions");
  actions.append(el("div", { className: "actions" }, load, unload, logs));
  row.append(name, cell("State", "state-cell"), cell("Memory", "memcell"),
    cell("In flight", "num in-flight"), cell("Queued", "num queued"), cell("Last used", "last-used"),
    cell("Idle stop", "ttl"), actions);
  const errorRow = el("tr", { className: "error-row", hidden: true, dataset: { errorOf: m.id } });
  errorRow.append(el("td", { colSpan: 8 }));
  $("model-rows").append(row, errorRow);
  return row;
}

function renderModel(m) {
  const row = modelRow(m);
  const shown = displayState(m);
  const stateCell = row.querySelector(".state-cell");
  stateCell.replaceChildren(el("span", { className: `badge state state-${shown}`, textContent: shown }));
  if (m.state === "starting") {
    const elapsed = m.load_started ? Date.now() / 1000 - m.load_started : null;
    const parts = [];
    if (m.load_percent != null) parts.push(`${Math.round(m.load_percent)}%`);
    parts.push(m.load_phase || "starting");
    const bar = el("progress", { max: 100 });
    if (m.load_percent != null) bar.value = m.load_percent;
    else if (m.load_seconds && elapsed != null) bar.value = Math.min(99, (100 * elapsed) / m.load_seconds);
    else bar.removeAttribute("value"); // indeterminate
    bar.setAttribute("aria-label", `load progress of ${m.id}`);
    stateCell.append(bar, el("div", { className: "sub progress-text" }, `${parts.join(" ")} · `,
      el("span", { className: "elapsed", textContent: duration(elapsed) }),
      m.load_seconds ? ` (last load ${duration(m.load_seconds)})` : ""));
  } else if (m.state !== "ready" && m.stop_reason && !m.last_error) {
    stateCell.append(el("div", { className: "sub", textContent: m.stop_reason }));
  } else if (m.state === "ready" && m.load_seconds != null) {
    stateCell.append(el("div", { className: "sub", textContent: `loaded in ${duration(m.load_seconds)}` }));
  }

  const mem = row.querySelector(".memcell");
  const text = [`${gb(m.memory_gb)} declared`];
  if (m.memory_measured_gb != null) text.push(`${gb(m.memory_measured_gb)} measured`);
  mem.replaceChildren(el("div", { textContent: text.join(" · ") }));
  if (m.memory_peak_gb != null && m.memory_gb > 0) {
    const off = (m.memory_peak_gb - m.memory_gb) / m.memory_gb;
    const peak = el("div", { className: "sub", textContent: `peak ${gb(m.memory_peak_gb)}` });
    if (Math.abs(off) > 0.1) {
      peak.append(" · ", el("span", { className: "off",
        textContent: `${Math.round(Math.abs(off) * 100)}% ${off < 0 ? "below" : "above"} the declaration` }));
    }
    mem.append(peak);
  }
  if (state.budget > 0) {
    const mini = el("div", { className: "bar mini" });
    const seg = el("div", { className: "seg" });
    seg.style.width = `${Math.min(100, (100 * m.memory_gb) / state.budget)}%`;
    mini.append(seg);
    if (m.memory_measured_gb != null) {
      const meas = el("div", { className: "measured" });
      meas.style.width = `${Math.min(100, (100 * m.memory_measured_gb) / state.budget)}%`;
      mini.append(meas);
    }
    mini.setAttribute("aria-hidden", "true");
    mem.append(mini);
  }
  row.querySelector(".in-flight").textContent = m.in_flight;
  row.querySelector(".queued").textContent = m.queued;
  renderClock(m, row);

  const loadBtn = row.querySelector("button.load");
  const unloadBtn = row.querySelector("button.unload");
  if (!loadBtn.dataset.busy) loadBtn.disabled = m.state !== "stopped" || m.status === "disabled";
  if (!unloadBtn.dataset.busy) unloadBtn.disabled = m.state === "stopped";

  const errorRow = document.querySelector(`#model-rows tr[data-error-of="${CSS.escape(m.id)}"]`);
  if (m.last_error) {
    const details = el("details", { className: "last-error" },
      el("summary", { textContent: `last error: ${m.last_error.split("\n")[0].slice(0, 160)}` }),
      el("pre", { textContent: m.last_error }));
    errorRow.firstChild.replaceChildren(details);
    errorRow.hidden = false;
  } else {
    errorRow.hidden = true;
  }
}

function renderClock(m, row) {
  row.querySelector(".last-used").textContent = ago(m.last_used);
  let ttl = "—";
  if (m.pinned) ttl = "pinned";
  else if (!m.ttl_s) ttl = "never";
  else if (m.idle_stop_at) ttl = `in ${duration(m.idle_stop_at - Date.now() / 1000)}`;
  else if (m.state === "ready" && m.in_flight) ttl = "busy";
  row.querySelector(".ttl").textContent = ttl;
  const elapsed = row.querySelector(".elapsed");
  if (elapsed && m.load_started) elapsed.textContent = duration(Date.now() / 1000 - m.load_started);
}

function renderMemory() {
  const bar = $("memory-bar");
  bar.replaceChildren();
  let declared = 0;
  let measured = 0;
  const names = [];
  for (const m of state.models.values()) {
    if (m.state === "stopped") continue;
    declared += m.memory_gb;
    measured += m.memory_measured_gb || 0;
    const seg = el("div", { className: `seg ${m.state === "starting" ? "starting" : ""}`,
      title: `${m.id}: ${gb(m.memory_gb)} declared` });
    seg.style.width = `${Math.min(100, (100 * m.memory_gb) / (state.budget || 1))}%`;
    bar.append(seg);
    names.push(m.id);
  }
  if (measured > 0) {
    const line = el("div", { className: "measured", title: `${gb(measured)} measured` });
    line.style.width = `${Math.min(100, (100 * measured) / (state.budget || 1))}%`;
    bar.append(line);
  }
  const label = `memory: ${gb(declared)} declared, ${measured ? gb(measured) : "nothing"} measured, ` +
    `of a ${gb(state.budget)} budget`;
  $("memory").setAttribute("aria-label", label);
  $("memory-legend").replaceChildren(
    el("span", { className: "swatch" }), `${gb(declared)} declared`,
    el("span", { className: "swatch measured" }), `${measured ? gb(measured) : "—"} measured`,
    ` of ${gb(state.budget)}` + (names.length ? ` · ${names.join(", ")}` : ""));
  $("queue-total").textContent = state.queued ? `· ${state.queued} waiting` : "";
}

function renderAll() {
  for (const m of state.models.values()) renderModel(m);
  renderMemory();
}

async function act(id, action, button) {
  button.dataset.busy = "1";
  button.disabled = true;
  const label = button.textContent;
  button.textContent = action === "load" ? "Loading…" : "Unloading…";
  notice("");
  try {
    const resp = await api(`/api/models/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    if (!resp.ok) notice(`${action} ${id}: ${await errorText(resp)}`);
  } catch (e) {
    if (e.message !== "unauthorized") notice(`${action} ${id}: ${e.message}`);
  } finally {
    delete button.dataset.busy;
    button.textContent = label;
    const m = state.models.get(id);
    if (m) renderModel(m);
  }
}

// ------------------------------------------------------------------ activity

function addActivity(r, fresh) {
  const status = el("span", { className: r.status < 400 ? "status-ok" : "status-bad",
    textContent: String(r.status) });
  if (r.error) status.title = r.error;
  const cells = [
    ["Time", new Date(r.ts * 1000).toLocaleTimeString()],
    ["Model", r.model],
    ["Endpoint", r.endpoint + (r.stream ? " (stream)" : "")],
    ["Status", status],
    ["Key", r.key || "—"],
    ["Tokens in → out", `${r.prompt_tokens ?? "—"} → ${r.completion_tokens ?? "—"}`],
    ["TTFT", secs(r.ttft_s)],
    ["Tokens/s", r.tokens_per_s == null ? "—" : r.tokens_per_s.toFixed(1)],
    ["Duration", secs(r.duration_s)],
  ];
  const row = el("tr", { className: fresh ? "new" : "", dataset: { model: r.model } });
  for (const [label, value] of cells) {
    const td = el("td", { dataset: { label } });
    td.append(value);
    if (["TTFT", "Tokens/s", "Duration"].includes(label)) td.className = "num";
    row.append(td);
  }
  if (r.error) row.title = r.error;
  const body = $("activity-rows");
  if (fresh) body.prepend(row); else body.append(row);
  while (body.children.length > ACTIVITY_ROWS) body.lastChild.remove();
}

async function loadActivity() {
  const resp = await api(`/api/activity?limit=50`);
  if (!resp.ok) return;
  const { data } = await resp.json();
  $("activity-rows").replaceChildren();
  for (const r of data) addActivity(r, false);
}

// ------------------------------------------------------------------ the event stream

function handle(kind, data) {
  switch (kind) {
    case "snapshot":
      state.budget = data.memory_budget_gb;
      state.queued = data.queued;
      state.models = new Map(data.models.map((m) => [m.id, m]));
      $("model-rows").replaceChildren();
      renderAll();
      break;
    case "model":
      state.models.set(data.model.id, data.model);
      renderModel(data.model);
      renderMemory();
      break;
    case "progress": {
      const m = state.models.get(data.model_id);
      if (m && m.state === "starting") {
        m.load_phase = data.phase;
        m.load_percent = data.percent;
        renderModel(m);
      }
      break;
    }
    case "queue":
      state.queued = data.queued;
      renderMemory();
      break;
    case "request":
      addActivity(data, true);
      break;
  }
}

async function connect() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  const status = $("connection");
  try {
    const resp = await api("/api/events", { signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    status.textContent = "live";
    status.className = "connection live";
    notice("");
    loadActivity().catch(() => {});
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) handle(kind, JSON.parse(data.join("\n")));
      }
    }
  } catch (e) {
    if (controller.signal.aborted) return;
    if (e.message !== "unauthorized") console.error("event stream:", e);
    if (e.message === "unauthorized") {
      status.textContent = "needs a key";
      status.className = "connection";
      return;
    }
  }
  if (state.stream !== controller) return;
  status.textContent = "reconnecting…";
  status.className = "connection";
  setTimeout(() => { if (state.stream === controller) connect(); }, 2000);
}

// ------------------------------------------------------------------ logs

async function followLogs(id) {
  if (state.logs) state.logs.abort();
  const controller = new AbortController();
  state.logs = controller;
  const pre = $("logs");
  pre.textContent = "";
  $("logs-model").textContent = `— ${id} (following)`;
  $("logs-stop").disabled = false;
  $("logs-section").scrollIntoView({ behavior: "smooth", block: "nearest" });
  try {
    const resp = await api(`/api/models/${encodeURIComponent(id)}/logs?follow=true&lines=300`,
      { signal: controller.signal });
    if (!resp.ok) { pre.textContent = await errorText(resp); return; }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.append(value);
      if (pre.textContent.length > LOG_LINES * 200) {
        pre.textContent = pre.textContent.slice(-LOG_LINES * 100);
      }
      if ($("logs-scroll").checked) pre.scrollTop = pre.scrollHeight;
    }
  } catch {
    // aborted, or the stream broke: the buttons say what to do next
  }
  if (state.logs === controller) {
    $("logs-model").textContent = `— ${id}`;
    $("logs-stop").disabled = true;
  }
}

// ------------------------------------------------------------------ theme and start

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  $("theme").textContent = `theme: ${theme}`;
}

function start() {
  const themes = ["auto", "light", "dark"];
  applyTheme(localStorage.getItem(THEME_STORE) || "auto");
  $("theme").addEventListener("click", () => {
    const now = localStorage.getItem(THEME_STORE) || "auto";
    const next = themes[(themes.indexOf(now) + 1) % themes.length];
    localStorage.setItem(THEME_STORE, next);
    applyTheme(next);
  });
  $("change-key").addEventListener("click", () => askKey(""));
  $("key-form").addEventListener("submit", () => {
    localStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    connect();
  });
  $("logs-stop").addEventListener("click", () => {
    if (state.logs) state.logs.abort();
    state.logs = null;
    $("logs-stop").disabled = true;
    $("logs-model").textContent = $("logs-model").textContent.replace(" (following)", "");
  });
  setInterval(() => {
    for (const m of state.models.values()) {
      const row = document.querySelector(`#model-rows tr[data-model="${CSS.escape(m.id)}"]`);
      if (row) renderClock(m, row);
    }
  }, 1000);
  if (key()) connect(); else askKey("");
}

document.addEventListener("DOMContentLoaded", start);

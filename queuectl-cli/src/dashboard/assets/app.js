// The queuectl dashboard: one page, no build step. Every piece of job text is put in the page
// with textContent (el() below), never as markup.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const READ_ONLY = document.querySelector('meta[name="read-only"]').content === "true";
const STATES = ["pending", "processing", "completed", "failed", "dead", "cancelled"];
const PAGE = 50;

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function flash(message, bad) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = bad ? "flash bad" : "flash";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

async function get(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function act(path, done) {
  const response = await fetch(path, { method: "POST", headers: { "X-CSRF-Token": CSRF } });
  const body = await response.json();
  if (!response.ok) { flash(body.error || response.statusText, true); return; }
  flash(done);
  render();
}

function when(at) { return at ? at.replace("T", " ").replace(/\.\d+Z$/, "Z") : ""; }
function stateCell(state, blocked) {
  return el("td", { class: "state-" + state }, blocked ? state + " (after)" : state);
}
function button(label, path, done, id) {
  if (READ_ONLY) return null;
  return el("button", { id, onclick: () => act(path, done) }, label);
}

// ----- pages -----

async function overview() {
  const s = await get("/api/status");
  const cards = STATES.map((state) =>
    el("div", { class: "card" + ((state === "dead" || state === "failed") && s.counts[state] ? " bad" : ""), id: "count-" + state },
      el("div", { class: "n" }, s.counts[state]), el("div", { class: "label" }, state)));
  const max = Math.max(1, ...s.last_hour.map((m) => m.completed + m.failed));
  const bars = s.last_hour.map((m) => {
    const bar = el("div", { class: m.failed ? "bar failed" : "bar", title: `${when(m.at)}: ${m.completed} completed, ${m.failed} failed` });
    bar.style.height = Math.round(((m.completed + m.failed) / max) * 100) + "%";
    return bar;
  });
  const queues = el("table", { id: "queues" },
    el("tr", {}, ["Queue", "State", "Limit", ...STATES, ""].map((h) => el("th", {}, h))),
    s.queues.map((q) => el("tr", {},
      el("td", {}, el("a", { href: "#/jobs?queue=" + encodeURIComponent(q.name) }, q.name)),
      el("td", { class: q.paused ? "state-failed" : "" }, q.paused ? "paused" : "running"),
      el("td", {}, q.limit || "–"),
      STATES.map((state) => el("td", {}, q.counts[state])),
      el("td", {}, q.paused
        ? button("Resume", `/api/queues/${encodeURIComponent(q.name)}/resume`, `resumed ${q.name}`)
        : button("Pause", `/api/queues/${encodeURIComponent(q.name)}/pause`, `paused ${q.name}`)))));
  const workers = s.workers.length
    ? el("table", {}, el("tr", {}, ["Worker", "Host", "pid", "Slots", "Queues", "Since", "Seen"].map((h) => el("th", {}, h))),
      s.workers.map((w) => el("tr", {}, el("td", { class: "mono" }, w.id), el("td", {}, w.hostname), el("td", {}, w.pid),
        el("td", {}, w.concurrency), el("td", {}, (w.queues || []).join(", ") || "all"), el("td", {}, when(w.started_at)),
        el("td", {}, when(w.last_seen) + (w.stop_requested ? " (stopping)" : "")))))
    : el("p", { class: "muted" }, "No worker is running.");
  return [
    el("h2", {}, `Jobs (${s.total})`), el("div", { class: "cards" }, cards),
    el("h2", {}, "Last hour (per minute; red: with failures)"), el("div", { class: "chart", id: "chart" }, bars),
    el("h2", {}, "Queues"), s.queues.length ? queues : el("p", { class: "muted" }, "No queues yet."),
    el("h2", {}, `Workers (${s.worker_slots} slots)`), workers,
  ];
}

function jobTable(jobs, withRetry) {
  return el("table", { id: "jobs" },
    el("tr", {}, ["ID", "Queue", "State", "Attempts", "Priority", "Updated", "Command", ""].map((h) => el("th", {}, h))),
    jobs.map((j) => el("tr", {},
      el("td", { class: "mono" }, el("a", { href: "#/job/" + encodeURIComponent(j.id) }, j.id)),
      el("td", {}, j.queue), stateCell(j.state, j.blocked), el("td", {}, `${j.attempts}/${j.max_retries}`),
      el("td", {}, j.priority), el("td", {}, when(j.updated_at)), el("td", { class: "cmd" }, j.command),
      el("td", {}, withRetry ? button("Retry", `/api/jobs/${encodeURIComponent(j.id)}/retry`, `job ${j.id} will run again`) : null))));
}

async function jobs(params) {
  const offset = Number(params.get("offset") || 0);
  const query = new URLSearchParams({ limit: PAGE, offset });
  for (const key of ["state", "queue", "q"]) if (params.get(key)) query.set(key, params.get(key));
  const page = await get("/api/jobs?" + query);
  const go = (changes) => {
    const next = new URLSearchParams(params);
    for (const [k, v] of Object.entries(changes)) { if (v === "" || v === null) next.delete(k); else next.set(k, v); }
    location.hash = "#/jobs?" + next;
  };
  const stateSelect = el("select", { id: "filter-state" }, el("option", { value: "" }, "any state"),
    STATES.map((s) => el("option", { value: s, selected: params.get("state") === s }, s)));
  stateSelect.addEventListener("change", () => go({ state: stateSelect.value, offset: null }));
  const queueInput = el("input", { id: "filter-queue", placeholder: "queue", value: params.get("queue") || "" });
  const search = el("input", { id: "search", placeholder: "id or command", value: params.get("q") || "" });
  const form = el("form", { class: "filters" }, stateSelect, queueInput, search, el("button", { type: "submit" }, "Search"));
  form.addEventListener("submit", (e) => { e.preventDefault(); go({ queue: queueInput.value, q: search.value, offset: null }); });
  const pager = el("div", { class: "pager" },
    offset > 0 ? el("button", { onclick: () => go({ offset: Math.max(0, offset - PAGE) }) }, "Newer") : null,
    el("span", { class: "muted" }, page.jobs.length ? `${offset + 1}–${offset + page.jobs.length}` : "no jobs"),
    page.has_more ? el("button", { onclick: () => go({ offset: offset + PAGE }) }, "Older") : null);
  return [el("h2", {}, "Jobs, newest first"), form, jobTable(page.jobs, false), pager];
}

async function job(id) {
  const { job: j, attempts } = await get("/api/jobs/" + encodeURIComponent(id));
  const fields = [
    ["id", j.id], ["command", j.command], ["queue", j.queue], ["state", j.blocked ? j.state + " (waiting for its dependencies)" : j.state],
    ["attempts", `${j.attempts} of ${j.max_retries}`], ["priority", j.priority], ["created", when(j.created_at)],
    ["updated", when(j.updated_at)], ["run at", when(j.run_at)], ["timeout", j.timeout === null ? "none" : j.timeout + " s"],
    ["unique key", j.unique_key], ["after", (j.after || []).join(", ")], ["last error", j.last_error],
    ["exit code", j.exit_code], ["worker", j.lease ? j.lease.worker : null],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  const actions = el("p", { id: "actions" },
    ["completed", "dead", "cancelled"].includes(j.state) ? button("Retry", `/api/jobs/${encodeURIComponent(j.id)}/retry`, `job ${j.id} will run again`, "retry") : null, " ",
    ["pending", "failed", "processing"].includes(j.state) ? button("Cancel", `/api/jobs/${encodeURIComponent(j.id)}/cancel`, `cancelled ${j.id}`, "cancel") : null, " ",
    j.state !== "processing" ? button("Remove", `/api/jobs/${encodeURIComponent(j.id)}/remove`, `removed ${j.id}`, "remove") : null);
  const history = attempts.map((a) => el("div", { class: "attempt" },
    el("p", {}, el("strong", {}, `#${a.number} ${a.outcome}`), ` on ${a.worker}, started ${when(a.started_at)}`,
      a.finished_at ? `, ended ${when(a.finished_at)}` : " (running)", a.exit_code !== null ? `, exit ${a.exit_code}` : "",
      a.signal !== null ? `, signal ${a.signal}` : "", a.error ? `: ${a.error}` : ""),
    a.output ? el("pre", {}, a.output) : null));
  return [el("h2", {}, "Job ", el("span", { class: "mono" }, j.id)), actions,
    el("dl", { id: "job" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", { class: k === "state" ? "state-" + j.state : "", id: "field-" + k.replace(/ /g, "-") }, v)])),
    el("h2", {}, "Attempts"), history.length ? history : el("p", { class: "muted" }, "No attempt yet.")];
}

async function dlq(params) {
  const offset = Number(params.get("offset") || 0);
  const page = await get(`/api/jobs?state=dead&limit=${PAGE}&offset=${offset}`);
  return [el("h2", {}, "Dead letter queue"),
    el("p", {}, page.jobs.length ? button("Retry all dead jobs", "/api/dlq/retry", "every dead job will run again", "retry-all") : "No dead jobs."),
    page.jobs.length ? jobTable(page.jobs, true) : null];
}

// ----- routing and live updates -----

async function render() {
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("here", a.getAttribute("href") === "#" + path);
  let content;
  try {
    if (path.startsWith("/job/")) content = await job(decodeURIComponent(path.slice(5)));
    else if (path === "/jobs") content = await jobs(params);
    else if (path === "/dlq") content = await dlq(params);
    else content = await overview();
  } catch (error) {
    content = el("p", { class: "state-dead" }, "Could not load this page: " + error.message);
  }
  const focused = document.activeElement && document.activeElement.id;
  document.getElementById("main").replaceChildren(...[content].flat(Infinity).filter(Boolean));
  if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
}

let pending = null;
function soon() {
  // Many changes in a burst make one refresh.
  if (pending) return;
  pending = setTimeout(() => { pending = null; render(); }, 150);
}

function live() {
  const status = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { status.textContent = "live"; status.className = "live on"; });
  events.addEventListener("change", soon);
  events.addEventListener("error", () => { status.textContent = "reconnecting…"; status.className = "live"; });
}

window.addEventListener("hashchange", render);
render();
live();

// The Ferry console: the fleet (searched by selector, paged by the server), one device's page,
// starting, pausing, resuming and aborting rollouts, rolling an app back. It uses the same JSON
// API and token as `ferryctl` (controller/API.md). Reads are polled with ETags: nothing
// changed costs a 304 and no redraw. The token comes from the URL fragment (`#token=...`,
// never sent to the server) or the form, and lives in this tab's sessionStorage only.
"use strict";

// A blocked script, style or request is a bug of this page: say so where tests look.
document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`content security policy: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`));

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;" }[c]));
const enc = encodeURIComponent;
const ago = (t) => {
  if (!t) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(t)) / 1000);
  return s < 60 ? `${s | 0}s ago` : s < 3600 ? `${s / 60 | 0}m ago` : s < 86400 ? `${s / 3600 | 0}h ago` : `${s / 86400 | 0}d ago`;
};
const UNITS = { temperature_c: "°C", cpu_temp_c: "°C", humidity_pct: "%", cpu_pct: "%", load1: "" };
const fmt = (m, v) => v === undefined || v === null ? "–" :
  m.endsWith("_bytes") ? `${(v / 1048576).toFixed(1)} MiB` :
  m.endsWith("_s") ? `${Math.round(v)} s` : `${Number(v).toFixed(1)}${UNITS[m] ?? ""}`;
const plural = (n, one, many) => `${n} ${n === 1 ? one : (many || one + "s")}`;

// What the page did, for people debugging it and for the browser test.
const stats = { requests: 0, notModified: 0, renders: { fleet: 0, rollouts: 0, device: 0, charts: 0 } };
window.ferryConsole = stats;

// ---- the token and the route, both from the fragment ---------------------------------------

let token = sessionStorage.getItem("ferry-token") || "";

/// `#/device/web-a`, `#/?select=group%3Dbeta`, `#/rollouts/new?app=sensor`, and the first
/// page's `#token=T&device=D`. A token in the fragment is stored and taken out of the URL.
function route() {
  const h = location.hash.slice(1);
  let path = "/", query = h;
  if (h.startsWith("/")) {
    const i = h.indexOf("?");
    path = i < 0 ? h : h.slice(0, i);
    query = i < 0 ? "" : h.slice(i + 1);
  }
  const params = new URLSearchParams(query);
  if (params.has("token")) {
    token = params.get("token");
    sessionStorage.setItem("ferry-token", token);
    params.delete("token");
    if (!h.startsWith("/") && params.has("device")) {
      path = `/device/${params.get("device")}`;
      params.delete("device");
    }
    const rest = params.toString();
    history.replaceState(null, "", `${location.pathname}${location.search}#${path}${rest ? "?" + rest : ""}`);
  }
  return { path, params };
}

// ---- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

const cache = new Map(); // GET path → { etag, body }

/// `{ body, changed }`: `changed` is false when the server answered 304 for what we hold.
async function api(path, method = "GET", body = undefined) {
  const headers = { Authorization: `Bearer ${token}` };
  const held = method === "GET" ? cache.get(path) : undefined;
  if (held) headers["If-None-Match"] = held.etag;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  stats.requests++;
  const r = await fetch(`/api/v1${path}`, { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 304 && held) { stats.notModified++; return { body: held.body, changed: false }; }
  if (r.status === 401) { $("login").hidden = false; throw new ApiError("the API token was refused", 401); }
  let answer;
  try { answer = await r.json(); } catch (e) { throw new ApiError(`${r.status} ${r.statusText}`, r.status); }
  if (!r.ok) throw new ApiError(answer.error || r.statusText, r.status);
  const etag = r.headers.get("ETag");
  if (method === "GET" && etag) {
    cache.delete(path);
    cache.set(path, { etag, body: answer });
    if (cache.size > 64) cache.delete(cache.keys().next().value);
  }
  return { body: answer, changed: true };
}

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", bad);
}

// ---- the fleet -----------------------------------------------------------------------------

const fleet = { select: "", size: 50, cursors: [null], page: 0, total: 0, shown: null };

function fleetRow(d) {
  const t = (d.telemetry && d.telemetry.values) || {};
  const apps = Object.entries(d.apps).map(([n, a]) => `${esc(n)} ${esc(a.version)}`).join(", ") || "–";
  const labels = Object.entries(d.labels).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(" ");
  const r = d.last_result, u = d.update;
  const last = u ? `${esc(u.phase)} (seq ${u.sequence})${u.waiting ? `<span class="waiting">, waiting: ${esc(u.waiting)}${u.reason ? ` (${esc(u.reason)})` : ""}</span>` : ""}`
    : r ? `${esc(r.phase)} (seq ${r.sequence})${r.reason ? ": " + esc(r.reason) : ""}` : "–";
  return `<tr class="device" data-device="${esc(d.id)}">
    <td class="nowrap"><a href="#/device/${esc(enc(d.id))}"><b>${esc(d.id)}</b></a></td><td class="narrow-hide">${esc(d.platform || "?")}</td><td class="apps">${apps}</td>
    <td><span class="pill ${esc(d.health)}">${esc(d.health)}</span></td>
    <td><span class="pill ${d.online ? "yes" : "no"}">${d.online ? "online" : "offline"}</span>${d.trust && d.trust.stale ? ` <span class="pill no stale" title="no recent controller heartbeat: notices may be withheld">stale</span>` : ""}</td>
    <td class="narrow-hide nowrap">${ago(d.last_seen)}</td>
    <td class="temperature">${fmt("temperature_c", t.temperature_c)}</td>
    <td class="humidity narrow-hide">${fmt("humidity_pct", t.humidity_pct)}</td>
    <td class="muted narrow-hide">${labels}</td><td class="muted last narrow-hide">${last}</td></tr>`;
}

function renderFleet(page) {
  stats.renders.fleet++;
  fleet.total = page.total;
  const first = fleet.page * fleet.size;
  $("fleet-count").textContent = fleet.select ? `(${page.total} matching ${fleet.select})` : `(${page.total})`;
  $("fleet").querySelector("tbody").innerHTML = page.devices.length ? page.devices.map(fleetRow).join("")
    : `<tr><td colspan="10" class="muted">no device matches</td></tr>`;
  fleet.cursors[fleet.page + 1] = page.next;
  $("page-prev").disabled = fleet.page === 0;
  $("page-next").disabled = !page.next;
  $("page-info").textContent = page.devices.length
    ? `${first + 1}–${first + page.devices.length} of ${page.total}` : `0 of ${page.total}`;
}

$("fleet").onclick = (e) => {
  const row = e.target.closest("tr.device");
  if (row && !e.target.closest("a")) location.hash = `#/device/${enc(row.dataset.device)}`;
};
$("search-form").onsubmit = (e) => {
  e.preventDefault();
  const s = $("search").value.trim();
  location.hash = s ? `#/?select=${enc(s)}` : "#/";
};
$("page-size").oninput = () => {
  fleet.size = Math.min(1000, Math.max(1, parseInt($("page-size").value, 10) || 50));
  fleet.cursors = [null];
  fleet.page = 0;
  refresh();
};
$("page-next").onclick = () => { if (fleet.cursors[fleet.page + 1]) { fleet.page++; refresh(); } };
$("page-prev").onclick = () => { if (fleet.page > 0) { fleet.page--; refresh(); } };

// ---- rollouts ------------------------------------------------------------------------------

let rolloutsShown = [];
let confirming = null; // the rollout whose abort waits for a second click
const opErrors = {};

function rolloutCard(r) {
  const waves = r.summary.waves.map((w) => {
    const n = Math.max(w.devices, 1), pct = (x) => `${(100 * x / n).toFixed(1)}%`;
    return `<div class="wave" data-wave="${w.index + 1}">wave ${w.index + 1}
      <div class="bar"><span class="ok" data-w="${pct(w.succeeded)}"></span><span class="bad" data-w="${pct(w.failed)}"></span><span class="busy" data-w="${pct(w.notified + w.soaking)}"></span></div>
      ${w.succeeded} ok · ${w.failed} failed · ${w.notified + w.soaking} busy${w.held_window + w.held_lock ? ` · <span class="waiting">${w.held_window + w.held_lock} held</span>` : ""}${w.retrying ? ` · <span class="waiting">${w.retrying} retrying</span>` : ""} · target ${w.target}${w.started ? "" : " (not started)"}</div>`;
  }).join("");
  const failures = r.summary.failures.map(([why, ids]) => `<div class="error">${ids.length} × ${esc(why)}: ${ids.map(esc).join(", ")}</div>`).join("");
  const waits = (r.summary.waiting || []).slice(0, 10).map((g) => `<div class="waiting">${g.devices.length} × waiting: ${esc(g.waiting)}${g.reason ? ` (${esc(g.reason)})` : ""}: ${g.devices.slice(0, 10).map(esc).join(", ")}${g.devices.length > 10 ? " …" : ""}</div>`).join("");
  const id = esc(r.id);
  let actions = "";
  if (confirming === r.id && (r.state === "running" || r.state === "paused")) {
    actions = `<span class="error">Abort ${id}? Devices keep what they run now; nothing more is sent.</span>
      <button class="danger primary" data-op="abort" data-rollout="${id}">Confirm abort</button><button data-op="cancel" data-rollout="${id}">Keep it</button>`;
  } else if (r.state === "running") {
    actions = `<button data-op="pause" data-rollout="${id}">Pause</button><button class="danger" data-op="ask-abort" data-rollout="${id}">Abort…</button>`;
  } else if (r.state === "paused") {
    actions = `<button class="primary" data-op="resume" data-rollout="${id}">Resume</button><button class="danger" data-op="ask-abort" data-rollout="${id}">Abort…</button>`;
  }
  return `<div class="rollout" data-rollout="${id}" data-state="${esc(r.state)}">
    <b>${id}</b> ${esc(r.app)} ${esc(r.version)} → <code>${esc(r.select)}</code>
    <span class="pill ${esc(r.state)}">${esc(r.state)}</span> ${r.reason ? `<span class="muted">${esc(r.reason)}</span>` : ""}
    <div class="muted">waves ${esc(r.waves)} · soak ${r.soak_s}s · max failures ${esc(r.max_failures)} · on failure ${esc(r.on_failure)}${r.force ? " · force" : ""} · ${r.summary.succeeded}/${r.summary.devices} succeeded</div>
    ${waves}${waits}${failures}
    ${actions ? `<div class="actions">${actions}</div>` : ""}
    ${opErrors[r.id] ? `<div class="error op-error">${esc(opErrors[r.id])}</div>` : ""}</div>`;
}

function renderRollouts(rollouts) {
  stats.renders.rollouts++;
  rolloutsShown = rollouts;
  if (!rollouts.length) { $("rollout-list").textContent = "none yet"; $("rollout-list").classList.add("muted"); return; }
  $("rollout-list").classList.remove("muted");
  $("rollout-list").innerHTML = rollouts.slice().reverse().map(rolloutCard).join("");
  // Widths through the CSSOM: the page's policy allows no inline style attributes.
  for (const s of $("rollout-list").querySelectorAll(".bar span[data-w]")) s.style.width = s.dataset.w;
}

$("rollout-list").onclick = async (e) => {
  const b = e.target.closest("button[data-op]");
  if (!b) return;
  const id = b.dataset.rollout, op = b.dataset.op;
  delete opErrors[id];
  if (op === "ask-abort" || op === "cancel") {
    confirming = op === "ask-abort" ? id : null;
    renderRollouts(rolloutsShown);
    return;
  }
  confirming = null;
  b.disabled = true;
  try {
    await api(`/rollouts/${enc(id)}/${op}`, "POST");
    setStatus(`${id}: ${op} done`);
  } catch (err) {
    opErrors[id] = `${op}: ${err.message}`;
  }
  await refresh();
  renderRollouts(rolloutsShown);
};

// ---- one device ----------------------------------------------------------------------------

function renderDevice(d) {
  stats.renders.device++;
  $("dev-id").textContent = d.id;
  const labels = Object.entries(d.labels).map(([k, v]) => `<code>${esc(k)}=${esc(v)}</code>`).join(" ") || "–";
  const u = d.update, r = d.last_result;
  const facts = [
    ["Platform", esc(d.platform || "?")],
    ["Agent", esc(d.agent_version || "?")],
    ["Health", `<span class="pill ${esc(d.health)}">${esc(d.health)}</span>`],
    ["Online", `<span class="pill ${d.online ? "yes" : "no"}">${d.online ? "online" : "offline"}</span>${d.trust && d.trust.stale ? ` <span class="pill no">stale</span>` : ""}`],
    ["Last seen", `<span title="${esc(d.last_seen)}">${ago(d.last_seen)}</span>`],
    ["Labels", labels],
    ["Update", u ? `${esc(u.phase)} (seq ${u.sequence}${u.rollout ? `, ${esc(u.rollout)}` : ""})${u.waiting ? ` <span class="waiting">waiting: ${esc(u.waiting)}${u.reason ? ` (${esc(u.reason)})` : ""}</span>` : ""}` : "none in progress"],
    ["Last result", r ? `${esc(r.phase)} (seq ${r.sequence}${r.rollout ? `, ${esc(r.rollout)}` : ""})${r.reason ? `: <span class="error">${esc(r.reason)}</span>` : ""}` : "–"],
  ];
  $("dev-facts").innerHTML = facts.map(([k, v]) => `<dt>${k}</dt><dd class="fact-${k.toLowerCase().replace(/ /g, "-")}">${v}</dd>`).join("");
  const prev = d.previous || {};
  $("dev-apps").querySelector("tbody").innerHTML = Object.entries(d.apps).map(([n, a]) => `<tr data-app="${esc(n)}">
      <td><b>${esc(n)}</b></td><td>${esc(a.version)}<div class="muted"><code title="${esc(a.digest)}">${esc(String(a.digest).slice(0, 19))}…</code></div></td>
      <td><span class="pill ${esc(a.health)}">${esc(a.health)}</span></td><td>${esc(prev[n] || "–")}</td>
      <td>${prev[n] ? `<a class="rollback-link" href="#/rollback?app=${enc(n)}&select=${enc(`id in (${d.id})`)}">Roll back to ${esc(prev[n])}</a>` : ""}</td></tr>`).join("")
    || `<tr><td colspan="5" class="muted">no apps</td></tr>`;
  const sent = d.desired_sequence == null ? `<p class="muted">no notice sent to this device by this controller yet</p>`
    : `<p id="notice-sent"><b>Sent</b>: sequence ${d.desired_sequence} — ${Object.entries(d.desired_apps || {}).map(([n, v]) => `${esc(n)} ${esc(v)}`).join(", ") || "no apps"}</p>`;
  const accepted = `<p id="notice-accepted"><b>Accepted</b>: sequence ${d.sequence ?? "none"} — running ${Object.entries(d.apps).map(([n, a]) => `${esc(n)} ${esc(a.version)}`).join(", ") || "nothing"}</p>`;
  const behind = d.desired_sequence != null && (d.sequence ?? 0) < d.desired_sequence
    ? `<p class="waiting">the device has not accepted sequence ${d.desired_sequence} yet</p>` : "";
  $("dev-notices").innerHTML = sent + accepted + behind;
  $("dev-events").querySelector("tbody").innerHTML = d.events.length ? d.events.map((e) => {
    const dl = e.download ? `<div class="muted">fetched ${(e.download.fetched_bytes / 1048576).toFixed(1)} MiB · ${e.download.retries} retries · ${e.download.resumes} resumes</div>` : "";
    const logs = e.logs && e.logs.length ? `<details><summary>${plural(e.logs.length, "log line")}</summary><pre>${e.logs.map(esc).join("\n")}</pre></details>` : "";
    return `<tr class="event" data-phase="${esc(e.phase)}"><td class="nowrap" title="${esc(e.ts)}">${ago(e.ts)}</td><td>${e.sequence}</td><td>${esc(e.rollout || "–")}</td>
      <td><span class="pill ${/fail|rolled_back/.test(e.phase) ? "failed" : "pending"}">${esc(e.phase)}</span></td><td>${esc(e.app || "–")}</td>
      <td>${e.reason ? `<div class="reason">${esc(e.reason)}</div>` : ""}${e.waiting ? `<div class="waiting">waiting: ${esc(e.waiting)}</div>` : ""}${dl}${logs}</td></tr>`;
  }).join("") : `<tr><td colspan="6" class="muted">no events</td></tr>`;
}

function chart(metric, points) {
  const w = 360, h = 140, pad = 28;
  const xs = points.map((p) => p.ts), ys = points.map((p) => p.value);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 1; y1 += 1; }
  const X = (x) => pad + (w - pad - 6) * (x - x0) / (x1 - x0);
  const Y = (y) => h - 16 - (h - 26) * (y - y0) / (y1 - y0);
  const line = points.map((p) => `${X(p.ts).toFixed(1)},${Y(p.value).toFixed(1)}`).join(" ");
  const t = (ms) => new Date(ms).toISOString().slice(11, 16);
  return `<div class="chart"><h3>${esc(metric)} <span class="now">${fmt(metric, ys[ys.length - 1])}</span></h3>
    <svg viewBox="0 0 ${w} ${h}" data-metric="${esc(metric)}" data-points="${points.length}">
      <line class="axis" x1="${pad}" y1="${h - 16}" x2="${w}" y2="${h - 16}"/><line class="axis" x1="${pad}" y1="4" x2="${pad}" y2="${h - 16}"/>
      <text x="2" y="12">${fmt(metric, y1)}</text><text x="2" y="${h - 18}">${fmt(metric, y0)}</text>
      <text x="${pad}" y="${h - 2}">${t(x0)}</text><text x="${w - 34}" y="${h - 2}">${t(x1)}</text>
      <polyline points="${line}"/></svg></div>`;
}

const ORDER = ["temperature_c", "humidity_pct", "cpu_temp_c", "cpu_pct", "mem_used_bytes", "disk_free_bytes", "load1"];
function renderCharts(id, s) {
  stats.renders.charts++;
  const metrics = Object.keys(s.series).filter((m) => ORDER.includes(m) || !m.endsWith("_total"))
    .sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99))
    .filter((m) => !["uptime_s", "mem_total_bytes"].includes(m));
  $("charts").innerHTML = metrics.length ? metrics.map((m) => chart(m, s.series[m])).join("")
    : `<p class="muted">no telemetry from ${esc(id)} in the last 6 h</p>`;
}

// ---- starting a rollout --------------------------------------------------------------------

let releases = [];

async function loadReleases() {
  const { body, changed } = await api("/releases");
  if (!changed) return;
  releases = body;
  $("release-list").innerHTML = body.map((r) => `<option value="${esc(r.app)} ${esc(r.version)}">`).join("");
  $("app-list").innerHTML = [...new Set(body.map((r) => r.app))].map((a) => `<option value="${esc(a)}">`).join("");
}

function rolloutBody() {
  const [app = "", version = ""] = $("f-release").value.trim().split(/\s+/);
  const body = {
    app, version,
    select: $("f-select").value.trim(),
    waves: $("f-waves").value.trim(),
    soak: $("f-soak").value.trim(),
    max_failures: $("f-max-failures").value.trim(),
    on_failure: document.querySelector("input[name=on-failure]:checked").value,
  };
  const timeout = $("f-timeout").value.trim();
  if (timeout) body.device_timeout = timeout;
  const strategy = document.querySelector("input[name=strategy]:checked").value;
  if (strategy) body.strategy = strategy;
  if ($("f-force").checked) body.force = true;
  return body;
}

let previewTimer = null, previewSeq = 0;
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 250);
}

async function preview() {
  const body = rolloutBody();
  const box = $("preview");
  if (!body.app || !body.version) { box.innerHTML = `<span class="muted">name the release as <i>app version</i>, e.g. <code>sensor 2.0.0</code></span>`; return; }
  const mine = ++previewSeq;
  try {
    const { body: p } = await api("/rollouts/preview", "POST", body);
    if (mine !== previewSeq) return;
    box.innerHTML = `<div id="preview-total" data-devices="${p.devices}"><b>${plural(p.devices, "device")}</b> match <code>${esc(body.select)}</code> (${p.online} online)</div>
      <ol>${p.waves.map((n, i) => `<li data-wave="${i + 1}" data-new="${n}" data-target="${p.targets[i]}">wave ${i + 1}: ${plural(n, "device")}${i ? `, ${p.targets[i]} in all` : ""}</li>`).join("")}</ol>`;
  } catch (e) {
    if (mine !== previewSeq) return;
    box.innerHTML = `<span class="error" id="preview-error">${esc(e.message)}</span>`;
  }
}

for (const el of $("rollout-form").querySelectorAll("input")) {
  el.addEventListener("input", schedulePreview);
  el.addEventListener("change", schedulePreview);
}

$("rollout-form").onsubmit = async (e) => {
  e.preventDefault();
  $("rollout-form-error").textContent = "";
  $("start-rollout").disabled = true;
  try {
    const { body: r } = await api("/rollouts", "POST", rolloutBody());
    setStatus(`rollout ${r.id} started: ${r.app} ${r.version} to ${r.summary.devices} device(s)`);
    location.hash = "#/";
  } catch (err) {
    $("rollout-form-error").textContent = err.message;
  } finally {
    $("start-rollout").disabled = false;
  }
};

// ---- rolling back --------------------------------------------------------------------------

$("rollback-form").onsubmit = async (e) => {
  e.preventDefault();
  $("rollback-error").textContent = "";
  $("rollback-result").innerHTML = "";
  const body = { app: $("rb-app").value.trim(), select: $("rb-select").value.trim() };
  if ($("rb-force").checked) body.force = true;
  $("rollback-go").disabled = true;
  try {
    const { body: r } = await api("/rollback", "POST", body);
    $("rollback-result").innerHTML = `<h3>${esc(r.app)}: ${plural(r.devices.length, "device")}</h3>
      <div class="scroll"><table id="rollback-table"><thead><tr><th>Device</th><th>From</th><th>To</th><th>Notice</th></tr></thead><tbody>${r.devices.map((d) =>
        `<tr data-device="${esc(d.device)}"><td><a href="#/device/${esc(enc(d.device))}">${esc(d.device)}</a></td><td>${esc(d.from || "–")}</td><td>${esc(d.to || "–")}</td>
         <td>${d.sequence != null ? `<span class="ok-text">sent, sequence ${d.sequence}</span>` : `<span class="muted">skipped: ${esc(d.skipped)}</span>`}</td></tr>`).join("")}</tbody></table></div>`;
  } catch (err) {
    $("rollback-error").textContent = err.message;
  } finally {
    $("rollback-go").disabled = false;
  }
};

// ---- views and polling ---------------------------------------------------------------------

const VIEWS = ["fleet", "device", "new", "rollback"];
let current = { view: "fleet" };

function show() {
  const { path, params } = route();
  let view = "fleet", arg = null;
  if (path.startsWith("/device/")) { view = "device"; arg = decodeURIComponent(path.slice(8)); }
  else if (path === "/rollouts/new") view = "new";
  else if (path === "/rollback") view = "rollback";
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  $("nav-fleet").classList.toggle("here", view === "fleet");
  $("nav-new").classList.toggle("here", view === "new");
  $("nav-rollback").classList.toggle("here", view === "rollback");
  if (view === "fleet") {
    const select = params.get("select") || "";
    if (select !== fleet.select) { fleet.select = select; fleet.cursors = [null]; fleet.page = 0; }
    $("search").value = select;
  }
  if (view === "device" && (current.view !== "device" || current.arg !== arg)) {
    $("dev-id").textContent = arg;
    for (const id of ["dev-facts", "dev-notices", "charts"]) $(id).innerHTML = "";
    cache.delete(`/devices/${enc(arg)}`);
    cache.delete(`/devices/${enc(arg)}/telemetry?since=6h`);
  }
  if (view === "new") {
    if (params.has("app")) $("f-release").value = `${params.get("app")} ${params.get("version") || ""}`.trim();
    if (params.has("select")) $("f-select").value = params.get("select");
    schedulePreview();
  }
  if (view === "rollback") {
    if (params.has("app")) $("rb-app").value = params.get("app");
    if (params.has("select")) $("rb-select").value = params.get("select");
    $("rollback-result").innerHTML = "";
  }
  current = { view, arg };
  document.title = view === "device" ? `Ferry — ${arg}` : view === "new" ? "Ferry — new rollout" : view === "rollback" ? "Ferry — roll back" : "Ferry — fleet";
  refresh();
}

let busy = false;
async function refresh() {
  if (!token) { $("login").hidden = false; setStatus("needs the API token"); return; }
  if (busy) return;
  busy = true;
  try {
    if (current.view === "fleet") {
      const q = new URLSearchParams({ limit: fleet.size });
      if (fleet.select) q.set("select", fleet.select);
      const after = fleet.cursors[fleet.page];
      if (after) q.set("after", after);
      const path = `/devices?${q}`;
      let page;
      try {
        page = await api(path);
        $("fleet-error").textContent = "";
      } catch (e) {
        if (e.status !== 400) throw e;
        $("fleet-error").textContent = e.message;
        page = { changed: true, body: { devices: [], total: 0, next: null } };
      }
      const rollouts = await api("/rollouts");
      // A page held from before (304) is drawn again when another page was shown since.
      if (page.changed || fleet.shown !== path) renderFleet(page.body);
      fleet.shown = path;
      if (rollouts.changed) renderRollouts(rollouts.body);
      setStatus(`${plural(fleet.total, "device")} · updated ${new Date().toLocaleTimeString()}`);
    } else if (current.view === "device") {
      const id = current.arg;
      const [d, s] = await Promise.all([api(`/devices/${enc(id)}`), api(`/devices/${enc(id)}/telemetry?since=6h`)]);
      if (current.arg !== id) return;
      if (d.changed) renderDevice(d.body);
      if (s.changed) renderCharts(id, s.body);
      setStatus(`${id} · updated ${new Date().toLocaleTimeString()}`);
    } else {
      await loadReleases();
      setStatus(`${plural(releases.length, "release")} in the catalogue`);
    }
  } catch (e) {
    setStatus(`error: ${e.message}`, true);
  } finally {
    busy = false;
  }
}

$("token-form").onsubmit = (e) => {
  e.preventDefault();
  token = $("token-input").value.trim();
  sessionStorage.setItem("ferry-token", token);
  $("login").hidden = true;
  cache.clear();
  refresh();
};
window.addEventListener("hashchange", show);
show();
setInterval(refresh, 2000);

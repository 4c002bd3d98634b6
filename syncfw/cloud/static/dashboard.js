// The syncfw fleet dashboard: reads /api/v1/fleet once, then follows /api/v1/events
// (server-sent events: snapshot, delta, sample). No framework, nothing fetched elsewhere.
"use strict";

const LAG_WARN_S = 5;          // a lag cell turns red at this many seconds behind
const PALETTE = ["#1a73e8", "#188038", "#9334e6", "#e37400", "#12b5cb", "#5f6368",
                 "#a142f4", "#0b8043", "#3949ab", "#8d6e63"];
const state = { nodes: {}, history: {}, chartPoints: 120, events: 0, colors: {} };

function $(id) { return document.getElementById(id); }
function text(v) { return v === null || v === undefined ? "–" : String(v); }
function ms(v) { return v === null || v === undefined ? "–" : Number(v).toFixed(1); }
function age(s) { return s === null || s === undefined ? "–" : `${Number(s).toFixed(1)} s ago`; }

function color(node) {
  if (!(node in state.colors)) {
    state.colors[node] = PALETTE[Object.keys(state.colors).length % PALETTE.length];
  }
  return state.colors[node];
}

function lagClass(n) {
  if (n.state !== "alive" && n.state !== "not a member") return "lag-bad";
  if (n.sync_lag_s !== null && n.sync_lag_s >= LAG_WARN_S) return "lag-bad";
  return n.sync_lag_ops === 0 ? "lag-ok" : "";
}

function cells(n) {
  const model = n.model ? `${n.model.name} v${n.model.version}` : null;
  const lat = n.latency_ms || {};
  const off = n.clock_offset_ms === null || n.clock_offset_ms === undefined
    ? null : `${Number(n.clock_offset_ms).toFixed(0)} ms${n.clock_skewed ? " (skewed)" : ""}`;
  return [
    ["node", n.node_id, ""],
    ["state", n.state, `state-${String(n.state).replace(/ /g, "-")}`],
    ["contact", age(n.last_contact_ago_s), ""],
    ["lag_ops", text(n.sync_lag_ops), `num ${lagClass(n)}`],
    ["lag_s", n.sync_lag_s === null || n.sync_lag_s === undefined ? "–" : Number(n.sync_lag_s).toFixed(1),
     `num ${lagClass(n)}`],
    ["model", text(model), ""],
    ["stage", text(n.rollout_stage), ""],
    ["mode", text(n.mode) + (n.mode_reason ? ` (${n.mode_reason})` : ""), "mode"],
    ["rejected", text(n.rejected), n.rejected ? "num bad" : "num"],
    ["forked", n.forked ? "FORKED" : "no", n.forked ? "bad" : ""],
    ["clock", text(off), n.clock_skewed ? "bad" : ""],
    ["inferences", text(n.inferences), "num"],
    ["latency", `${ms(lat.p50_ms)} / ${ms(lat.p99_ms)}`, "num"],
    ["heartbeat", age(n.heartbeat_age_s), ""],
  ];
}

function renderRow(n) {
  const body = document.querySelector("#fleet tbody");
  let row = body.querySelector(`tr[data-node="${CSS.escape(n.node_id)}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.node = n.node_id;
    const after = [...body.children].find((r) => r.dataset.node > n.node_id);
    body.insertBefore(row, after || null);
  }
  const cs = cells(n);
  while (row.children.length < cs.length) row.appendChild(document.createElement("td"));
  cs.forEach(([field, value, cls], i) => {
    const td = row.children[i];
    td.dataset.field = field;
    td.textContent = value;
    td.className = cls.trim();
  });
  row.classList.toggle("degraded", n.mode !== null && n.mode !== undefined && n.mode !== "full");
}

function renderTotals() {
  const ns = Object.values(state.nodes);
  const by = {};
  ns.forEach((n) => { by[n.state] = (by[n.state] || 0) + 1; });
  $("t-nodes").textContent = ns.length;
  $("t-states").textContent = Object.keys(by).sort().map((k) => `${k} ${by[k]}`).join(", ") || "–";
  const degraded = ns.filter((n) => n.mode && n.mode !== "full").map((n) => n.node_id);
  $("t-degraded").textContent = degraded.length ? degraded.join(", ") : "none";
  $("t-rejected").textContent = ns.reduce((a, n) => a + (n.rejected || 0), 0);
  const forked = ns.filter((n) => n.forked).map((n) => n.node_id);
  $("t-forked").textContent = forked.length ? forked.join(", ") : "none";
  const stages = {};
  ns.filter((n) => n.model).forEach((n) => {
    const k = `${n.model.name} v${n.model.version} ${n.model.status}`;
    stages[k] = (stages[k] || 0) + 1;
  });
  $("t-rollout").textContent = Object.keys(stages).sort().map((k) => `${k}: ${stages[k]}`).join("; ") || "–";
  $("empty").hidden = ns.length > 0;
}

function renderAll() {
  document.querySelector("#fleet tbody").replaceChildren();
  Object.keys(state.nodes).sort().forEach((k) => renderRow(state.nodes[k]));
  renderTotals();
  renderCharts();
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
  return el;
}

function drawChart(el, field) {
  const W = 640, H = 200, L = 44, R = 8, T = 8, B = 20;
  const series = Object.entries(state.history)
    .map(([node, pts]) => [node, pts.filter((p) => p[field] !== null && p[field] !== undefined)])
    .filter(([, pts]) => pts.length > 0);
  el.replaceChildren();
  el.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  el.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  if (!series.length) {
    const t = svg("text", { x: L + 8, y: H / 2 });
    t.textContent = "no samples yet";
    el.appendChild(t);
    return;
  }
  const all = series.flatMap(([, pts]) => pts);
  const t0 = Math.min(...all.map((p) => p.t_ms)), t1 = Math.max(...all.map((p) => p.t_ms));
  const top = Math.max(1, ...all.map((p) => p[field]));
  const x = (t) => L + (t1 === t0 ? 0 : ((t - t0) / (t1 - t0)) * (W - L - R));
  const y = (v) => H - B - (v / top) * (H - T - B);
  [[top, T + 8], [0, H - B]].forEach(([v, yy]) => {
    const t = svg("text", { x: 2, y: yy, "data-tick": v });
    t.textContent = Number(v).toFixed(v < 10 ? 1 : 0);
    el.appendChild(t);
  });
  const span = svg("text", { x: W - R - 60, y: H - 4 });
  span.textContent = `${((t1 - t0) / 1000).toFixed(0)} s shown`;
  el.appendChild(span);
  series.forEach(([node, pts]) => {
    const line = svg("polyline", {
      points: pts.map((p) => `${x(p.t_ms).toFixed(1)},${y(p[field]).toFixed(1)}`).join(" "),
      stroke: color(node), "data-node": node,
    });
    el.appendChild(line);
  });
}

function renderCharts() {
  drawChart($("chart-latency"), "p99_ms");
  drawChart($("chart-lag"), "lag_ops");
  const legend = $("legend");
  legend.replaceChildren();
  Object.keys(state.history).sort().forEach((node) => {
    const s = document.createElement("span");
    const i = document.createElement("i");
    i.style.background = color(node);
    s.append(i, node);
    legend.appendChild(s);
  });
}

function seen() {
  state.events += 1;
  $("last-event").textContent = new Date().toLocaleTimeString();
  document.body.dataset.events = state.events;
}

function applyView(view) {
  state.nodes = Object.assign({}, view.nodes);
  $("aggregator").textContent = `· aggregator ${view.aggregator}`;
  $("view-version").textContent = view.version;
  $("folded").textContent = view.ops_folded;
}

function onSnapshot(ev) {
  const d = JSON.parse(ev.data);
  applyView(d.view);
  state.history = d.history || {};
  renderAll();
  seen();
}

function onDelta(ev) {
  const d = JSON.parse(ev.data);
  Object.values(d.nodes).forEach((n) => { state.nodes[n.node_id] = n; renderRow(n); });
  renderTotals();
  seen();
}

let chartTimer = null;
function onSample(ev) {
  const d = JSON.parse(ev.data);
  Object.entries(d.points).forEach(([node, p]) => {
    const pts = state.history[node] || (state.history[node] = []);
    pts.push(p);
    if (pts.length > state.chartPoints) pts.splice(0, pts.length - state.chartPoints);
  });
  if (!chartTimer) chartTimer = setTimeout(() => { chartTimer = null; renderCharts(); }, 250);
  seen();
}

function follow() {
  const es = new EventSource("/api/v1/events");
  es.addEventListener("snapshot", onSnapshot);
  es.addEventListener("delta", onDelta);
  es.addEventListener("sample", onSample);
  es.onopen = () => { $("live").textContent = "live"; $("live").className = "live-on"; };
  es.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live-off"; };
}

fetch("/api/v1/fleet")
  .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
  .then((view) => { applyView(view); renderAll(); })
  .catch((e) => { $("live").textContent = `fleet not read: ${e.message}`; })
  .finally(follow);

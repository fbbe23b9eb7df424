// harmony monitor: renders the snapshots that /api/stream sends (server-sent events). No library:
// tables are built from strings (every value escaped), charts are inline SVG.
"use strict";

let snap = null;
let skew = 0; // browser clock minus monitor clock (s)

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;"}[c]));
const now = () => Date.now() / 1000 - skew;

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let k = 0;
  while (n >= 1000 && k < units.length - 1) { n /= 1000; k++; }
  return `${n.toFixed(n < 10 && k ? 1 : 0)} ${units[k]}`;
}

function ago(t) {
  if (t === null || t === undefined) return "–";
  const s = Math.max(0, now() - t);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

const secs = (v, digits = 2) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(digits)} s`);

function renderHeader(s) {
  const src = $("#source");
  if (s.source.up) {
    src.textContent = `${s.source.name}: live`;
    src.className = "badge up";
  } else {
    src.textContent = s.source.name.startsWith("redis") || (s.source.error || "").startsWith("stack down")
      ? "stack down" : "waiting for the run";
    src.title = s.source.error || "";
    src.className = "badge down";
  }
  const run = s.run;
  $("#run").textContent = run.name || run.id
    ? `${run.name || "run " + String(run.id).slice(0, 8)}${run.algorithm ? " · " + run.algorithm : ""}` +
      `${run.runtime ? " · " + run.runtime : ""} · ${run.state || ""}` : "";
  const cur = s.current;
  $("#round-counter").textContent = cur ? `round ${cur.round} / ${run.rounds || "?"}` : "no round yet";
  $("#round-counter").dataset.round = cur ? cur.round : 0;
}

function renderCurrent(s) {
  const cur = s.current;
  if (!cur) { $("#current").innerHTML = '<p class="empty">waiting for a round…</p>'; return; }
  const total = Math.max(cur.sessions_total, cur.counts.done + cur.counts.late + cur.counts.dropped, 1);
  const pct = (n) => `${(100 * n / total).toFixed(1)}%`;
  let deadline = "–";
  if (cur.deadline && cur.state === "running") {
    const left = cur.deadline - now();
    deadline = left > 0 ? `${left.toFixed(0)} s left` : "passed";
  }
  const rec = cur.record;
  $("#current").innerHTML = `
    <div class="kv">
      <b>round</b><span>${esc(cur.round)} (${esc(cur.state)}${cur.attempt ? ", try " + (cur.attempt + 1) : ""})</span>
      <b>sessions</b><span id="sessions-done">${cur.counts.done} / ${cur.sessions_total || "?"} done</span>
      <b>deadline</b><span id="deadline">${deadline}</span>
      <b>stragglers</b><span>${cur.stragglers.length ? esc(cur.stragglers.join(", ")) : "none"}</span>
      <b>dropouts</b><span>${cur.dropouts.length ? esc(cur.dropouts.join(", ")) : "none"}</span>
      ${rec ? `<b>loss exit/server</b><span>${rec.train_loss_exit.toFixed(3)} / ${rec.train_loss_server.toFixed(3)}</span>
      <b>acc exit/server</b><span>${(100 * rec.train_acc_exit).toFixed(1)}% / ${(100 * rec.train_acc_server).toFixed(1)}%</span>` : ""}
    </div>
    <div class="bar" title="done / late / dropped">
      <span class="done" style="width:${pct(cur.counts.done)}"></span>
      <span class="late" style="width:${pct(cur.counts.late)}"></span>
      <span class="dropped" style="width:${pct(cur.counts.dropped)}"></span>
    </div>`;
}

function renderFleet(s) {
  $("#fleet-count").textContent = `(${s.devices_online} of ${s.devices.length} online)`;
  $("#fleet tbody").innerHTML = s.devices.map((d) => `
    <tr data-device="${esc(d.device)}" class="${esc(d.state)}">
      <td>${esc(d.device)}${d.client !== null ? ` <span class="muted">client ${d.client}</span>` : ""}</td>
      <td>${esc(d.device_class || d.profile || "–")}</td>
      <td class="num">${d.split_depth ?? "–"}</td>
      <td class="status ${esc(d.state)}" title="${esc(d.refused || d.detail || "")}">${esc(d.state)}</td>
      <td class="seen" data-t="${d.last_seen ?? ""}">${ago(d.last_seen)}</td>
      <td class="num">${d.step_s === null ? "–" : (d.step_s * 1000).toFixed(0) + " ms"}</td>
      <td class="num">${bytes(d.bytes_up)}</td>
      <td class="num">${bytes(d.bytes_down)}</td>
      <td>${esc(d.agent_version || "–")}</td>
      <td class="num">${d.sessions.done} / ${d.sessions.late} / ${d.sessions.dropped}</td>
    </tr>`).join("") || '<tr><td colspan="10" class="empty">no device registered yet</td></tr>';
}

function renderDepths(s) {
  $("#depths tbody").innerHTML = s.depths.map((g) => `
    <tr><td class="num">${g.split_depth}</td><td class="num">${g.devices}</td><td class="num">${g.online}</td>
      <td class="num">${g.step_s === null ? "–" : (g.step_s * 1000).toFixed(0) + " ms"}</td>
      <td class="num">${g.sessions.done} / ${g.sessions.late} / ${g.sessions.dropped}</td>
      <td class="num">${bytes(g.bytes_up)}</td><td class="num">${bytes(g.bytes_down)}</td></tr>`).join("")
    || '<tr><td colspan="7" class="empty">no split depths known yet</td></tr>';
}

function lineChart(el, rounds, series, opts) {
  const pts = rounds.filter((r) => r.record);
  if (!pts.length) { el.innerHTML = '<p class="empty">no finished round yet</p>'; return; }
  const W = 560, H = 220, L = 48, R = 12, T = 12, B = 34;
  const xs = pts.map((r) => r.round);
  const vals = pts.flatMap((r) => series.map((s) => s.value(r.record))).filter((v) => Number.isFinite(v));
  let lo = opts.min ?? Math.min(...vals), hi = opts.max ?? 1.1 * Math.max(...vals);
  if (hi - lo < 1e-9) hi = lo + 1;
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const X = (x) => L + (x1 === x0 ? (W - L - R) / 2 : (x - x0) * (W - L - R) / (x1 - x0));
  const Y = (y) => T + (hi - y) * (H - T - B) / (hi - lo);
  let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(opts.label)}">`;
  for (let k = 0; k <= 4; k++) {
    const v = lo + k * (hi - lo) / 4, y = Y(v);
    svg += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="#e3e6eb"/>` +
           `<text x="${L - 6}" y="${y + 4}" text-anchor="end">${v.toFixed(opts.digits)}</text>`;
  }
  const step = Math.max(1, Math.ceil(xs.length / 12));
  xs.forEach((x, k) => {
    if (k % step === 0 || k === xs.length - 1) svg += `<text x="${X(x)}" y="${H - B + 16}" text-anchor="middle">${x}</text>`;
  });
  svg += `<text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">round</text>`;
  series.forEach((s, k) => {
    const d = pts.map((r, i) => `${i ? "L" : "M"}${X(r.round).toFixed(1)},${Y(s.value(r.record)).toFixed(1)}`).join("");
    svg += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"/>`;
    pts.forEach((r) => { svg += `<circle cx="${X(r.round)}" cy="${Y(s.value(r.record))}" r="3" fill="${s.color}"/>`; });
    svg += `<rect x="${L + 8 + k * 110}" y="${T}" width="12" height="3" fill="${s.color}"/>` +
           `<text x="${L + 24 + k * 110}" y="${T + 5}">${esc(s.name)}</text>`;
  });
  el.innerHTML = svg + "</svg>";
}

function renderTimeline(s) {
  const el = $("#timeline");
  const rounds = s.rounds.filter((r) => r.sessions.length).slice(-30);
  if (!rounds.length) { el.innerHTML = '<p class="empty">no session finished yet</p>'; return; }
  const names = [...new Set([...s.devices.map((d) => d.device), ...rounds.flatMap((r) => r.sessions.map((x) => x.device))])];
  const L = 110, T = 22, cw = Math.max(34, Math.min(70, 1100 / rounds.length)), ch = 20;
  const W = L + cw * rounds.length + 10, H = T + ch * names.length + 6;
  let svg = `<svg viewBox="0 0 ${W} ${H}" style="max-width:${W}px" role="img" aria-label="sessions per device and round">`;
  rounds.forEach((r, c) => { svg += `<text x="${L + c * cw + cw / 2}" y="14" text-anchor="middle">r${r.round}</text>`; });
  names.forEach((n, k) => { svg += `<text x="${L - 8}" y="${T + k * ch + 14}" text-anchor="end">${esc(n)}</text>`; });
  rounds.forEach((r, c) => {
    const done = r.sessions.filter((x) => x.outcome === "done" && x.seconds !== null).map((x) => x.seconds);
    const lo = Math.min(...done), hi = Math.max(...done);
    r.sessions.forEach((x) => {
      const k = names.indexOf(x.device);
      let fill = "#c62828", label = "drop";
      if (x.outcome === "late") { fill = "#b35900"; label = "late"; }
      if (x.outcome === "done") {
        const f = x.seconds === null || hi - lo < 1e-9 ? 0.5 : (x.seconds - lo) / (hi - lo);
        fill = `hsl(142, 45%, ${78 - 45 * f}%)`;
        label = x.seconds === null ? "ok" : x.seconds.toFixed(1);
      }
      svg += `<g><title>${esc(x.device)} round ${r.round}: ${esc(x.outcome)}${x.seconds !== null ? " " + x.seconds.toFixed(2) + " s" : ""}</title>` +
             `<rect x="${L + c * cw + 1}" y="${T + k * ch + 1}" width="${cw - 2}" height="${ch - 2}" rx="3" fill="${fill}"/>` +
             `<text x="${L + c * cw + cw / 2}" y="${T + k * ch + 14}" text-anchor="middle" ` +
             `style="fill:${x.outcome === "done" ? "#111" : "#fff"}">${label}</text></g>`;
    });
  });
  el.innerHTML = svg + "</svg>";
}

function renderLog(s) {
  $("#log").innerHTML = s.log.map((e) => `<li class="${esc(e.level)}" data-event="${esc(e.event)}">` +
    `<time>${new Date(e.t * 1000).toLocaleTimeString()}</time>${esc(e.text)}</li>`).join("")
    || '<li class="empty">nothing yet</li>';
}

function render(s) {
  snap = s;
  skew = Date.now() / 1000 - s.now;
  renderHeader(s);
  renderCurrent(s);
  renderFleet(s);
  renderDepths(s);
  lineChart($("#accuracy-chart"), s.rounds, [
    {name: "exit head", color: "#2563eb", value: (r) => 100 * r.train_acc_exit},
    {name: "server head", color: "#d97706", value: (r) => 100 * r.train_acc_server},
  ], {label: "train accuracy per round", digits: 0, min: 0, max: 100});
  lineChart($("#loss-chart"), s.rounds, [
    {name: "exit head", color: "#2563eb", value: (r) => r.train_loss_exit},
    {name: "server head", color: "#d97706", value: (r) => r.train_loss_server},
  ], {label: "train loss per round", digits: 2, min: 0});
  renderTimeline(s);
  renderLog(s);
}

function tick() { // the clocks move between snapshots
  if (!snap) return;
  document.querySelectorAll("#fleet td.seen").forEach((td) => {
    td.textContent = ago(td.dataset.t === "" ? null : Number(td.dataset.t));
  });
  renderCurrent(snap);
}

function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
  source.onerror = () => { // EventSource reconnects by itself
    const src = $("#source");
    src.textContent = "monitor unreachable";
    src.className = "badge down";
  };
}

connect();
setInterval(tick, 1000);

// The federation page: follows /events (server-sent events) and draws the board.
// Everything is drawn here as inline SVG and DOM text; nothing is fetched from elsewhere,
// and no text from the server is ever parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#e45756", "#54a24b", "#b279a2", "#f58518", "#72b7b2", "#eeca3b", "#ff9da6", "#9d755d"];

const board = { members: [], laps: [] };

function merge(update) {
  const hops = new Map(board.members.map((m) => [m.id, m.hops]));
  for (const m of update.members) {
    const before = (hops.get(m.id) || []).slice(0, m.hops_from);
    m.hops = before.concat(m.hops);
  }
  const laps = board.laps.slice(0, update.laps_from).concat(update.laps);
  Object.assign(board, update);
  board.laps = laps;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function clock(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const mm = h ? String(m).padStart(2, "0") : String(m);
  return (h ? h + ":" : "") + mm + ":" + String(r).padStart(2, "0");
}

function fixed(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function lapName(lap) {
  return lap === -1 ? "initial" : String(lap);
}

function short(id) {
  const m = board.members.find((x) => x.id === id);
  return m ? m.short : id ? "…" + id.slice(-8) : "";
}

function set(id, text) {
  document.getElementById(id).textContent = text;
}

function drawFigures() {
  const p = board.progress;
  set("run", board.run_id ? "run " + board.run_id.slice(0, 8) : "");
  set("stage", board.stage + (board.me ? " · this peer " + short(board.me) : ""));
  const sorted = board.laps.slice().sort((a, b) => a[0] - b[0]);
  const last = sorted[sorted.length - 1];
  if (board.outcome.stop_reason && last) {
    set("lap", lapName(last[0]));
    set("lap-of", `the last; ${board.outcome.stop_reason}`);
  } else if (p.max_laps && p.lap !== null && p.lap >= p.max_laps) {
    set("lap", String(p.lap));
    set("lap-of", "evaluating the last lap's output");
  } else {
    set("lap", p.lap === null ? "–" : String(p.lap));
    set("lap-of", p.max_laps && p.lap !== null ? `${p.lap + 1} of at most ${p.max_laps}` : "");
  }
  set("loss", last ? fixed(last[1], 4) : "–");
  set("loss-lap", last ? "lap " + lapName(last[0]) : "after the first lap");
  set("best", p.best_lap === null ? "–" : lapName(p.best_lap));
  set("best-loss", p.best_loss === null ? "" : fixed(p.best_loss, 4));
  set("patience", p.patience_left === null ? "–" : String(p.patience_left));
  set("patience-of", p.patience ? "of " + p.patience : "");
  set("elapsed", p.elapsed === null ? "–" : clock(p.elapsed));
  let eta = p.eta === null ? "" : "at most ~" + clock(p.eta) + " more";
  if (p.elapsed === null) eta = "read from the run's files";
  set("eta", eta);
}

function drawRing() {
  const box = document.getElementById("ring");
  const size = 360, c = size / 2, r = size / 2 - 64;
  const root = svg("svg", { viewBox: `0 0 ${size} ${size}`, role: "img", "aria-label": "the ring" });
  root.appendChild(svg("circle", { cx: c, cy: c, r: r, class: "track" }));
  const n = board.members.length;
  const holder = board.model ? board.model.holder : null;
  const labels = n <= 16;
  if (n > 1 && n <= 64) {
    // Which way the model goes: a small arrowhead between each member and the next.
    for (let i = 0; i < n; i++) {
      const a = -Math.PI / 2 + (2 * Math.PI * (i + 0.5)) / n;
      const px = c + r * Math.cos(a), py = c + r * Math.sin(a);
      const tx = -Math.sin(a), ty = Math.cos(a), nx = Math.cos(a), ny = Math.sin(a);
      const pts = [[px + 6 * tx, py + 6 * ty], [px - 4 * tx + 4 * nx, py - 4 * ty + 4 * ny],
        [px - 4 * tx - 4 * nx, py - 4 * ty - 4 * ny]];
      root.appendChild(svg("polygon", { points: pts.map((q) => q.map((v) => v.toFixed(1)).join(",")).join(" "), class: "arrow" }));
    }
  }
  board.members.forEach((m, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, n);
    const x = c + r * Math.cos(a), y = c + r * Math.sin(a);
    let cls = "member";
    if (m.me) cls += " me";
    if (m.dead) cls += " dead";
    if (m.id === holder) cls += " holder";
    const dot = svg("circle", { cx: x, cy: y, r: n > 64 ? 3 : 9, class: cls, "data-id": m.id });
    dot.appendChild(svg("title", {}, `${i}: ${m.id}${m.dead ? " (dead: " + m.dead + ")" : ""}`));
    root.appendChild(dot);
    if (labels) {
      const lx = c + (r + 24) * Math.cos(a), ly = c + (r + 24) * Math.sin(a);
      root.appendChild(svg("text", { x: lx, y: ly + 4, "text-anchor": "middle", class: "label" }, m.short));
    }
  });
  if (holder && n) {
    const i = board.members.findIndex((m) => m.id === holder);
    if (i >= 0) {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
      const x = c + (r - 26) * Math.cos(a), y = c + (r - 26) * Math.sin(a);
      root.appendChild(svg("circle", { cx: x, cy: y, r: 7, class: "model" }));
    }
  }
  if (n) {
    root.appendChild(svg("text", { x: c, y: c - 4, "text-anchor": "middle", class: "centre" }, `${n} members`));
    const m = board.model;
    const where = m ? (m.doing === "final" ? "final model saved" : `lap ${m.lap} hop ${m.hop}`) : "waiting";
    root.appendChild(svg("text", { x: c, y: c + 14, "text-anchor": "middle", class: "centre note" }, where));
  }
  box.replaceChildren(root);
  const m = board.model;
  let text = "";
  if (m && m.doing !== "final") {
    const verbs = { training: "trains", trained: "trained", sent: "was handed the model for" };
    text = `model: ${short(m.holder)} ${verbs[m.doing] || m.doing} lap ${m.lap} hop ${m.hop} (as last seen here)`;
  } else if (m) {
    text = "the run is over: every member saves the final model";
  }
  set("place", text);
}

function drawCurve() {
  const box = document.getElementById("curve");
  const w = 640, h = 300, left = 52, right = 12, top = 12, bottom = 34;
  const laps = board.laps.filter((l) => l[1] !== null).sort((a, b) => a[0] - b[0]);
  const n = Math.max(1, board.members.length);
  const dots = [];
  board.members.forEach((m, i) => {
    for (const [lap, hop, loss] of m.hops) if (loss !== null) dots.push([lap + (hop + 0.5) / n, loss, i]);
  });
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": "loss by lap", "data-laps": laps.length, "data-hops": dots.length });
  const xs = laps.map((l) => l[0]).concat(dots.map((d) => d[0]));
  const ys = laps.map((l) => l[1]).concat(dots.map((d) => d[1]));
  if (!xs.length) {
    root.appendChild(svg("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "note" }, "no lap yet"));
    box.replaceChildren(root);
    return;
  }
  let x0 = Math.min(-1, ...xs), x1 = Math.max(x0 + 1, ...xs, board.progress.lap || 0);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - right);
  const Y = (y) => top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom);
  root.appendChild(svg("line", { x1: left, y1: h - bottom, x2: w - right, y2: h - bottom, class: "axis" }));
  root.appendChild(svg("line", { x1: left, y1: top, x2: left, y2: h - bottom, class: "axis" }));
  for (let k = 0; k <= 4; k++) {
    const y = y0 + ((y1 - y0) * k) / 4;
    root.appendChild(svg("text", { x: left - 6, y: Y(y) + 4, "text-anchor": "end", class: "tick" }, y.toFixed(3)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = Math.ceil(x0); x <= x1; x += step) {
    root.appendChild(svg("text", { x: X(x), y: h - bottom + 16, "text-anchor": "middle", class: "tick" }, String(x)));
  }
  root.appendChild(svg("text", { x: (left + w - right) / 2, y: h - 4, "text-anchor": "middle", class: "tick" }, "lap"));
  for (const [x, y, i] of dots) {
    root.appendChild(svg("circle", { cx: X(x), cy: Y(y), r: 2.5, class: "hop", fill: COLOURS[i % COLOURS.length] }));
  }
  if (laps.length) {
    const d = laps.map((l, k) => (k ? "L" : "M") + X(l[0]).toFixed(1) + " " + Y(l[1]).toFixed(1)).join(" ");
    root.appendChild(svg("path", { d: d, class: "federated" }));
    for (const l of laps) {
      const dot = svg("circle", { cx: X(l[0]), cy: Y(l[1]), r: 3.5, class: "lap", "data-lap": l[0] });
      dot.appendChild(svg("title", {}, `lap ${lapName(l[0])}: ${fixed(l[1], 4)}`));
      root.appendChild(dot);
    }
    const best = board.progress.best_lap;
    const b = laps.find((l) => l[0] === best);
    if (b) root.appendChild(svg("circle", { cx: X(b[0]), cy: Y(b[1]), r: 7, class: "best" }));
  }
  box.replaceChildren(root);
}

function drawMembers() {
  const body = document.querySelector("#members tbody");
  const rows = board.members.slice(0, 200).map((m, i) => {
    const tr = el("tr", null, m.dead ? "dead" : "");
    const swatch = el("span", "●", "swatch");
    swatch.style.color = COLOURS[i % COLOURS.length];
    const who = el("td");
    who.append(swatch, " ", el("span", m.short));
    who.title = m.id;
    const notes = [];
    if (m.me) notes.push("this peer");
    if (m.id === board.leader) notes.push("leader");
    if (m.id === (board.model && board.model.holder)) notes.push("holds the model");
    if (m.dead) notes.push("dead: " + m.dead);
    if (m.excluded) notes.push("excluded");
    if (m.finished) notes.push("saved the model");
    tr.append(el("td", i), who, el("td", m.addresses.join(", ")), el("td", notes.join(", ")));
    return tr;
  });
  if (board.members.length > 200) rows.push(el("tr", `… and ${board.members.length - 200} more`));
  body.replaceChildren(...rows);
}

function drawLaps() {
  const body = document.querySelector("#laps tbody");
  const best = board.progress.best_lap;
  const laps = board.laps.slice().sort((a, b) => b[0] - a[0]).slice(0, 12);
  body.replaceChildren(...laps.map((l) => {
    const tr = el("tr", null, l[0] === best ? "best" : "");
    tr.dataset.lap = l[0];
    tr.append(el("td", lapName(l[0])), el("td", fixed(l[1], 4)),
      el("td", l[2] === null ? "–" : (100 * l[2]).toFixed(1) + "%"), el("td", fixed(l[3], 3)));
    return tr;
  }));
}

function rows(id, pairs) {
  document.querySelector(`#${id} tbody`).replaceChildren(...pairs.map(([k, v]) => {
    const tr = el("tr");
    tr.append(el("th", k), el("td", v));
    return tr;
  }));
}

function drawSettings() {
  const s = board.settings || {};
  const keys = ["max_laps", "patience", "tolerance", "local_epochs", "lr", "batch_size", "seed"];
  rows("settings", keys.filter((k) => k in s).map((k) => [k.replace("_", " "), String(s[k])]));
  const o = board.outcome;
  const out = [["stop reason", o.stop_reason || (board.live ? "still running" : "none")]];
  if (o.ended_by) out.push(["ended by", short(o.ended_by)]);
  if (o.model_sha256) out.push(["model sha256", o.model_sha256.slice(0, 16) + "…"]);
  for (const [peer, why] of Object.entries(o.failures || {})) out.push(["failed on " + short(peer), why]);
  rows("outcome", out);
}

function drawFiles() {
  const list = document.getElementById("files");
  if (!board.files.length) {
    list.replaceChildren(el("li", "none yet", "note"));
    return;
  }
  list.replaceChildren(...board.files.map((name) => {
    const li = el("li");
    const a = el("a", name);
    a.href = "files/" + encodeURIComponent(name);
    li.append(a);
    return li;
  }));
}

function draw() {
  drawFigures();
  drawRing();
  drawCurve();
  drawMembers();
  drawLaps();
  drawSettings();
  drawFiles();
}

function status(text) {
  set("status", text);
}

const source = new EventSource("events");
source.addEventListener("board", (e) => {
  merge(JSON.parse(e.data));
  draw();
  status(board.live ? "live" : "");
});
source.addEventListener("end", () => {
  source.close();
  status(board.live ? "" : "the run's last state (nothing more will change)");
});
source.onerror = () => {
  if (source.readyState === EventSource.CLOSED) status("disconnected: the peer has stopped");
  else status("reconnecting… (the peer may have stopped)");
};

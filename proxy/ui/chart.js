// dpicl admin console: the budgets page's chart (uPlot) and the budget history it draws, read from
// the admin audit log. Loaded before console.js, which provides optional(), el() and `charts`.
"use strict";

// The admin audit log, newest first, up to `pages` pages; only `actions` are kept. Null on a
// server without an audit log.
async function auditRecords(actions, pages = 5) {
  const out = [];
  let before = null;
  for (let i = 0; i < pages; i++) {
    const data = await optional(`/admin/audit?limit=1000${before ? `&before=${before}` : ""}`);
    if (!data) return i ? out : null;
    out.push(...data.data.filter((e) => actions.includes(e.action)));
    if (data.data.length < 1000) break;
    before = Math.min(...data.data.map((e) => e.seq));
  }
  return out;
}

// A name's budget over time, oldest first: [[time, epsilon], ...]. The audit log records each
// "budget.set" (and the budget a name's first upload set); before the oldest record we know of,
// the budget is taken to be that record's value, or today's when the log has none.
function budgetSteps(name, history, today) {
  const changes = [];
  for (const e of (history || []).slice().reverse()) {   // oldest first
    if (e.target !== name) continue;
    const d = e.details || {};
    if (e.action === "budget.set" && typeof d.epsilon === "number") changes.push([e.time, d.epsilon]);
    else if (e.action === "dataset.upload" && d.new_name && typeof d.budget_epsilon === "number") changes.push([e.time, d.budget_epsilon]);
  }
  if (!changes.length) return [[null, today]];
  return changes;
}

// Value of a step function at time t: the last [time, value] at or before t (the first value before it).
function stepAt(steps, t) {
  let v = steps[0][1];
  for (const [time, value] of steps) if (time === null || time <= t) v = value;
  return v;
}

function chart(name, ledger, budgets) {
  // Every ledger entry moves the spent epsilon: charges up, a reset back to where composition restarts.
  const entries = ledger.filter((e) => typeof e.epsilon_after === "number" || e.kind === "reset");
  const charges = entries.filter((e) => e.kind !== "reset");
  const today = budgets[budgets.length - 1][1];
  const box = el("div", { class: "chart", dataset: { chart: name, points: String(charges.length),
    budgets: budgets.map(([, v]) => v).join(","), shape: "steps" } });
  if (!charges.length) { box.append(el("p", { class: "muted" }, "No spending yet.")); return box; }
  // One x per distinct time (charges of one warm-up share a timestamp: the last value counts), then
  // the budget's changes, a start at zero and "now", so that the steps reach the present.
  const spentAt = new Map();
  for (const e of entries) spentAt.set(e.time, e.kind === "reset" ? (e.epsilon_after ?? 0) : e.epsilon_after);
  const first = Math.min(...spentAt.keys());
  const now = Math.max(Date.now() / 1000, ...spentAt.keys());
  // From the budget's first known value (the upload) or just before the first charge, to now.
  const start = Math.min(first - 1, ...budgets.filter(([t]) => t !== null).map(([t]) => t));
  const times = new Set([start, ...spentAt.keys(), now]);
  for (const [t] of budgets) if (t !== null && t >= start && t < now) times.add(t);
  const xs = [...times].sort((a, b) => a - b);
  let spent = 0;
  const ys = xs.map((t) => (spent = spentAt.has(t) ? spentAt.get(t) : (t < first ? 0 : spent)));
  const bs = xs.map((t) => stepAt(budgets, t));
  const steps = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;
  const opts = {
    width: Math.min(1100, (document.getElementById("page").clientWidth || 900) - 20), height: 240,
    scales: {
      x: { time: true, range: (u, lo, hi) => (hi - lo < 60 ? [lo - 30, hi + 30] : [lo, hi]) },  // never a zero-width box
      y: { range: (u, lo, hi) => [0, Math.max(hi, ...bs) * 1.1] },
    },
    series: [{}, { label: "ε spent", stroke: "#2357a6", width: 2, paths: steps, points: { show: true, size: 7 } },
             { label: "budget", stroke: "#b3261e", dash: [6, 4], width: 1.5, paths: steps, points: { show: false } }],
    axes: [{}, { label: "ε" }],
  };
  requestAnimationFrame(() => charts.push(new uPlot(opts, [xs, ys, bs], box)));
  return box;
}

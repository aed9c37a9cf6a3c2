// dpicl admin console: plain JavaScript, no build step. Every call goes through the admin API
// with the admin key the user typed, kept in this tab's sessionStorage only. Data is always put
// into the page as text (never as HTML), and no endpoint used here returns private rows; the
// demonstrations shown are differentially private output.
"use strict";

const KEY_STORE = "dpicl-admin-key";
const FINISHED = new Set(["done", "failed", "cancelled", "lost", "succeeded"]);
let timer = null;           // the current page's refresh timer
let charts = [];            // uPlot instances of the current page

// -- small DOM helpers ---------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const fmt = (x, digits = 3) => (x === null || x === undefined) ? "-" :
  (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(digits)) : String(x));
const eps = (x) => (x === null || x === undefined) ? "-" : Number(x).toFixed(3);   // epsilons: always 3 decimals
const sci = (x) => (x === null || x === undefined) ? "-" : Number(x).toExponential(1);   // deltas
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "-";
const status = (msg, cls) => { const s = document.getElementById("status"); s.textContent = msg || ""; s.className = cls || ""; };

function table(columns, rows, empty) {
  if (!rows.length) return el("p", { class: "muted" }, empty || "nothing yet");
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(([h]) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, columns.map(([, f]) => {
      const v = f(r);
      return el("td", { class: typeof v === "number" ? "num" : null }, v instanceof Node ? v : fmt(v));
    })))));
}

function bar(done, total, over) {
  const pct = total ? Math.min(100, 100 * done / total) : 0;
  const b = el("div", { class: "bar" + (over ? " over" : ""), title: `${fmt(pct, 0)}%` }, el("span"));
  b.firstChild.style.width = `${pct}%`;
  return b;
}

// -- the admin API ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORE) || ""}` };
  const init = { method, headers };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let resp;
  try { resp = await fetch(path, init); }
  catch (e) { throw new ApiError(0, "cannot reach the server"); }
  let data = null;
  const text = await resp.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!resp.ok) {
    const msg = (data && data.error && data.error.message) || `HTTP ${resp.status}`;
    if (resp.status === 401 || resp.status === 403) signOut(`The server refused the key: ${msg}`);
    throw new ApiError(resp.status, msg);
  }
  return { status: resp.status, data };
}

// Routes added by newer servers: a 404 means "not available here", not an error.
async function optional(path) {
  try { return (await api("GET", path)).data; }
  catch (e) { if (e.status === 404 || e.status === 405) return null; throw e; }
}

async function download(path, filename) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORE)}` } });
  if (!resp.ok) { status(`download failed: HTTP ${resp.status}`, "error"); return; }
  const url = URL.createObjectURL(await resp.blob());
  const a = el("a", { href: url, download: filename });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function guarded(fn) {
  return async (ev) => {
    if (ev && ev.preventDefault) ev.preventDefault();
    try { await fn(ev); } catch (e) { status(e.message, "error"); }
  };
}

// -- pages ---------------------------------------------------------------------------------------------
const pages = {
  async datasets(page) {
    const list = (await api("GET", "/admin/datasets")).data.data;
    const form = el("form", { class: "inline", id: "upload-form" },
      el("label", {}, "File (JSONL or CSV)", el("input", { type: "file", name: "file", required: true, accept: ".jsonl,.json,.ndjson,.csv" })),
      el("label", {}, "Name", el("input", { name: "name", required: true, placeholder: "trec" })),
      el("label", {}, "Labels (comma-separated)", el("input", { name: "labels", placeholder: "LOC,NUM,HUM" })),
      el("label", {}, "Epsilon budget", el("input", { name: "epsilon", type: "number", step: "any", min: "0" })),
      el("label", {}, "Delta", el("input", { name: "delta", type: "number", step: "any", min: "0" })),
      el("label", {}, "Public data", el("input", { name: "public", type: "checkbox", value: "true" })),
      el("button", { type: "submit" }, "Upload"));
    form.addEventListener("submit", guarded(async () => {
      const fd = new FormData(form);
      for (const k of ["labels", "epsilon", "delta"]) if (!fd.get(k)) fd.delete(k);
      const r = (await api("POST", "/admin/datasets", fd)).data;
      status(`uploaded ${r.name} v${r.version}: ${r.rows} rows`, "ok");
      await show("datasets");
    }));
    page.append(el("h2", {}, "Datasets"), form, table([
      ["id", (d) => d.id], ["name", (d) => d.name], ["version", (d) => d.version], ["rows", (d) => d.rows],
      ["privacy units", (d) => d.units], ["label domain", (d) => (d.labels || []).join(", ")],
      ["public", (d) => d.public ? "yes" : "no"], ["uploaded", (d) => when(d.created_at)],
      ["", (d) => el("button", { class: "danger", type: "button", onclick: guarded(async () => {
        if (!confirm(`Delete ${d.name} v${d.version}? Its ledger stays.`)) return;
        await api("DELETE", `/admin/datasets/${encodeURIComponent(d.id)}`);
        await show("datasets");
      }) }, "Delete")],
    ], list, "No datasets yet: upload one above."));
  },

  async budgets(page) {
    const list = (await api("GET", "/admin/budget")).data.data;
    const history = await auditRecords(["budget.set", "dataset.upload"]);
    page.append(el("h2", {}, "Budgets"));
    const names = list.map((b) => b.name || b.dataset_id);
    const form = el("form", { class: "inline", id: "budget-form" },
      el("label", {}, "Dataset", el("select", { name: "name" }, names.map((n) => el("option", { value: n }, n)))),
      el("label", {}, "Epsilon budget", el("input", { name: "epsilon", type: "number", step: "any", min: "0", required: true })),
      el("label", {}, "Delta (optional)", el("input", { name: "delta", type: "number", step: "any", min: "0" })),
      el("button", { type: "submit" }, "Set budget"));
    form.addEventListener("submit", guarded(async () => {
      const fd = new FormData(form);
      const body = { epsilon: Number(fd.get("epsilon")) };
      if (fd.get("delta")) body.delta = Number(fd.get("delta"));
      await api("PUT", `/admin/budget/${encodeURIComponent(fd.get("name"))}`, body);
      status(`budget of ${fd.get("name")} set to ${body.epsilon}`, "ok");
      await show("budgets");
    }));
    page.append(form);
    if (!list.length) { page.append(el("p", { class: "muted" }, "No datasets yet.")); return; }
    const cards = el("div", { class: "cards" });
    page.append(cards);
    for (const b of list) {
      const name = b.name || b.dataset_id;
      const full = await optional(`/admin/budget/${encodeURIComponent(name)}`);
      const budget = b.epsilon_budget ?? b.budget_epsilon, spent = b.epsilon_spent ?? b.spent_epsilon ?? 0;
      cards.append(el("div", { class: "card", dataset: { name } },
        el("h3", {}, name),
        el("div", { class: "big" }, `ε ${eps(spent)} / ${eps(budget)}`),
        bar(spent, budget, spent > budget),
        el("p", { class: "muted" }, `remaining ${eps(b.epsilon_remaining ?? b.remaining_epsilon)}, δ ${sci(b.delta_budget ?? b.budget_delta)}, `,
          `${b.events ?? "-"} charges, versions: ${(b.versions || []).join(", ") || "-"}`)));
      page.append(el("h3", {}, `ε spent over time: ${name}`));
      page.append(chart(name, (full && full.ledger) || [], budgetSteps(name, history, budget)));
      // Spent epsilon per partition: "*" (whole dataset), a label, or "label#j" (cluster j of a
      // label, generation.clusters); "version/partition" once several versions were charged.
      const parts = Object.entries(b.partitions || b.per_partition || {});
      if (parts.length) {
        page.append(el("h3", {}, `ε spent per partition: ${name}`),
          el("div", { class: "partitions", dataset: { partitions: name } },
            table([["partition", ([p]) => p], ["spent ε", ([, v]) => eps(v)]], parts)));
      }
    }
    page.append(el("h3", {}, "Reset a budget"), resetForm(names));
  },

  async audit(page, before) {
    const q = before ? `?limit=50&before=${before}` : "?limit=50";
    const data = await optional(`/admin/audit${q}`);
    page.append(el("h2", {}, "Audit log"));
    if (!data) { page.append(el("p", { class: "muted" }, "This server has no audit log.")); return; }
    const rows = data.data;
    page.append(table([
      ["#", (e) => e.seq], ["time", (e) => when(e.time)], ["actor", (e) => e.actor], ["action", (e) => e.action],
      ["target", (e) => e.target],
      ["details", (e) => Object.entries(e.details || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")],
    ], rows, "No admin actions yet."));
    if (rows.length === 50) {
      const oldest = Math.min(...rows.map((e) => e.seq));
      page.append(el("button", { class: "secondary", type: "button", onclick: guarded(async () => {
        const p = fresh(); await pages.audit(p, oldest);
      }) }, "Older"));
    }
  },

  async tasks(page) {
    page.append(el("h2", {}, "Tasks"), await taskForm());
    const tasks = (await api("GET", "/admin/tasks")).data.data;
    const rows = [];
    for (const t of tasks) {
      // One task whose dataset is missing (or not uploaded yet) must not hide the others.
      let demos = { cached: false }, problem = taskProblem(t);
      try { demos = (await api("GET", `/admin/tasks/${encodeURIComponent(t.name)}/demos`)).data || demos; }
      catch (e) { if (e.status === 401 || e.status === 403) throw e; problem = problem || e.message; }
      rows.push({ t, demos, problem });
    }
    page.append(table([
      ["task", (r) => r.problem ? el("span", { class: "warn", dataset: { warning: r.t.name }, title: r.problem },
        "⚠ ", r.t.name) : r.t.name],
      ["dataset", (r) => r.t.dataset], ["upstream", (r) => r.t.upstream],
      ["target ε", (r) => eps(r.t.epsilon)], ["mode", (r) => (r.t.generation || {}).mode], ["source", (r) => r.t.source],
      ["cached set", (r) => r.problem ? el("span", { class: "warn" }, r.problem) :
        (r.demos.cached ? `ε ${eps((r.demos.demonstrations || {}).epsilon)}` : "none")],
      ["", (r) => el("span", {},
        el("button", { type: "button", class: "secondary", onclick: guarded(() => price(r.t.name)) }, "Price"), " ",
        el("button", { type: "button", dataset: { warm: r.t.name }, onclick: guarded(() => warm(r.t.name)) }, "Warm"))],
    ], rows, "No tasks yet: create one above."));
    for (const r of rows.filter((x) => x.demos.cached)) {
      const p = r.demos.demonstrations || {};
      page.append(el("h3", {}, `${r.t.name}: cached demonstrations (DP output)`),
        el("p", { class: "muted" }, `dataset ${p.dataset_id} v${p.dataset_version ?? "-"}, ε ${eps(p.epsilon)}, `,
          `δ ${sci(p.delta)}, ${p.tokens ?? "-"} tokens in ${fmt(p.seconds, 1)} s, made ${when(p.created_at)}`),
        ...(p.demos || []).map((d) => el("div", { class: "demo" }, el("strong", {}, d.label),
          d.cluster === undefined ? "" : ` (cluster ${d.cluster}, noisy size ${d.cluster_size})`, ": ", d.text)));
    }
  },

  async warmups(page) {
    const data = await optional("/admin/warmups");
    page.append(el("h2", {}, "Warm-ups"));
    if (!data) { page.append(el("p", { class: "muted" }, "This server runs warm-ups within the request (no list).")); return; }
    const list = data.data;
    page.append(table([
      ["id", (w) => w.id], ["task", (w) => w.task],
      // A running warm-up asked to stop says so until its generator reaches the next token.
      ["state", (w) => el("span", { dataset: { state: w.state, cancel: w.cancel_requested ? "requested" : "" } },
        w.state === "running" && w.cancel_requested ? "running (cancel requested)" : w.state)],
      ["progress", (w) => el("span", {}, bar(w.tokens_done || 0, w.tokens_total || 0), `${w.tokens_done || 0} / ${w.tokens_total || "?"} tokens`)],
      ["elapsed", (w) => w.seconds_elapsed === null || w.seconds_elapsed === undefined ? "-" : `${fmt(w.seconds_elapsed, 1)} s`],
      ["eta", (w) => w.eta_seconds === null || w.eta_seconds === undefined ? "-" : `${fmt(w.eta_seconds, 0)} s`],
      ["ε cost", (w) => eps(w.epsilon_cost)], ["started", (w) => when(w.created_at)],
      // A cancelled or lost warm-up keeps its charge (it may have read rows): the note says so.
      ["cost", (w) => w.note ? el("span", { class: w.charged ? "error" : "muted", dataset: { note: w.id } }, w.note) : ""],
      ["", (w) => w.error ? el("span", { class: "error" }, w.error.message) : (FINISHED.has(w.state) || w.cancel_requested ? "" :
        el("button", { class: "danger", type: "button", dataset: { cancel: w.id }, onclick: guarded(async () => {
          await api("POST", `/admin/warmups/${encodeURIComponent(w.id)}/cancel`); await show("warmups");
        }) }, "Cancel"))],
    ], list, "No warm-ups yet: warm a task on the Tasks page."));
    if (list.some((w) => !FINISHED.has(w.state))) refreshIn(1000);
  },

  async jobs(page) {
    const list = (await api("GET", "/admin/jobs")).data.data;
    page.append(el("h2", {}, "Jobs"), el("p", { class: "muted" }, "DP synthetic datasets (submit with dpicl jobs submit)."));
    // Dataset names from the listing (metadata only); a deleted version shows its id.
    let names = new Map();
    try { names = new Map((await api("GET", "/admin/datasets")).data.data.map((d) => [d.id, `${d.name} v${d.version}`])); }
    catch (e) { if (e.status === 401 || e.status === 403) throw e; }
    const datasetOf = (j) => j.dataset_name ? `${j.dataset_name}${j.dataset_version ? " v" + j.dataset_version : ""}` :
      names.get(j.dataset_id) || `${j.dataset_id} (deleted)`;
    page.append(table([
      ["id", (j) => j.id], ["kind", (j) => j.kind],
      ["dataset", (j) => el("span", { title: j.dataset_id, dataset: { jobDataset: j.id } }, datasetOf(j))], ["state", (j) => j.state],
      ["progress", (j) => el("span", {}, bar(j.progress || 0, 100), `${fmt(j.progress || 0, 0)}% ${j.step || ""}`)],
      ["ε charged", (j) => eps(j.epsilon_charged)], ["rows", (j) => j.rows], ["created", (j) => when(j.created_at)],
      ["", (j) => el("span", {},
        j.state === "succeeded" ? el("button", { type: "button", class: "secondary", onclick: guarded(() =>
          download(`/admin/jobs/${encodeURIComponent(j.id)}/result?part=synthetic`, `${j.id}.jsonl`)) }, "Synthetic data") : null,
        j.state === "succeeded" && j.kind === "dpsgd" ? el("button", { type: "button", class: "secondary", onclick: guarded(() =>
          download(`/admin/jobs/${encodeURIComponent(j.id)}/result?part=adapter`, `${j.id}-adapter.tar.gz`)) }, "Adapter") : null,
        FINISHED.has(j.state) ? null : el("button", { type: "button", class: "danger", onclick: guarded(async () => {
          await api("POST", `/admin/jobs/${encodeURIComponent(j.id)}/cancel`); await show("jobs");
        }) }, "Cancel"))],
    ], list, "No jobs yet."));
    if (list.some((j) => !FINISHED.has(j.state))) refreshIn(2000);
  },

  async keys(page) {
    const list = (await api("GET", "/admin/keys")).data.data;
    const form = el("form", { class: "inline", id: "key-form" },
      el("label", {}, "Name", el("input", { name: "name", required: true, placeholder: "app2" })),
      el("label", {}, "Tasks (comma-separated, * = all)", el("input", { name: "tasks", placeholder: "*" })),
      el("label", {}, "May call other models", el("input", { name: "passthrough", type: "checkbox", checked: true })),
      el("button", { type: "submit" }, "Create key"));
    const secret = el("div", { id: "new-key" });
    form.addEventListener("submit", guarded(async () => {
      const fd = new FormData(form);
      const tasks = String(fd.get("tasks") || "").split(",").map((s) => s.trim()).filter(Boolean);
      const r = (await api("POST", "/admin/keys", { name: fd.get("name"), tasks, passthrough: fd.get("passthrough") !== null })).data;
      await show("keys");
      document.getElementById("new-key").append(el("p", {}, `Key for ${r.name}, shown only now:`), el("p", { class: "secret" }, r.key));
    }));
    page.append(el("h2", {}, "Client keys"), form, secret, table([
      ["name", (k) => k.name], ["tasks", (k) => (k.tasks || []).join(", ") || "-"],
      ["other models", (k) => k.passthrough ? "yes" : "no"], ["source", (k) => k.source],
      ["key starts", (k) => k.key_prefix ? `${k.key_prefix}…` : "-"], ["created", (k) => when(k.created_at)],
      ["", (k) => k.source === "config" ? el("span", { class: "muted" }, "config file") :
        el("button", { class: "danger", type: "button", onclick: guarded(async () => {
          if (!confirm(`Delete client key ${k.name}?`)) return;
          await api("DELETE", `/admin/keys/${encodeURIComponent(k.name)}`); await show("keys");
        }) }, "Delete")],
    ], list, "No client keys."));
  },
};

// -- pieces of pages -----------------------------------------------------------------------------
function resetForm(names) {
  const form = el("form", { class: "inline", id: "reset-form" },
    el("label", {}, "Dataset", el("select", { name: "name" }, names.map((n) => el("option", { value: n }, n)))),
    el("label", {}, "Reason (kept in the audit log)", el("input", { name: "reason", required: true })),
    el("button", { type: "submit", class: "danger" }, "Reset spent ε"));
  form.addEventListener("submit", guarded(async () => {
    const fd = new FormData(form);
    if (!confirm(`Start a new budget period for ${fd.get("name")}? Everything spent stays in the ledger.`)) return;
    await api("POST", `/admin/budget/${encodeURIComponent(fd.get("name"))}/reset`, { reason: fd.get("reason") });
    await show("budgets");
  }));
  return form;
}

// The task form's defaults are the API's: read from the server's OpenAPI document (TaskConfig and
// GenerationSettings), with the values of this version as the fallback for servers without it.
const TASK_DEFAULTS = { input_prefix: "Text:", label_prefix: "Label:", epsilon: 1, mode: "resample",
  max_tokens: 30, num_subsets: 10, clusters: 0, clustering: "dp" };

async function taskDefaults() {
  const doc = await optional("/admin/openapi.json").catch(() => null);
  const schemas = (doc && doc.components && doc.components.schemas) || {};
  const task = (schemas.TaskConfig || {}).properties || {}, gen = (schemas.GenerationSettings || {}).properties || {};
  const out = { ...TASK_DEFAULTS };
  for (const k of ["input_prefix", "label_prefix", "epsilon"]) if (task[k] && task[k].default !== undefined) out[k] = task[k].default;
  for (const k of ["mode", "max_tokens", "num_subsets", "clusters", "clustering"]) if (gen[k] && gen[k].default !== undefined) out[k] = gen[k].default;
  return out;
}

async function taskForm() {
  const d = await taskDefaults();
  const modes = ["resample", "fixed", "block"].filter((m) => m !== "block" || d.mode === "block");
  const form = el("form", { class: "inline", id: "task-form" },
    el("label", {}, "Task name", el("input", { name: "name", required: true })),
    el("label", {}, "Dataset (name or id)", el("input", { name: "dataset", required: true })),
    el("label", {}, "Instruction", el("input", { name: "instruction", required: true, size: 40 })),
    el("label", {}, "Input prefix", el("input", { name: "input_prefix", value: d.input_prefix })),
    el("label", {}, "Label prefix", el("input", { name: "label_prefix", value: d.label_prefix })),
    el("label", {}, "Labels (optional)", el("input", { name: "labels", placeholder: "all" })),
    el("label", {}, "Target ε", el("input", { name: "epsilon", type: "number", step: "any", value: String(d.epsilon) })),
    el("label", {}, "Mode", el("select", { name: "mode" }, modes.map((m) => el("option", { selected: m === d.mode }, m)))),
    el("label", {}, "Tokens", el("input", { name: "max_tokens", type: "number", value: String(d.max_tokens), min: "1" })),
    el("label", {}, "Subsets M", el("input", { name: "num_subsets", type: "number", value: String(d.num_subsets), min: "1" })),
    el("label", {}, "Clusters K (0 = off)", el("input", { name: "clusters", type: "number", value: String(d.clusters), min: "0", max: "32" })),
    el("label", {}, "Centroids", el("select", { name: "clustering" }, ["dp", "public"].map((m) => el("option", { selected: m === d.clustering }, m)))),
    el("button", { type: "submit" }, "Create task"));
  form.addEventListener("submit", guarded(async () => {
    const fd = new FormData(form);
    const spec = { name: fd.get("name"), dataset: fd.get("dataset"), instruction: fd.get("instruction"),
      input_prefix: fd.get("input_prefix"), label_prefix: fd.get("label_prefix"), epsilon: Number(fd.get("epsilon")),
      generation: { mode: fd.get("mode"), max_tokens: Number(fd.get("max_tokens")), num_subsets: Number(fd.get("num_subsets")),
        clusters: Number(fd.get("clusters") || 0), clustering: fd.get("clustering") } };
    const labels = String(fd.get("labels") || "").split(",").map((s) => s.trim()).filter(Boolean);
    if (labels.length) spec.labels = labels;
    await api("POST", "/admin/tasks", spec);
    status(`task ${spec.name} created`, "ok");
    await show("tasks");
  }));
  return form;
}

// Why a task cannot warm as it stands, from its own record (a server may mark a task that waits
// for a dataset not uploaded yet); null when nothing is wrong.
function taskProblem(t) {
  const st = t.state || t.status;
  if (st === "waiting" || t.waiting || t.dataset_missing) return `waiting for dataset ${t.dataset} (not uploaded yet)`;
  if (st && st !== "ok" && st !== "ready" && st !== "active") return String(st);
  return null;
}

async function price(name) {
  const r = (await api("POST", `/admin/tasks/${encodeURIComponent(name)}/demos`, { dry_run: true })).data;
  status(`${name}: would cost ε ${eps(r.epsilon_cost)} (remaining after: ${eps(r.remaining_after)})` +
    (r.fits ? "" : " — does not fit the budget"), r.fits ? "ok" : "error");
}

async function warm(name) {
  status(`warming ${name}…`);
  const r = await api("POST", `/admin/tasks/${encodeURIComponent(name)}/demos`, {});
  if (r.status === 202 || (r.data && r.data.object === "warmup")) { location.hash = "#warmups"; return; }
  status(`${name}: ${r.data.charged ? "generated, charged ε " + eps(r.data.epsilon_cost) : "already cached"}`, "ok");
  await show("tasks");
}

// -- navigation and sign-in ----------------------------------------------------------------------
function fresh() {
  const page = document.getElementById("page");
  charts.forEach((c) => c.destroy()); charts = [];
  page.replaceChildren();
  return page;
}

function refreshIn(ms) {
  clearTimeout(timer);
  const name = current();
  timer = setTimeout(() => { if (current() === name) show(name, true); }, ms);
}

const current = () => (location.hash || "#datasets").slice(1);

async function show(name, quiet) {
  clearTimeout(timer);
  if (!sessionStorage.getItem(KEY_STORE)) return;
  if (!pages[name]) name = "datasets";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === `#${name}`);
  const staging = el("section");
  let failed = null;
  try { await pages[name](staging); } catch (e) { failed = e; }
  if (failed && (failed.status === 401 || failed.status === 403)) return;   // signed out: the sign-in form shows
  if (failed && quiet && document.getElementById("page").dataset.page === name) {
    status(failed.message, "error");   // a background refresh failed: keep what is on screen
    return;
  }
  // Whatever the page drew before an error is shown (partial data), with the error on the page
  // itself: never the previous page under a new tab.
  const page = fresh();
  page.append(...staging.childNodes);
  if (failed) page.append(el("p", { class: "error", role: "alert", dataset: { pageError: "" } },
    `Could not load everything on this page: ${failed.message}`));
  page.dataset.page = name;
  if (failed) status(failed.message, "error"); else if (!quiet) status("");
}

function signedIn(yes) {
  document.getElementById("signin").hidden = yes;
  document.getElementById("page").hidden = !yes;
  document.getElementById("nav").hidden = !yes;
  document.getElementById("signout").hidden = !yes;
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  clearTimeout(timer);
  fresh();
  signedIn(false);
  document.getElementById("signin-error").textContent = message || "";
}

document.getElementById("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("admin-key");
  sessionStorage.setItem(KEY_STORE, input.value);
  input.value = "";
  try {
    await api("GET", "/admin/datasets");
  } catch (e) {
    if (sessionStorage.getItem(KEY_STORE)) signOut(e.message);
    return;
  }
  document.getElementById("signin-error").textContent = "";
  signedIn(true);
  await show(current());
});
document.getElementById("signout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", () => show(current()));
if (sessionStorage.getItem(KEY_STORE)) { signedIn(true); show(current()); } else signedIn(false);

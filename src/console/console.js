// The ops console: a small client of the ops API (/v1/ops/...). Every action
// asks for a reason, which the API records in the audit log. Nothing here
// renders data as HTML: all text goes through textContent.
const KEY = "dispatch.ops.key";
const main = document.getElementById("main");
let refreshTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || attrs.svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "svg" || v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, idem) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (idem) headers["Idempotency-Key"] = idem;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401 && !document.getElementById("signin")) {
    // The key was revoked or expired: back to the sign-in form.
    sessionStorage.removeItem(KEY);
    route();
  }
  if (!r.ok) {
    const e = data.error || {};
    throw new ApiError(r.status, e.code || "error", e.message || r.statusText);
  }
  return data;
}

function flash(text, isError) {
  let f = document.getElementById("flash");
  if (!f) {
    f = el("p", { id: "flash", role: "status" });
    main.prepend(f);
  }
  f.className = isError ? "error" : "muted";
  f.textContent = text;
}

// ---- reason prompt ----

function askReason(title, what) {
  const dialog = document.getElementById("reason-dialog");
  const input = document.getElementById("reason-input");
  document.getElementById("reason-title").textContent = title;
  document.getElementById("reason-what").textContent = what;
  document.getElementById("reason-error").textContent = "";
  input.value = "";
  return new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      resolve(dialog.returnValue === "ok" ? input.value.trim() : null);
    };
    dialog.addEventListener("close", done);
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

document.getElementById("reason-cancel").addEventListener("click", () => {
  document.getElementById("reason-dialog").close("");
});

async function act(title, what, call) {
  const reason = await askReason(title, what);
  if (!reason) return;
  try {
    await call(reason);
    flash(`${title}: done.`);
  } catch (e) {
    flash(`${title} failed: ${e.message} (${e.code})`, true);
  }
  route();
}

// ---- sign in ----

function signIn() {
  const input = el("input", { type: "password", id: "key", name: "key", autocomplete: "off", required: true, size: 40 });
  const error = el("p", { class: "error", id: "signin-error" });
  const form = el("form", { id: "signin" },
    el("h1", {}, "Sign in"),
    el("label", {}, "Ops key ", input),
    " ",
    el("button", { type: "submit" }, "Sign in"),
    error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      await api("GET", "/v1/ops/workflows?limit=1");
      // One render: a changed hash renders through `hashchange`.
      if (location.hash === "#/") route();
      else location.hash = "#/";
    } catch (e) {
      sessionStorage.removeItem(KEY);
      error.textContent = e.status === 401 ? "That key is not valid." : e.message;
    }
  });
  main.replaceChildren(form);
  input.focus();
}

// ---- list ----

const FILTERS = ["kind", "state", "status", "stuck", "updated_before", "updated_after"];

async function list(params) {
  const form = el("form", { class: "filters", id: "filters" },
    el("label", {}, "Kind", el("input", { name: "kind", value: params.get("kind") || "" })),
    el("label", {}, "State", el("input", { name: "state", value: params.get("state") || "" })),
    el("label", {}, "Status",
      el("select", { name: "status" }, ["", "running", "completed", "failed"].map((s) =>
        el("option", { value: s, selected: params.get("status") === s }, s || "any")))),
    el("label", {}, "Updated after", el("input", { name: "updated_after", placeholder: "2026-01-01T00:00:00Z", value: params.get("updated_after") || "" })),
    el("label", {}, "Updated before", el("input", { name: "updated_before", placeholder: "2026-01-01T00:00:00Z", value: params.get("updated_before") || "" })),
    el("label", {}, el("span", {}, "Stuck only"), el("input", { type: "checkbox", name: "stuck", id: "filter-stuck", checked: params.get("stuck") === "true" })),
    el("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const name of FILTERS) {
      const field = form.elements[name];
      if (field.type === "checkbox") { if (field.checked) q.set(name, "true"); } else if (field.value.trim()) q.set(name, field.value.trim());
    }
    location.hash = "#/?" + q.toString();
  });
  main.replaceChildren(el("h1", {}, "Workflows"), form, el("p", { class: "muted" }, "Loading…"));
  const q = new URLSearchParams();
  for (const name of [...FILTERS, "after"]) if (params.get(name)) q.set(name, params.get(name));
  let page;
  try {
    page = await api("GET", "/v1/ops/workflows?" + q.toString());
  } catch (e) {
    main.lastChild.replaceWith(el("p", { class: "error" }, `${e.message} (${e.code})`));
    return;
  }
  const rows = page.items.map((w) => el("tr", { "data-id": w.id, "data-key": w.key },
    el("td", {}, el("a", { href: `#/wf/${w.id}`, class: "open" }, w.key)),
    el("td", {}, w.kind),
    el("td", {}, el("span", { class: "badge" }, w.state)),
    el("td", {}, w.status),
    el("td", {}, new Date(w.updated_at).toLocaleString()),
    el("td", { class: "stuck" }, w.stuck.join(", ")),
    el("td", { class: "muted" }, w.attention || "")));
  const table = el("table", { id: "workflows" },
    el("thead", {}, el("tr", {}, ["Key", "Kind", "State", "Status", "Updated", "Stuck", "Attention"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
  const more = [];
  if (page.next) {
    const next = new URLSearchParams(params);
    next.set("after", page.next);
    more.push(el("a", { href: "#/?" + next.toString(), id: "next" }, "Next page →"));
  }
  main.lastChild.replaceWith(rows.length ? table : el("p", { class: "muted", id: "empty" }, "No workflows match."));
  main.append(...more);
}

// ---- one workflow ----

function diagram(edges, current) {
  const start = "[*] start", end = "[*] end";
  const name = (s, isTarget) => (s === "[*]" ? (isTarget ? end : start) : s);
  const links = edges.map((e) => ({ from: name(e.from, false), to: name(e.to, true), label: e.label }));
  const depth = new Map([[start, 0]]);
  const queue = [start];
  while (queue.length) {
    const at = queue.shift();
    for (const l of links) {
      if (l.from === at && !depth.has(l.to)) { depth.set(l.to, depth.get(at) + 1); queue.push(l.to); }
    }
  }
  for (const l of links) for (const s of [l.from, l.to]) if (!depth.has(s)) depth.set(s, 0);
  const columns = new Map();
  const pos = new Map();
  for (const [s, d] of depth) {
    const row = columns.get(d) || 0;
    columns.set(d, row + 1);
    pos.set(s, { x: 20 + d * 180, y: 20 + row * 56 });
  }
  const W = 150, H = 34;
  const width = 40 + Math.max(...columns.keys()) * 180 + W;
  const height = 40 + Math.max(...columns.values()) * 56;
  const svg = el("svg", { class: "diagram", id: "diagram", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "State diagram" },
    el("defs", { svg: true }, el("marker", { svg: true, id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
      el("path", { svg: true, d: "M 0 0 L 10 5 L 0 10 z", fill: "#8a93a6" }))));
  for (const l of links) {
    const a = pos.get(l.from), b = pos.get(l.to);
    const forward = b.x > a.x;
    svg.append(el("line", { svg: true, x1: a.x + (forward ? W : W / 2), y1: a.y + (forward ? H / 2 : H), x2: b.x + (forward ? 0 : W / 2), y2: b.y + (forward ? H / 2 : 0), "marker-end": "url(#arrow)" },
      el("title", { svg: true }, `${l.from} → ${l.to}: ${l.label}`)));
  }
  for (const [s, p] of pos) {
    const isCurrent = s === current;
    svg.append(el("g", { svg: true, class: isCurrent ? "state current" : "state", "data-state": s },
      el("rect", { svg: true, x: p.x, y: p.y, width: W, height: H, rx: s.startsWith("[*]") ? 17 : 4 }),
      el("text", { svg: true, x: p.x + W / 2, y: p.y + H / 2 }, s.startsWith("[*]") ? "●" : s)));
  }
  return svg;
}

function table(id, headers, rows) {
  if (!rows.length) return el("p", { class: "muted", id }, "None.");
  return el("table", { id }, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

const when = (t) => (t ? new Date(t).toLocaleString() : "");

async function show(id) {
  let w;
  try {
    w = await api("GET", `/v1/ops/workflows/${encodeURIComponent(id)}`);
  } catch (e) {
    main.replaceChildren(el("p", { class: "error" }, `${e.message} (${e.code})`), el("a", { href: "#/" }, "← All workflows"));
    return;
  }
  const base = `/v1/ops/workflows/${w.id}`;
  const summary = el("section", { id: "summary" },
    el("h1", {}, `${w.kind} · ${w.key}`),
    el("p", {}, "State ", el("span", { class: "badge", id: "state" }, w.state), " · status ",
      el("span", { class: `badge ${w.status}`, id: "status" }, w.status), ` · version ${w.version} · updated ${when(w.updated_at)}`),
    w.attention ? el("p", { class: "stuck", id: "attention" }, `Attention: ${w.attention}`) : null);

  const forceSelect = el("select", { id: "force-target" }, (w.force_targets || []).map((s) => el("option", { value: s }, s)));
  const signalName = el("input", { id: "signal-name", placeholder: "signal name" });
  const signalPayload = el("input", { id: "signal-payload", placeholder: "{} payload (JSON)", size: 30 });
  const running = w.status === "running";
  const actions = el("section", { id: "actions" }, el("h2", {}, "Actions"),
    el("div", { class: "actions" },
      el("button", { id: "cancel", disabled: !running, onclick: () => act("Cancel", `Cancel ${w.kind} ${w.key}`, (reason) => api("POST", `${base}/cancel`, { reason }, idempotencyKey())) }, "Cancel workflow"),
      el("span", {}, "Force to ", forceSelect, " ",
        el("button", { id: "force", disabled: !(w.force_targets || []).length, onclick: () => act("Force", `Force ${w.key} from ${w.state} to ${forceSelect.value}`, (reason) => api("POST", `${base}/force`, { state: forceSelect.value, reason }, idempotencyKey())) }, "Force")),
      el("span", {}, signalName, " ", signalPayload, " ",
        el("button", { id: "send-signal", onclick: () => {
          let payload = {};
          try { payload = signalPayload.value.trim() ? JSON.parse(signalPayload.value) : {}; } catch { flash("The payload is not valid JSON.", true); return; }
          act("Send signal", `Send ${signalName.value} to ${w.key}`, (reason) => api("POST", `${base}/signals`, { name: signalName.value.trim(), payload, reason }, idempotencyKey()));
        } }, "Send signal"))));

  const timers = table("timers", ["Timer", "Signal", "Due", ""], (w.pending_timers || []).map((t) => el("tr", { "data-id": t.id },
    el("td", {}, t.name), el("td", {}, t.signal), el("td", {}, when(t.due_at)),
    el("td", {}, el("button", { class: "fire", onclick: () => act("Fire timer", `Fire ${t.name} now`, (reason) => api("POST", `${base}/timers/${t.id}/fire`, { reason })) }, "Fire now")))));

  const effects = table("effects", ["Effect", "Status", "Attempts", "Last error", "Next attempt", ""], (w.effects || []).map((e) => el("tr", { "data-id": e.id, "data-status": e.status },
    el("td", {}, e.name), el("td", {}, el("span", { class: `badge ${e.status}` }, e.status)),
    el("td", {}, `${e.attempts} / ${e.max_attempts}`), el("td", { class: "muted" }, e.last_error || ""), el("td", {}, when(e.next_attempt_at)),
    el("td", {}, e.status === "dead"
      ? el("button", { class: "retry", onclick: () => act("Retry effect", `Retry ${e.name}`, (reason) => api("POST", `${base}/effects/${e.id}/retry`, { reason })) }, "Retry")
      : null))));

  const history = el("ol", { class: "timeline", id: "history" }, (w.history || []).map((h) => el("li", { class: h.event },
    el("strong", {}, h.event), " ", h.signal_name || "", h.from_state || h.to_state ? ` ${h.from_state || ""} → ${h.to_state || ""}` : "",
    el("span", { class: "muted" }, ` · ${h.actor_role || ""}${h.actor_subject ? " " + h.actor_subject : ""} · ${when(h.at)}`),
    h.reason ? el("div", { class: "muted" }, h.reason) : null)));

  const audit = w.audit ? table("audit", ["When", "Who", "Action", "Reason", "Before"], w.audit.map((a) => el("tr", {},
    el("td", {}, when(a.at)), el("td", {}, `${a.actor} (${a.actor_role})`), el("td", {}, a.action + (a.target ? ` ${a.target}` : "")),
    el("td", {}, a.reason), el("td", {}, a.before_state || "")))) : null;

  main.replaceChildren(
    el("a", { href: "#/" }, "← All workflows"),
    summary,
    w.diagram ? el("section", {}, el("h2", {}, "State diagram"), diagram(w.diagram.edges, w.state)) : null,
    actions,
    el("section", {}, el("h2", {}, "Effects"), effects),
    el("section", {}, el("h2", {}, "Timers"), timers),
    el("section", {}, el("h2", {}, "History"), history),
    audit ? el("section", {}, el("h2", {}, "Audit"), audit) : null,
  );
  // Keep the page current while nobody is typing or answering a prompt.
  const tick = () => {
    if (location.hash !== `#/wf/${id}`) return;
    const typing = main.contains(document.activeElement) && document.activeElement.matches("input, select, textarea");
    if (document.getElementById("reason-dialog").open || typing) refreshTimer = setTimeout(tick, 2000);
    else route();
  };
  refreshTimer = setTimeout(tick, 2000);
}

function route() {
  clearTimeout(refreshTimer);
  const signedIn = !!sessionStorage.getItem(KEY);
  document.getElementById("signout").hidden = !signedIn;
  if (!signedIn) return signIn();
  const hash = location.hash.replace(/^#/, "") || "/";
  const m = hash.match(/^\/wf\/([0-9a-fA-F-]{36})$/);
  if (m) return show(m[1]);
  const qs = hash.includes("?") ? hash.slice(hash.indexOf("?") + 1) : "";
  return list(new URLSearchParams(qs));
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  if (location.hash === "#/") route();
  else location.hash = "#/";
});
window.addEventListener("hashchange", route);
route();

// quotagate dashboard: polls the admin API every 2 s and redraws. No framework, no build step.
// Every value that comes from traffic (user ids, property values, key names) is set with
// textContent, never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEYS_EVERY_MS = 15000;
  const RECENT_DENIAL_S = 300;
  const NEAR = 0.8;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    budgets: [],
    hasMore: false,
    denials: [],
    stats: null,
    keys: [],
    keysAt: 0,
    keysSought: new Set(), // key ids seen in budgets that the key list has been loaded for
    serverSkew: 0, // server time minus browser time, seconds
    filter: "all",
    search: "",
    lastOk: 0,
    error: null,
    timer: null,
    running: false,
    previousUse: new Map(), // budget id -> used+held at the last poll, to flash rows that moved
    seenDenials: null, // "at|key|value" of denials already shown
  };

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.setAttribute("class", value);
      else if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  // --- formatting -------------------------------------------------------------------------------

  const WINDOWS = [
    [31536000, "year"], [2592000, "30 days"], [604800, "week"], [86400, "day"], [3600, "hour"], [60, "minute"],
  ];

  function windowText(seconds) {
    for (const [size, name] of WINDOWS) if (seconds === size) return name;
    for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "min"]]) {
      if (seconds % size === 0) return `${seconds / size} ${unit}`;
    }
    return `${seconds} s`;
  }

  function compact(n) {
    const abs = Math.abs(n);
    if (abs >= 1e9) return trim(n / 1e9) + "B";
    if (abs >= 1e6) return trim(n / 1e6) + "M";
    if (abs >= 1e4) return trim(n / 1e3) + "k";
    return Number.isInteger(n) ? n.toLocaleString("en-US") : trim(n);
  }

  function trim(n) {
    return String(Number(n.toFixed(n >= 100 ? 0 : n >= 10 ? 1 : 2)));
  }

  function usd(cents) {
    const dollars = cents / 100;
    if (dollars === 0) return "$0";
    if (dollars >= 1000) return "$" + compact(dollars);
    if (dollars >= 0.01) return "$" + dollars.toFixed(2);
    return "$" + String(Number(dollars.toPrecision(2)));
  }

  function cents(value) {
    if (value === 0) return "0¢";
    return `${String(Number(value.toPrecision(value >= 1 ? 3 : 2)))}¢`;
  }

  // Money in dollars, unless the quota is under a dollar: then in cents, for used and quota alike.
  function amountText(value, unit, quota) {
    if (unit === "cents") return (quota === undefined ? value : quota) >= 100 ? usd(value) : cents(value);
    return compact(value);
  }

  function unitName(unit, quota) {
    if (unit === "cents") return "";
    if (unit === "token") return quota === 1 ? " token" : " tokens";
    return quota === 1 ? " request" : " requests";
  }

  function policyText(b) {
    return `${amountText(b.quota, b.unit)}${unitName(b.unit, b.quota)} / ${windowText(b.window)}`;
  }

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 60) return `${Math.floor(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function clockTime(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  const serverNow = () => Date.now() / 1000 + state.serverSkew;
  const pct = (ratio) => `${Math.round(ratio * 100)}%`;

  // --- the API ----------------------------------------------------------------------------------

  class AuthError extends Error {}

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store", headers, ...options });
    if (response.status === 401 && path !== "/admin/session") throw new AuthError("signed out");
    let data = {};
    try {
      data = await response.json();
    } catch (_) {
      data = {};
    }
    if (!response.ok) {
      const error = new Error((data.error && data.error.message) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // --- signing in and out -----------------------------------------------------------------------

  function showLogin(message) {
    stopPolling();
    $("app").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("token").focus();
  }

  function showApp() {
    $("login").hidden = true;
    $("app").hidden = false;
    startPolling();
  }

  async function login(event) {
    event.preventDefault();
    const input = $("token");
    const button = $("login-button");
    button.disabled = true;
    try {
      await api("/admin/session", { method: "POST", body: JSON.stringify({ token: input.value }) });
      input.value = "";
      showApp();
    } catch (error) {
      showLogin(error.status === 401 ? "That admin token is not right." : `Cannot sign in: ${error.message}`);
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  async function logout() {
    try {
      await api("/admin/session", { method: "DELETE" });
    } finally {
      showLogin("");
    }
  }

  // --- polling ----------------------------------------------------------------------------------

  function startPolling() {
    if (state.running) return;
    state.running = true;
    state.keysAt = 0;
    refresh();
  }

  function stopPolling() {
    state.running = false;
    clearTimeout(state.timer);
  }

  async function refresh() {
    clearTimeout(state.timer);
    if (!state.running) return;
    try {
      const [budgets, denials, stats] = await Promise.all([
        api("/admin/budgets?limit=500"),
        api("/admin/denials?limit=40"),
        api("/admin/stats"),
      ]);
      state.budgets = budgets.budgets;
      state.hasMore = budgets.has_more;
      state.denials = denials.denials;
      state.stats = stats;
      state.serverSkew = budgets.now - Date.now() / 1000;
      const unknown = state.budgets.filter((b) => !state.keysSought.has(b.key_id));
      if (unknown.length || Date.now() - state.keysAt > KEYS_EVERY_MS) await loadKeys();
      for (const b of unknown) state.keysSought.add(b.key_id); // looked up once, then every 15 s
      state.lastOk = Date.now();
      state.error = null;
      render();
    } catch (error) {
      if (error instanceof AuthError) {
        showLogin("Your session has ended. Sign in again.");
        return;
      }
      state.error = error.status === 503 ? "Store unreachable" : "Gateway unreachable";
      renderStatus();
    }
    if (state.running) state.timer = setTimeout(refresh, document.hidden ? POLL_MS * 5 : POLL_MS);
  }

  async function loadKeys() {
    state.keys = (await api("/admin/keys")).keys;
    state.keysAt = Date.now();
    renderKeys();
  }

  // --- rendering --------------------------------------------------------------------------------

  function render() {
    const entities = groupEntities(state.budgets);
    renderCards(entities);
    renderBudgets(entities);
    renderChart();
    renderDenials();
    renderStatus();
  }

  function renderStatus() {
    const box = $("live-status");
    if (state.error) {
      box.dataset.state = "error";
      $("live-text").textContent = `${state.error} · retrying`;
      return;
    }
    if (!state.lastOk) return;
    box.dataset.state = "live";
    const seconds = Math.max(0, (Date.now() - state.lastOk) / 1000);
    $("live-text").textContent = seconds < 3 ? "Live · updated just now" : `Live · updated ${ago(seconds)}`;
  }

  function entityId(b) {
    return `${b.key_id}\u0000${b.segment === null ? "" : b.segment}\u0000${b.value === null ? "" : b.value}`;
  }

  function groupEntities(budgets) {
    const byId = new Map();
    for (const b of budgets) {
      const id = entityId(b);
      let entity = byId.get(id);
      if (!entity) {
        entity = {
          id,
          keyName: b.key_name || b.key_id,
          keyId: b.key_id,
          segment: b.segment,
          kind: b.segment_kind,
          value: b.value,
          budgets: [],
          ratio: 0,
          deniedAt: null,
        };
        byId.set(id, entity);
      }
      entity.budgets.push(b);
      entity.ratio = Math.max(entity.ratio, b.ratio);
      if (b.last_denied_at && (!entity.deniedAt || b.last_denied_at > entity.deniedAt)) entity.deniedAt = b.last_denied_at;
    }
    const list = [...byId.values()];
    // Closest to the limit first; ties in a stable order, so that rows do not jump between polls.
    list.sort((a, b) => b.ratio - a.ratio || a.keyName.localeCompare(b.keyName) || String(a.value).localeCompare(String(b.value)) || a.id.localeCompare(b.id));
    return list;
  }

  const recentlyDenied = (entity) => entity.deniedAt !== null && serverNow() - entity.deniedAt < RECENT_DENIAL_S;

  function renderCards(entities) {
    const budgets = state.budgets.length;
    const keys = new Set(state.budgets.map((b) => b.key_id)).size;
    $("card-budgets").textContent = state.hasMore ? `${budgets}+` : String(budgets);
    $("card-budgets-sub").textContent =
      `${entities.length} limited, across ${keys} gateway ${keys === 1 ? "key" : "keys"}`;

    const near = entities.filter((e) => e.ratio >= NEAR);
    const full = near.filter((e) => e.ratio >= 1).length;
    $("card-near").textContent = String(near.length);
    $("card-near").parentElement.classList.toggle("active", near.length > 0);
    $("card-near-sub").textContent = near.length
      ? `${full} at the limit · worst: ${entityLabel(near[0])} ${pct(near[0].ratio)}`
      : "nobody is close to a limit";

    const denied = entities.filter(recentlyDenied);
    $("card-denied").textContent = String(denied.length);
    $("card-denied").parentElement.classList.toggle("active", denied.length > 0);
    $("card-denied-sub").textContent = denied.length
      ? `${denied.length === 1 ? "key, user or value" : "keys, users or values"} · latest: ${entityLabel(denied.sort((a, b) => b.deniedAt - a.deniedAt)[0])}`
      : "no 429 in the last 5 minutes";

    const totals = (state.stats && state.stats.window_totals) || { allowed: 0, denied: 0, rejected: 0 };
    const all = totals.allowed + totals.denied;
    $("card-allowed").textContent = compact(totals.allowed);
    $("card-denied-requests").textContent = compact(totals.denied);
    $("card-denied-requests").classList.toggle("bad", totals.denied > 0);
    $("card-requests-sub").textContent = all && totals.denied ? `denied · ${((100 * totals.denied) / all).toFixed(1)} %` : "denied";
  }

  function entityLabel(entity) {
    return entity.kind === "global" ? entity.keyName : entity.value;
  }

  function matches(entity) {
    if (state.filter !== "all" && entity.kind !== state.filter) return false;
    if (!state.search) return true;
    const text = [entity.keyName, entity.keyId, entity.segment, entity.value].join(" ").toLowerCase();
    return text.includes(state.search);
  }

  function renderBudgets(entities) {
    const shown = entities.filter(matches);
    const rows = shown.map(entityRow);
    if (state.hasMore) {
      rows.push(h("div", { class: "more-note", text: "Showing the 500 budgets closest to their limits." }));
    }
    $("budget-list").replaceChildren(...rows);
    const empty = $("budget-empty");
    empty.hidden = shown.length > 0;
    if (!shown.length && entities.length) {
      empty.replaceChildren(h("strong", { text: "Nothing matches this filter." }));
    } else if (!entities.length) {
      empty.replaceChildren(
        h("strong", { text: "No budget in use yet." }),
        h("span", {
          text: "Budgets appear here with the first request that names a policy (Helicone-RateLimit-Policy or a policy bound to its key).",
        }),
      );
    }
    $("budgets-sub").textContent = shown.length === entities.length
      ? "Every key, user and property value in use, by how much of its quota is gone."
      : `${shown.length} of ${entities.length} shown.`;
  }

  function entityRow(entity) {
    const denied = recentlyDenied(entity);
    const classes = ["row"];
    if (denied) classes.push("denied");
    else if (entity.ratio >= NEAR) classes.push("near");
    if (entity.ratio >= 1) classes.push("full");
    let moved = false;
    for (const b of entity.budgets) {
      const id = budgetKey(b);
      const use = b.used + b.held;
      if (state.previousUse.has(id) && state.previousUse.get(id) !== use) moved = true;
      state.previousUse.set(id, use);
    }
    if (moved) classes.push("bumped");

    const meta = [h("span", { class: `chip ${entity.kind}`, text: entity.kind === "property" ? entity.segment : entity.kind })];
    if (entity.kind !== "global") meta.push(h("span", { text: `key ${entity.keyName}` }));
    else meta.push(h("span", { text: "all traffic of the key" }));

    return h(
      "article",
      {
        class: classes.join(" "),
        "data-key": entity.keyName,
        "data-segment": entity.kind === "global" ? "global" : entity.segment,
        "data-value": entity.value === null ? "" : entity.value,
        "data-ratio": entity.ratio.toFixed(4),
      },
      h("div", { class: "who" }, h("div", { class: "name", title: entityLabel(entity), text: entityLabel(entity) }), h("div", { class: "meta" }, meta)),
      h("div", { class: "meters" }, entity.budgets.map(meter)),
      h("div", { class: "pct", text: pct(entity.ratio) }),
      h("div", { class: "state" }, statusOf(entity, denied)),
    );
  }

  function budgetKey(b) {
    return `${entityId(b)}\u0000${b.unit}\u0000${b.window}`;
  }

  function meter(b) {
    const ratio = b.quota ? b.used / b.quota : 1;
    const heldRatio = b.quota ? b.held / b.quota : 0;
    const classes = ["meter"];
    if (b.ratio >= 1) classes.push("full");
    else if (b.ratio >= NEAR) classes.push("near");
    const fill = h("span", { class: "fill" });
    fill.style.width = `${Math.min(100, ratio * 100)}%`;
    const held = h("span", { class: "held", title: "held by calls in flight" });
    held.style.width = `${Math.max(0, Math.min(100 - ratio * 100, heldRatio * 100))}%`;
    const amount = h(
      "span",
      { class: "amount" },
      amountText(b.used, b.unit, b.quota),
      h("span", { class: "of", text: ` / ${amountText(b.quota, b.unit)}` }),
      b.held ? h("span", { class: "of", text: ` (+${amountText(b.held, b.unit, b.quota)} in flight)` }) : null,
    );
    const others = b.policies.filter((p) => p !== b.policy);
    const title = `policy ${b.policy}` + (others.length ? `; also counted for ${others.join(", ")}` : "");
    return h(
      "div",
      { class: classes.join(" "), "data-policy": b.policy, title },
      h("div", { class: "meter-label" }, h("span", { class: "policy", text: policyText(b) }), amount),
      h("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": b.quota, "aria-valuenow": b.used + b.held, "aria-label": policyText(b) }, fill, held),
    );
  }

  function statusOf(entity, denied) {
    const out = [];
    if (denied) {
      out.push(h("span", { class: "badge denied", text: `Denied ${ago(serverNow() - entity.deniedAt)}` }));
    } else if (entity.ratio >= 1) {
      out.push(h("span", { class: "badge denied", text: "At the limit" }));
    } else if (entity.ratio >= NEAR) {
      out.push(h("span", { class: "badge near", text: "Near the limit" }));
    } else {
      out.push(h("span", { class: "badge ok", text: "OK" }));
    }
    const updated = Math.max(...entity.budgets.map((b) => b.updated_at));
    out.push(h("span", { class: "when", text: `last request ${ago(Math.max(0, serverNow() - updated))}` }));
    return out;
  }

  // --- the chart: stacked bars of allowed and denied requests per 10 s ---------------------------

  function niceCeiling(n) {
    if (n <= 4) return 4;
    const magnitude = 10 ** Math.floor(Math.log10(n));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= n) return step * magnitude;
    return 10 * magnitude;
  }

  function renderChart() {
    const chart = $("chart");
    const stats = state.stats;
    if (!stats) return;
    const width = chart.clientWidth || 350;
    const height = 150;
    const left = 30;
    const bottom = 18;
    const top = 6;
    const plotW = width - left;
    const plotH = height - top - bottom;
    const series = stats.series;
    const peak = Math.max(1, ...series.map((p) => (p.allowed || 0) + (p.denied || 0)));
    const ceiling = niceCeiling(peak);
    const y = (v) => top + plotH - (v / ceiling) * plotH;
    const slot = plotW / series.length;
    const barW = Math.max(1, slot - (slot > 4 ? 1.2 : 0.4));
    const nodes = [];
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    for (const fraction of [0, 0.5, 1]) {
      const value = ceiling * fraction;
      nodes.push(svg("line", { class: "grid-line", x1: left, x2: width, y1: y(value), y2: y(value) }));
      nodes.push(svg("text", { class: "axis", x: left - 6, y: y(value) + 3.5, "text-anchor": "end" }, compact(value)));
    }
    series.forEach((point, i) => {
      const x = left + i * slot + (slot - barW) / 2;
      if (point.allowed === null) {
        nodes.push(svg("rect", { class: "nodata", x, y: y(0) - 1, width: barW, height: 1 }));
        return;
      }
      const allowed = point.allowed || 0;
      const denied = point.denied || 0;
      const label = `${clockTime(point.t)}: ${allowed} allowed, ${denied} denied`;
      const group = svg("g", { "data-t": point.t, "data-allowed": allowed, "data-denied": denied }, svg("title", {}, label));
      if (allowed) group.append(svg("rect", { class: "allowed", x, y: y(allowed), width: barW, height: y(0) - y(allowed), rx: 1 }));
      if (denied) group.append(svg("rect", { class: "denied", x, y: y(allowed + denied), width: barW, height: y(allowed) - y(allowed + denied), rx: 1 }));
      nodes.push(group);
    });
    const minutes = (series.length * stats.step) / 60;
    for (const m of [minutes, (2 * minutes) / 3, minutes / 3, 0]) {
      const x = left + plotW * (1 - m / minutes);
      const anchor = m === minutes ? "start" : m === 0 ? "end" : "middle";
      nodes.push(svg("text", { class: "axis", x, y: height - 4, "text-anchor": anchor }, m === 0 ? "now" : `−${Math.round(m)} min`));
    }
    chart.replaceChildren(...nodes);
  }

  // --- denials ----------------------------------------------------------------------------------

  function renderDenials() {
    const list = $("denial-list");
    const seen = new Set();
    const items = state.denials.map((d) => {
      const id = `${d.at}|${d.key_id}|${d.segment}|${d.value}|${d.policy}`;
      seen.add(id);
      const fresh = state.seenDenials !== null && !state.seenDenials.has(id);
      const who = d.segment_kind === "global" ? d.key_name || d.key_id : d.value;
      const chip = d.segment_kind === "property" ? d.segment : d.segment_kind;
      return h(
        "li",
        { class: fresh ? "denial fresh" : "denial", "data-value": d.value || "", "data-key": d.key_name },
        h("div", { class: "d-who" }, h("span", { class: "v", text: who, title: who }), h("span", { class: `chip ${d.segment_kind}`, text: chip })),
        h("time", { datetime: new Date(d.at * 1000).toISOString(), title: clockTime(d.at), text: ago(Math.max(0, serverNow() - d.at)) }),
        h("div", { class: "d-sub" }, h("code", { text: d.policy }), ` · key ${d.key_name || d.key_id} · ${clockTime(d.at)}`),
      );
    });
    state.seenDenials = seen;
    list.replaceChildren(...items);
    $("denial-empty").hidden = items.length > 0;
    const recent = state.denials.filter((d) => serverNow() - d.at < RECENT_DENIAL_S).length;
    const count = $("denials-count");
    count.textContent = recent ? `${recent} in 5 min` : String(state.denials.length);
    count.classList.toggle("active", recent > 0);
  }

  // --- keys -------------------------------------------------------------------------------------

  function renderKeys() {
    const rows = state.keys
      .slice()
      .sort((a, b) => Number(b.active) - Number(a.active) || b.created_at - a.created_at)
      .map((k) =>
        h(
          "tr",
          { class: k.active ? "" : "revoked", "data-key": k.name },
          h("td", {}, h("strong", { text: k.name })),
          h("td", {}, h("code", { text: k.id })),
          h("td", {}, k.policies ? h("code", { text: k.policies }) : h("span", { class: "muted", text: "–" })),
          h("td", { text: new Date(k.created_at * 1000).toLocaleString() }),
          h("td", {}, h("span", { class: `status-pill ${k.active ? "active" : "revoked"}`, text: k.active ? "active" : `revoked ${ago(serverNow() - k.revoked_at)}` })),
          h("td", { class: "actions" }, k.active ? h("button", { type: "button", class: "danger", onclick: () => revokeKey(k) }, "Revoke") : null),
        ),
      );
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 6, class: "muted", text: "No key yet: create one above or with quotagate keys create." })));
    $("key-rows").replaceChildren(...rows);
  }

  async function createKey(event) {
    event.preventDefault();
    const name = $("key-name").value.trim();
    const policies = $("key-policies").value.trim();
    const error = $("key-error");
    error.hidden = true;
    try {
      const created = await api("/admin/keys", { method: "POST", body: JSON.stringify({ name, policies: policies ? [policies] : [] }) });
      $("key-created-name").textContent = created.name;
      $("key-created-value").textContent = created.key;
      $("key-created").hidden = false;
      $("key-form").reset();
      await loadKeys();
    } catch (e) {
      if (e instanceof AuthError) return showLogin("Your session has ended. Sign in again.");
      error.textContent = e.message;
      error.hidden = false;
    }
  }

  async function revokeKey(key) {
    if (!window.confirm(`Revoke key "${key.name}"? Its requests get 401 from then on.`)) return;
    try {
      await api(`/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      await loadKeys();
    } catch (e) {
      if (e instanceof AuthError) return showLogin("Your session has ended. Sign in again.");
      const error = $("key-error");
      error.textContent = e.message;
      error.hidden = false;
    }
  }

  // --- wiring -----------------------------------------------------------------------------------

  function setFilter(filter) {
    state.filter = filter;
    for (const button of document.querySelectorAll("[data-filter]")) {
      button.setAttribute("aria-pressed", String(button.dataset.filter === filter));
    }
    renderBudgets(groupEntities(state.budgets));
  }

  async function start() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("key-form").addEventListener("submit", createKey);
    $("key-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("key-created-value").textContent));
    $("key-dismiss").addEventListener("click", () => {
      $("key-created").hidden = true;
      $("key-created-value").textContent = "";
    });
    for (const button of document.querySelectorAll("[data-filter]")) {
      button.addEventListener("click", () => setFilter(button.dataset.filter));
    }
    $("search").addEventListener("input", (event) => {
      state.search = event.target.value.trim().toLowerCase();
      renderBudgets(groupEntities(state.budgets));
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.running) refresh();
    });
    window.addEventListener("resize", () => renderChart());
    setInterval(renderStatus, 1000);
    try {
      await api("/admin/session");
      showApp();
    } catch (_) {
      showLogin("");
    }
  }

  start();
})();

// The operator's view: /props, /slots and /metrics, every second.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
let last = null;   // the previous count of generated tokens and its time, for the rate
let live = 0;      // tokens the running tasks have generated so far (/slots)

function rows(table, pairs) {
  const tbody = table.querySelector("tbody");
  tbody.textContent = "";
  for (const [k, v] of pairs) {
    const tr = document.createElement("tr");
    const a = document.createElement("th"), b = document.createElement("td");
    a.textContent = k; b.textContent = v;
    b.dataset.name = k;
    tr.append(a, b);
    tbody.append(tr);
  }
}

function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const [name, value] = line.trim().split(/\s+/);
    out[name] = Number(value);
  }
  return out;
}

async function refresh() {
  try {
    const props = await api("props");
    rows($("server"), [["model", props.model_alias || props.model_path], ["slots", props.total_slots],
                       ["context per slot", props.default_generation_settings?.n_ctx ?? ""],
                       ["build", props.build_info || ""]]);
  } catch (e) { rows($("server"), [["error", e.message]]); }
  try {
    const slots = await api("slots");
    $("slots-note").textContent = "";
    const tbody = $("slots").querySelector("tbody");
    tbody.textContent = "";
    live = 0;
    for (const s of slots) {
      if (s.is_processing) live += (s.next_token || [{}])[0].n_decoded || 0;
      const tr = document.createElement("tr");
      tr.className = "slot";
      const next = (s.next_token || [{}])[0];
      for (const v of [s.id, s.is_processing ? "processing" : "idle", s.id_task ?? "", s.n_prompt_tokens ?? "",
                       s.n_prompt_tokens_cache ?? "", next.n_decoded ?? "", s.n_ctx]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.append(td);
      }
      tbody.append(tr);
    }
  } catch (e) { $("slots-note").textContent = "/slots: " + e.message; }
  try {
    const r = await fetch("metrics", {headers: headers()});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const m = parseMetrics(await r.text());
    // the counter grows when a task ends; with what running tasks made so far, it is live
    const now = Date.now(), made = m["llamacpp:tokens_predicted_total"] + live;
    const rate = last ? Math.max(0, made - last.made) / ((now - last.t) / 1000) : 0;
    last = {made, t: now};
    $("metrics-note").textContent = "";
    rows($("metrics"), [["tokens generated per second (now)", rate.toFixed(1)],
                        ["requests processing", m["llamacpp:requests_processing"]],
                        ["requests waiting (queue)", m["llamacpp:requests_deferred"]]]
      .concat(Object.entries(m).filter(([k]) => !k.includes("requests_")).map(([k, v]) => [k, v])));
  } catch (e) { $("metrics-note").textContent = "/metrics: " + e.message + " (start the server with --metrics)"; }
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

bindKeyField($("api-key"));
refresh();
setInterval(refresh, POLL_MS);

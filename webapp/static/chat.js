// The chat page: conversations kept in this browser, replies streamed from
// /v1/chat/completions (or /completion in raw mode), stop, regenerate, edit-and-resend.
"use strict";

const CHATS = "numllama.chats", SETTINGS = "numllama.settings";
const FIELDS = ["mode", "system", "temperature", "top_k", "top_p", "min_p", "seed", "max_tokens"];
const $ = (id) => document.getElementById(id);

let chats = JSON.parse(localStorage.getItem(CHATS) || "[]");
let current = null;        // the conversation shown
let running = null;        // the AbortController of the reply being streamed

function save() { localStorage.setItem(CHATS, JSON.stringify(chats)); }

function settings() {
  const s = {};
  for (const f of FIELDS) s[f] = $(f).value;
  return s;
}

function loadSettings() {
  const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const f of FIELDS) if (s[f] !== undefined) $(f).value = s[f];
  for (const f of FIELDS) $(f).addEventListener("change", () => localStorage.setItem(SETTINGS, JSON.stringify(settings())));
}

function newChat() {
  current = {id: Date.now().toString(36), title: "New chat", messages: []};
  chats.unshift(current);
  save(); showChats(); showMessages();
}

function showChats() {
  const ul = $("chats");
  ul.textContent = "";
  for (const c of chats) {
    const li = document.createElement("li");
    li.className = c === current ? "current" : "";
    const title = document.createElement("span");
    title.textContent = c.title;
    const del = document.createElement("button");
    del.textContent = "✕"; del.title = "Delete this conversation";
    del.onclick = (e) => { e.stopPropagation(); chats = chats.filter((x) => x !== c);
      if (current === c) current = chats[0] || null; save(); if (!current) newChat(); else { showChats(); showMessages(); } };
    li.append(title, del);
    li.onclick = () => { if (!running) { current = c; showChats(); showMessages(); } };
    ul.append(li);
  }
}

function messageDiv(m, index) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  const role = document.createElement("div");
  role.className = "role";
  const name = document.createElement("span");
  name.textContent = m.role;
  role.append(name);
  const isLast = index === current.messages.length - 1;
  if (m.role === "user") {
    const edit = document.createElement("button");
    edit.textContent = "Edit"; edit.className = "edit";
    edit.onclick = () => { if (running) return;
      $("input").value = m.content; current.messages = current.messages.slice(0, index); save(); showMessages(); $("input").focus(); };
    role.append(edit);
  } else if (m.role === "assistant" && isLast) {
    const again = document.createElement("button");
    again.textContent = "Regenerate"; again.className = "regenerate";
    again.onclick = () => { if (running) return; current.messages.pop(); save(); showMessages(); reply(); };
    role.append(again);
  }
  const body = document.createElement("div");
  body.className = "content";
  body.innerHTML = renderMarkdown(m.content);
  div.append(role, body);
  return div;
}

function showMessages() {
  const box = $("messages");
  box.textContent = "";
  if (!current) return;
  current.messages.forEach((m, i) => box.append(messageDiv(m, i)));
  box.scrollTop = box.scrollHeight;
}

// A router (numllama-server with no model option) serves several models: each request names
// the one chosen in the header's list. A single model's server needs no name.
let router = false;
function withModel(body) {
  if (router) body.model = $("model-select").value;
  return body;
}

function requestBody(s, stream) {
  const num = (v) => Number(v);
  const body = {stream, temperature: num(s.temperature), top_k: num(s.top_k), top_p: num(s.top_p),
                min_p: num(s.min_p), seed: num(s.seed)};
  if (s.mode === "raw") {
    body.prompt = current.messages.map((m) => m.content).join("");
    body.n_predict = num(s.max_tokens);
  } else {
    body.messages = chatMessages(s);
    body.max_tokens = num(s.max_tokens);
  }
  return withModel(body);
}

// The conversation as /v1/chat/completions takes it, the system prompt first.
function chatMessages(s) {
  return (s.system ? [{role: "system", content: s.system}] : [])
    .concat(current.messages.map((m) => ({role: m.role, content: m.content})));
}

async function reply() {
  const s = settings();
  const request = requestBody(s, true);   // (before the answer being written joins the conversation)
  const answer = {role: "assistant", content: ""};
  current.messages.push(answer);
  showMessages();
  const body = $("messages").lastChild.querySelector(".content");
  running = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const path = s.mode === "raw" ? "completion" : "v1/chat/completions";
    for await (const ev of streamEvents(path, request, running.signal)) {
      const piece = s.mode === "raw" ? ev.content : ((ev.choices || [])[0] || {}).delta?.content;
      if (piece) { answer.content += piece; body.innerHTML = renderMarkdown(answer.content); $("messages").scrollTop = 1e9; }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      const err = document.createElement("div");
      err.className = "error"; err.textContent = e.message;
      body.append(err);
    }
  } finally {
    running = null;
    $("send").disabled = false; $("stop").disabled = true;
    save(); showMessages();
    if (router) showModelStatus().catch(() => {});   // (a request loads its model)
  }
}

$("compose").onsubmit = (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || running) return;
  if (!current) newChat();
  current.messages.push({role: "user", content: text});
  if (current.title === "New chat") current.title = text.slice(0, 40);
  $("input").value = "";
  save(); showChats(); reply();
};
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("compose").requestSubmit(); }
});
$("stop").onclick = () => { if (running) running.abort(); };
$("new-chat").onclick = () => { if (!running) newChat(); };
$("show-template").onclick = async () => {
  const pre = $("template");
  pre.hidden = false;
  try {
    const s = settings();
    const out = await api("apply-template", withModel({messages: chatMessages(s)}));
    pre.textContent = out.prompt;
  } catch (e) { pre.textContent = e.message; }
};

bindKeyField($("api-key"));
loadSettings();
current = chats[0] || null;
if (!current) newChat(); else { showChats(); showMessages(); }
// The chosen model's state (unloaded, loading, loaded, failed, downloading) and a button to
// start or stop its server (POST /models/load, /models/unload), as llama-server's page has them;
// the list is asked for again every few seconds while the page is seen, and after each click.
const MODEL_POLL_MS = 3000;
const RUNNING = ["loading", "loaded"];
async function showModelStatus() {
  const name = $("model-select").value;
  const m = (await api("models")).data.find((x) => x.id === name);
  const status = m ? m.status.value : "";
  $("model-status").textContent = status;
  $("model-load").hidden = !m || RUNNING.includes(status);
  $("model-unload").hidden = !m || !RUNNING.includes(status);
}
async function modelAction(path) {
  try { await api(path, {model: $("model-select").value}); }
  catch (e) { $("model-status").textContent = e.message; return; }
  showModelStatus().catch(() => {});
}
$("model-load").onclick = () => modelAction("models/load");
$("model-unload").onclick = () => modelAction("models/unload");
$("model-select").onchange = () => showModelStatus().catch(() => {});

api("props").then(async (p) => {
  if (p.role !== "router") { $("model").textContent = p.model_alias || ""; return; }
  const select = $("model-select");
  for (const m of (await api("models")).data) {
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    select.append(option);
  }
  router = true;
  $("model-choice").hidden = false;
  await showModelStatus();
  setInterval(() => { if (document.visibilityState === "visible") showModelStatus().catch(() => {}); }, MODEL_POLL_MS);
}).catch(() => {});

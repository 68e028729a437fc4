// What every numllama page shares: the API key (kept in this browser only), JSON and
// server-sent-event requests, and a Markdown renderer that never lets HTML from the model
// reach the page (it escapes everything first, then adds its own few tags).
"use strict";

const KEY_STORE = "numllama.apiKey";

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function setApiKey(key) { localStorage.setItem(KEY_STORE, key); }

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// POST (or GET without a body) and the parsed JSON; an error answer throws its message.
async function api(path, body, signal) {
  const r = await fetch(path, body === undefined ? {headers: headers(), signal}
                                                 : {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  const text = await r.text();
  let data;
  try { data = JSON.parse(text); } catch (e) { data = text; }
  if (!r.ok) throw new Error(data && data.error ? data.error.message : ("HTTP " + r.status));
  return data;
}

// Each event of a streamed answer (the JSON after "data: "), until [DONE] or the end.
async function* streamEvents(path, body, signal) {
  const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error(data.error ? data.error.message : ("HTTP " + r.status));
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const ev of events) {
      for (const line of ev.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        yield JSON.parse(payload);
      }
    }
  }
}

function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
                     .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline Markdown on escaped text: `code`, **bold**, *italic*, [text](http(s) link).
function renderInline(escaped) {
  const codes = [];
  let s = escaped.replace(/`([^`]+)`/g, (m, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
       .replace(/\*([^*]+)\*/g, "<em>$1</em>")
       .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (m, i) => "<code>" + codes[+i] + "</code>");
}

// Markdown -> HTML, safely: fenced code blocks, headings, bullet and numbered lists, paragraphs.
function renderMarkdown(text) {
  const lines = escapeHtml(text).split("\n");
  const out = [];
  let list = null, para = [];
  const flushPara = () => { if (para.length) { out.push("<p>" + renderInline(para.join("<br>")) + "</p>"); para = []; } };
  const closeList = () => { if (list) { out.push("</" + list + ">"); list = null; } };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      flushPara(); closeList();
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      out.push("<pre><code>" + code.join("\n") + "</code></pre>");
      continue;
    }
    let m;
    if ((m = line.match(/^(#{1,4})\s+(.*)$/))) {
      flushPara(); closeList();
      out.push("<h" + (m[1].length + 2) + ">" + renderInline(m[2]) + "</h" + (m[1].length + 2) + ">");
    } else if ((m = line.match(/^\s*[-*]\s+(.*)$/)) || (m = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
      flushPara();
      const kind = /^\s*\d/.test(line) ? "ol" : "ul";
      if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
      out.push("<li>" + renderInline(m[1]) + "</li>");
    } else if (line.trim() === "") {
      flushPara(); closeList();
    } else {
      closeList(); para.push(line);
    }
  }
  flushPara(); closeList();
  return out.join("");
}

// The API key field every page carries: what is typed is kept in this browser.
function bindKeyField(input) {
  input.value = apiKey();
  input.addEventListener("change", () => setApiKey(input.value));
}

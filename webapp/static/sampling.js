// See the sampling: one draw, asked twice with the same seed (the draw repeats), once for the
// probabilities after the sampler chain (post_sampling_probs) and once for the model's own.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["n_predict", "temperature", "top_k", "top_p", "min_p", "seed", "n_probs"];
let before = [], after = [];

function request(postSampling) {
  const body = {prompt: $("prompt").value, post_sampling_probs: postSampling, cache_prompt: true};
  for (const f of FIELDS) body[f] = Number($(f).value);
  return api("completion", body);
}

function fillTable(table, entries, chosenId, valueOf) {
  const tbody = table.querySelector("tbody");
  tbody.textContent = "";
  for (const e of entries) {
    const tr = document.createElement("tr");
    tr.className = e.id === chosenId ? "chosen" : "";
    tr.dataset.id = e.id;
    const tok = document.createElement("td");
    tok.className = "token";
    tok.textContent = JSON.stringify(e.token);
    const p = document.createElement("td");
    p.className = "p";
    p.textContent = valueOf(e).toFixed(4);
    tr.append(tok, p);
    tbody.append(tr);
  }
}

function select(i, span) {
  document.querySelectorAll("#tokens .tok.selected").forEach((s) => s.classList.remove("selected"));
  span.classList.add("selected");
  $("alternatives").hidden = false;
  $("alternatives").dataset.index = i;
  fillTable($("before"), before[i].top_logprobs, before[i].id, (e) => Math.exp(e.logprob));
  fillTable($("after"), after[i].top_probs, after[i].id, (e) => e.prob);
}

$("generate").onclick = async () => {
  $("error").textContent = "";
  $("generate").disabled = true;
  try {
    const [a, b] = [await request(true), await request(false)];
    after = a.completion_probabilities || [];
    before = b.completion_probabilities || [];
    if (after.length !== before.length || after.some((p, i) => p.id !== before[i].id)) {
      throw new Error("the two draws differ: set a seed (>= 0) to replay the same draw");
    }
    const box = $("tokens");
    box.textContent = "";
    after.forEach((p, i) => {
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.index = i;
      span.textContent = p.token;
      span.title = "p = " + p.prob.toFixed(4);
      span.style.background = "rgba(47, 111, 222, " + (0.08 + 0.6 * p.prob).toFixed(3) + ")";
      span.onmouseenter = () => select(i, span);
      span.onclick = () => select(i, span);
      box.append(span);
    });
    $("alternatives").hidden = true;
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("generate").disabled = false;
  }
};
bindKeyField($("api-key"));

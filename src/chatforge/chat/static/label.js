/* chatforge label: the ranking page `chatforge label` shows at /.
 *
 * One prompt at a time: its K answers in a list that IS the ranking (best first). The
 * annotator orders it by dragging, by the ▲ ▼ buttons, or from the keyboard (1..K pick the
 * order, Shift+arrows move, t ties the selected answer with the one above), may mark all
 * answers unacceptable, write a better answer and a comment, then submits (Enter) or skips.
 * The server stores every judgement at once; this page keeps no state worth losing.
 *
 * Safety: answers are model output, shown only through textContent; no innerHTML here.
 * API: GET health, GET api/next?annotator=, POST api/judge, GET api/progress (relative URLs).
 */
"use strict";

const NAME_STORE = "chatforge.label.annotator";
const KEY_STORE = "chatforge.label.apiKey";  // sessionStorage: this tab only
const $ = (id) => document.getElementById(id);

const state = {
  item: null,      // {item, prompt, candidates: [text]} from api/next
  order: [],       // shown positions, best first
  tied: new Set(), // shown positions tied with the answer just above them
  picked: [],      // positions picked with the number keys, in order
  selected: null,  // the position arrows / t act on
  touched: false,  // the order has been set (an untouched list is not a ranking)
  busy: false,
};

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function say(text, error = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", error);
}

// ------------------------------------------------------------------ the API
async function api(method, path, body) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch { data = null; }
  if (!r.ok) {
    if (r.status === 401) showKey();
    const msg = (data && data.error && data.error.message) || r.statusText;
    throw new Error(`${r.status}: ${msg}`);
  }
  return data;
}

function showKey() {
  $("api-key").hidden = false;
  $("api-key-label").hidden = false;
}

// ------------------------------------------------------------------ the ranking
function tiers() {
  const out = [];
  let t = 0;
  state.order.forEach((pos, i) => {
    if (i > 0 && !state.tied.has(pos)) t += 1;
    out.push(t);
  });
  return out;
}

function render() {
  const list = $("candidates");
  const ts = tiers();
  const items = state.order.map((pos, i) => {
    const tiedUp = i > 0 && state.tied.has(pos);
    const li = el("li", { class: "cand", draggable: "true", "data-pos": String(pos),
                          "aria-label": `answer ${pos + 1}, rank ${ts[i] + 1}` });
    li.classList.toggle("selected", state.selected === pos);
    li.classList.toggle("picked", state.picked.includes(pos));
    li.classList.toggle("tied", tiedUp);
    const rank = el("div", { class: "rank", text: `${ts[i] + 1}.` },
                    [el("span", { class: "key", text: `key ${pos + 1}` })]);
    if (tiedUp) rank.append(el("span", { class: "tie-mark", text: "= tied" }));
    const up = el("button", { type: "button", class: "up", "aria-label": "move up", text: "▲" });
    const down = el("button", { type: "button", class: "down", "aria-label": "move down", text: "▼" });
    const tie = el("button", { type: "button", class: "tie", "aria-label": "tie with the answer above", text: "=" });
    up.addEventListener("click", () => move(pos, -1));
    down.addEventListener("click", () => move(pos, +1));
    tie.addEventListener("click", () => toggleTie(pos));
    li.append(rank, el("div", { class: "text", text: state.item.candidates[pos] }),
              el("div", { class: "moves" }, [up, down, tie]));
    li.addEventListener("click", (e) => { if (e.target === li || e.target.closest(".text")) select(pos); });
    li.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("text/plain", String(pos));
      e.dataTransfer.effectAllowed = "move";
      li.classList.add("dragging");
    });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "move"; });
    li.addEventListener("drop", (e) => {
      e.preventDefault();
      const from = Number(e.dataTransfer.getData("text/plain"));
      if (Number.isInteger(from) && from !== pos) place(from, state.order.indexOf(pos));
    });
    return li;
  });
  list.replaceChildren(...items);
}

function select(pos) {
  state.selected = pos;
  render();
}

/** Put the answer at shown position `pos` at index `to` of the ranking. */
function place(pos, to) {
  const from = state.order.indexOf(pos);
  if (from < 0 || to < 0 || to >= state.order.length) return;
  state.order.splice(from, 1);
  state.order.splice(to, 0, pos);
  state.picked = [];
  state.touched = true;
  state.selected = pos;
  render();
}

function move(pos, delta) {
  place(pos, state.order.indexOf(pos) + delta);
}

function pick(pos) {
  if (state.picked.includes(pos)) return;
  state.picked.push(pos);
  const k = state.order.length;
  if (state.picked.length === k - 1) state.picked.push(state.order.find((p) => !state.picked.includes(p)));
  state.order = state.picked.concat(state.order.filter((p) => !state.picked.includes(p)));
  state.touched = true;
  state.selected = pos;
  render();
}

function unpick() {
  if (state.picked.length === state.order.length) state.picked.pop();  // the one that followed
  state.picked.pop();
  render();
}

function toggleTie(pos) {
  if (state.order.indexOf(pos) === 0) {
    say("The best answer has nothing above it to tie with.", true);
    return;
  }
  if (state.tied.has(pos)) state.tied.delete(pos); else state.tied.add(pos);
  state.touched = true;
  state.selected = pos;
  render();
}

function resetOrder() {
  state.order = state.item.candidates.map((_, i) => i);
  state.tied = new Set();
  state.picked = [];
  state.touched = false;
  state.selected = null;
  render();
}

// ------------------------------------------------------------------ items and judgements
function name() {
  return $("annotator").value.trim();
}

function showCounts(d) {
  $("counts").textContent = `done ${d.done} · to do ${d.todo} · ${d.items} items`;
}

async function loadNext() {
  state.item = null;
  $("task").hidden = true;
  if (!name()) {
    say("Enter your name to start.");
    return;
  }
  let d;
  try {
    d = await api("GET", `api/next?annotator=${encodeURIComponent(name())}`);
  } catch (e) {
    say(String(e.message), true);
    return;
  }
  showCounts(d);
  if (d.item === null) {
    say("Nothing left for you to rank. Thank you!");
    return;
  }
  state.item = d;
  const prompt = $("prompt");
  prompt.replaceChildren(...d.prompt.map((m) => el("div", { class: `turn ${m.role}` },
    [el("span", { class: "role", text: m.role }), m.content])));
  $("unacceptable").checked = false;
  $("demo").value = "";
  $("comment").value = "";
  resetOrder();
  $("task").hidden = false;
  if (document.activeElement && $("task").contains(document.activeElement)) document.activeElement.blur();
}

async function send(action) {
  if (!state.item || state.busy) return;
  const body = { annotator: name(), item: state.item.item, action,
                 unacceptable: $("unacceptable").checked, demonstration: $("demo").value,
                 comment: $("comment").value };
  if (action === "rank") {
    if (!state.touched && !body.unacceptable) {
      say("Rank the answers first: drag them, or press their numbers best first.", true);
      return;
    }
    body.order = state.order.slice();
    // "all unacceptable" with the list untouched states no order among them: all tied (no pair),
    // never the random shown order
    body.tiers = state.touched ? tiers() : state.order.map(() => 0);
  }
  state.busy = true;
  try {
    const r = await api("POST", "api/judge", body);
    say(r.duplicate ? "Already saved earlier." : (action === "skip" ? "Skipped." : "Saved."));
    await loadNext();
  } catch (e) {
    say(`Not saved: ${e.message}`, true);
  } finally {
    state.busy = false;
  }
}

// ------------------------------------------------------------------ keys
function onKey(e) {
  if (!$("progress").hidden || !state.item || e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  const typing = t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "checkbox");
  if (typing) {
    if (e.key === "Escape") t.blur();
    else if (e.key === "Enter" && t.id === "comment") { e.preventDefault(); send("rank"); }
    return;
  }
  const k = state.order.length;
  const n = Number(e.key);
  let handled = true;
  if (/^[1-9]$/.test(e.key) && n <= k) pick(n - 1);
  else if (e.key === "Backspace") unpick();
  else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
    const delta = e.key === "ArrowUp" ? -1 : 1;
    if (state.selected === null) select(state.order[0]);
    else if (e.shiftKey) move(state.selected, delta);
    else {
      const i = Math.min(k - 1, Math.max(0, state.order.indexOf(state.selected) + delta));
      select(state.order[i]);
    }
  } else if (e.key === "t") {
    if (state.selected === null) say("Select an answer first (↑ ↓).", true); else toggleTie(state.selected);
  } else if (e.key === "u") $("unacceptable").checked = !$("unacceptable").checked;
  else if (e.key === "s") send("skip");
  else if (e.key === "r") resetOrder();
  else if (e.key === "d") $("demo").focus();
  else if (e.key === "c") $("comment").focus();
  else if (e.key === "Enter") send("rank");
  else handled = false;
  if (handled) e.preventDefault();
}

// ------------------------------------------------------------------ progress
function cell(v) {
  return el("td", { text: v === null || v === undefined ? "–" : String(v) });
}

function fmt(x) {
  return x === null || x === undefined ? null : x.toFixed(3);
}

async function showProgress() {
  $("ranker").hidden = true;
  $("progress").hidden = false;
  let p;
  try {
    p = await api("GET", "api/progress");
  } catch (e) {
    $("progress-summary").textContent = String(e.message);
    return;
  }
  const overall = p.overall ? `; agreement ${fmt(p.overall.pairwise_agreement)} over ${p.overall.items} double-ranked ` +
    `item(s), Kendall tau ${fmt(p.overall.kendall_tau) ?? "–"}` : "";
  $("progress-summary").textContent = `${p.complete} of ${p.items} items complete, ${p.todo} to do ` +
    `(${p.double} to be ranked by two people)${overall}.`;
  $("annotators").tBodies[0].replaceChildren(...p.annotators.map((a) => el("tr", {},
    [cell(a.name), cell(a.ranked), cell(a.skipped), cell(a.unacceptable), cell(a.demonstrations), cell(a.todo)])));
  $("agreement").tBodies[0].replaceChildren(...p.agreement.map((a) => el("tr", {},
    [cell(a.annotators.join(" & ")), cell(a.items), cell(fmt(a.pairwise_agreement)), cell(fmt(a.kendall_tau))])));
}

function hideProgress() {
  $("progress").hidden = true;
  $("ranker").hidden = false;
  if (location.hash === "#progress") history.replaceState(null, "", location.pathname);
}

// ------------------------------------------------------------------ start
async function start() {
  $("annotator").value = localStorage.getItem(NAME_STORE) || "";
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  try {
    const h = await (await fetch("health")).json();
    if (h.auth) showKey();
  } catch { /* the next request says what is wrong */ }
  $("annotator").addEventListener("change", () => {
    localStorage.setItem(NAME_STORE, name());
    loadNext();
  });
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadNext();
  });
  $("submit").addEventListener("click", () => send("rank"));
  $("skip").addEventListener("click", () => send("skip"));
  $("reset").addEventListener("click", resetOrder);
  $("show-progress").addEventListener("click", showProgress);
  $("hide-progress").addEventListener("click", hideProgress);
  document.addEventListener("keydown", onKey);
  if (location.hash === "#progress") showProgress();
  await loadNext();
}

start();

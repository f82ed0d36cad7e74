/* chatforge web chat: the page `chatforge serve` shows at /.
 *
 * Why no framework: the page is a text box, a list of messages and one streaming fetch.
 * Plain DOM code does that in a few hundred lines, with no build step, no npm and no CDN
 * (the page works offline and on an air-gapped machine), and a reader can follow it top to
 * bottom. It talks to the server only through the OpenAI API (relative URLs, so any host or
 * port works): GET v1/models, optional GET v1/config, POST v1/chat/completions (SSE).
 *
 * Safety: model output is NEVER parsed as HTML. The small markdown renderer below builds
 * every node with createElement / textContent / append(string), and links only get an href
 * when it is http(s). A reply containing <script> or <img onerror=...> is shown as text.
 * There is no innerHTML anywhere in this file.
 */
"use strict";

const FALLBACK = { temperature: 0.7, top_p: 0.9, max_tokens: 512 };  // when the server publishes none
const KEY_STORE = "chatforge.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  history: [],   // [{role, content, view}] -- user and assistant turns; the system prompt is the field
  models: [],
  ctrl: null,    // the AbortController of the reply being streamed
};

// ------------------------------------------------------------------ DOM helpers
/** createElement with attributes ("text" = textContent) and children (strings become text nodes). */
function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // no clipboard API (plain http on another host) or permission refused: the old way
    const ta = el("textarea", { readonly: "", class: "offscreen" });
    ta.value = text;
    document.body.append(ta);
    ta.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    ta.remove();
    return ok;
  }
}

function copyButton(getText, label) {
  const b = el("button", { type: "button", class: "copy", "aria-label": label, text: "Copy" });
  b.addEventListener("click", async () => {
    b.textContent = (await copyText(getText())) ? "Copied" : "Copy failed";
    setTimeout(() => { b.textContent = "Copy"; }, 1500);
  });
  return b;
}

// ------------------------------------------------------------------ markdown, safely
// One pass over the lines for blocks (fences, headings, lists, quotes, rules, paragraphs),
// one regex for inline spans. An unclosed fence runs to the end: that is what a reply being
// streamed looks like.
const INLINE = new RegExp([
  /(`+)(?!`)([\s\S]+?)(?<!`)\1(?!`)/.source,                // 1,2 `code`
  /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source,  // 3,4 **bold** __bold__
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,                  // 5 *italic*
  /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source,       // 6 _italic_ (not snake_case)
  /\[([^\]\n]+)\]\(([^()\s]+)\)/.source,                    // 7,8 [text](url)
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source,        // 9 a bare URL
].join("|"), "g");

function safeLink(label, url) {
  if (/^https?:\/\//i.test(url)) {
    try {
      const u = new URL(url);
      return el("a", { href: u.href, target: "_blank", rel: "noopener noreferrer" }, [label]);
    } catch { /* not a URL: text below */ }
  }
  return document.createTextNode(label === url ? url : `[${label}](${url})`);
}

function renderInline(text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    parent.append(text.slice(last, m.index));
    if (m[2] !== undefined) parent.append(el("code", { text: m[2] }));
    else if (m[3] !== undefined || m[4] !== undefined) parent.append(renderInline(m[3] ?? m[4], el("strong")));
    else if (m[5] !== undefined || m[6] !== undefined) parent.append(renderInline(m[5] ?? m[6], el("em")));
    else if (m[7] !== undefined) parent.append(safeLink(m[7], m[8]));
    else parent.append(safeLink(m[9], m[9]));
    last = m.index + m[0].length;
  }
  parent.append(text.slice(last));
  return parent;
}

function codeBlock(code, lang) {
  const codeEl = el("code", { text: code });
  if (lang) codeEl.className = "language-" + lang;
  return el("div", { class: "code" }, [
    el("div", { class: "code-bar" }, [el("span", { class: "lang", text: lang || "text" }),
                                      copyButton(() => code, "Copy code")]),
    el("pre", {}, [codeEl]),
  ]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const ITEM = /^ {0,6}([-*+]|\d{1,9}[.)])\s+(.*)$/;

function renderMarkdown(src, container) {
  container.replaceChildren();
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  let para = [];
  const flush = () => {
    if (para.length) container.append(renderInline(para.join("\n"), el("p")));
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      flush();
      const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
      const code = [];
      while (++i < lines.length && !close.test(lines[i])) code.push(lines[i]);
      container.append(codeBlock(code.join("\n"), m[2]));
    } else if ((m = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line))) {
      flush();
      container.append(renderInline(m[2], el("h" + Math.min(6, m[1].length + 1))));
    } else if (/^ {0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      container.append(el("hr"));
    } else if ((m = ITEM.exec(line))) {
      flush();
      const ordered = /\d/.test(m[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[1], 10) !== 1) list.setAttribute("start", String(parseInt(m[1], 10)));
      let item = [m[2]];
      const addItem = () => list.append(renderInline(item.join("\n"), el("li")));
      while (i + 1 < lines.length) {
        const next = lines[i + 1], n = ITEM.exec(next);
        if (n && /\d/.test(n[1]) === ordered) { addItem(); item = [n[2]]; }
        else if (!n && /^\s{2,}\S/.test(next)) item.push(next.trim());  // continuation of the item
        else break;
        i++;
      }
      addItem();
      container.append(list);
    } else if (/^ {0,3}>/.test(line)) {
      flush();
      const quote = [];
      for (; i < lines.length && /^ {0,3}>/.test(lines[i]); i++) quote.push(lines[i].replace(/^ {0,3}> ?/, ""));
      i--;
      container.append(renderInline(quote.join("\n"), el("blockquote")));
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
  }
  flush();
}

// ------------------------------------------------------------------ messages
const messagesEl = $("messages");

function nearBottom() {
  return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
}

function addMessage(role, content) {
  const entry = { role, content, view: null };
  const body = el("div", { class: "body" });
  const tools = el("div", { class: "tools" }, [copyButton(() => entry.content, "Copy message")]);
  const view = el("article", { class: "msg " + role, "aria-label": role === "user" ? "You" : "Assistant" },
                  [el("div", { class: "who", text: role === "user" ? "You" : "Assistant" }), body, tools]);
  entry.view = view;
  entry.body = body;
  show(entry);
  messagesEl.append(view);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  state.history.push(entry);
  return entry;
}

function show(entry) {
  const stick = nearBottom();
  if (entry.role === "user") entry.body.textContent = entry.content;  // the user's own text, as typed
  else renderMarkdown(entry.content, entry.body);
  if (stick) messagesEl.scrollTop = messagesEl.scrollHeight;
}

function addNote(text, kind = "error") {
  const note = el("div", { class: "note " + kind, role: kind === "error" ? "alert" : "status", text });
  messagesEl.append(note);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return note;
}

function removeEntry(entry) {
  state.history = state.history.filter((e) => e !== entry);
  entry.view.remove();
}

// ------------------------------------------------------------------ settings
function systemMessages() {
  const s = $("system").value.trim();
  return s ? [{ role: "system", content: s }] : [];
}

function transcript() {
  return [...systemMessages(), ...state.history.map(({ role, content }) => ({ role, content }))];
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function number(id, integer = false) {
  const v = $(id).valueAsNumber;
  if (!Number.isFinite(v)) return undefined;  // empty or not a number: the server's default
  return integer ? Math.round(v) : v;
}

const touched = new Set();  // fields the user changed: server defaults do not overwrite them
for (const id of ["temperature", "top-p", "max-tokens"]) $(id).addEventListener("input", () => touched.add(id));

/** Sampling defaults the server may publish (a /v1/models entry or /v1/config), in any of a few
 *  shapes; later ones win: `chat_defaults` (what `chatforge serve` measured for a run) last. */
function applyDefaults(obj) {
  if (!obj || typeof obj !== "object") return;
  for (const src of [obj, obj.defaults, obj.sampling, obj.sampling_defaults, obj.default_sampling, obj.chat_defaults]) {
    if (!src || typeof src !== "object") continue;
    for (const [key, id] of [["temperature", "temperature"], ["top_p", "top-p"], ["max_tokens", "max-tokens"],
                             ["max_new_tokens", "max-tokens"]]) {
      if (typeof src[key] === "number" && !touched.has(id)) $(id).value = String(src[key]);
    }
  }
}

async function errorText(res) {
  let message = "";
  try {
    const raw = await res.text();
    message = raw;
    const j = JSON.parse(raw);
    message = j?.error?.message ?? j?.detail ?? j?.message ?? raw;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch { /* not JSON: the raw text */ }
  let text = `Error ${res.status}${res.statusText ? " " + res.statusText : ""}${message ? ": " + message : ""}`;
  if (res.status === 401) text += " (enter the server's API key under Settings)";
  return text;
}

function setModels(ids) {
  state.models = ids;
  const select = $("model-select");
  select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
  select.hidden = ids.length < 2;
  $("model-name").textContent = ids[0] ?? "none";
}

async function loadModels() {
  try {
    const res = await fetch("v1/models", { headers: headers() });
    if (!res.ok) {
      $("model-name").textContent = "unknown";
      addNote(await errorText(res));
      return;
    }
    const data = (await res.json())?.data ?? [];
    setModels(data.map((m) => m.id).filter(Boolean));
    applyDefaults(data[0]);
  } catch (e) {
    $("model-name").textContent = "unreachable";
    addNote("Cannot reach the server: " + e.message);
    return;
  }
  try {
    const res = await fetch("v1/config", { headers: headers() });
    if (res.ok) applyDefaults(await res.json());
  } catch { /* optional */ }
}

// ------------------------------------------------------------------ streaming
/** Server-sent events from a fetch body: yields each `data:` JSON object until [DONE].
 *  Reads may split an event (or a UTF-8 character) anywhere: text is buffered until a blank line. */
async function* sse(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buf))) {
        const block = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;  // a comment or keep-alive
        if (data.trim() === "[DONE]") return;
        let chunk;
        try { chunk = JSON.parse(data); } catch {
          throw new Error("The server sent a chunk that is not JSON: " + data.slice(0, 80));
        }
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  messagesEl.setAttribute("aria-busy", String(busy));
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.ctrl) return;
  $("input").value = "";
  const prior = transcript();
  const user = addMessage("user", text);
  const bot = addMessage("assistant", "");
  bot.view.classList.add("streaming");
  const ctrl = (state.ctrl = new AbortController());
  setBusy(true);
  const request = {
    model: $("model-select").value || state.models[0],
    messages: [...prior, { role: "user", content: text }],
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: number("max-tokens", true),
  };
  const started = performance.now();
  let chunks = 0, usage = null, pending = false, error = null;
  try {
    const res = await fetch("v1/chat/completions", { method: "POST", headers: headers(),
                                                     body: JSON.stringify(request), signal: ctrl.signal });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const chunk of sse(res.body)) {
      if (chunk.error) throw new Error("Server error: " + (chunk.error.message ?? JSON.stringify(chunk.error)));
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        chunks++;
        bot.content += delta;
        if (!pending) {  // at most one re-render per frame, however fast the chunks come
          pending = true;
          requestAnimationFrame(() => { pending = false; show(bot); });
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") error = e.message || String(e);
  }
  if (state.ctrl === ctrl) {  // (New chat may already have let go of this reply)
    state.ctrl = null;
    setBusy(false);
  }
  bot.view.classList.remove("streaming");
  show(bot);
  if (ctrl.signal.aborted) bot.view.append(el("div", { class: "stopped", text: "(stopped)" }));
  if (error && !bot.content) {  // nothing came back: forget the turn, give the text back to retry
    removeEntry(bot);
    removeEntry(user);
    if (!$("input").value) $("input").value = text;
  }
  if (error) addNote(error);
  const seconds = (performance.now() - started) / 1000;
  if ((usage?.completion_tokens || chunks) && seconds > 0) {
    $("speed").textContent = usage?.completion_tokens
      ? `${(usage.completion_tokens / seconds).toFixed(1)} tok/s`
      : `≈${(chunks / seconds).toFixed(1)} tok/s (chunks)`;
  }
}

// ------------------------------------------------------------------ buttons
function newChat() {
  state.ctrl?.abort();
  state.ctrl = null;
  setBusy(false);
  state.history = [];
  messagesEl.replaceChildren();
  $("speed").textContent = "";
  $("input").focus();
}

function exportChat() {
  const blob = new Blob([JSON.stringify(transcript(), null, 2) + "\n"], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const a = el("a", { href: url, download: `chat-${stamp}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function rememberKey() {
  try {
    const key = $("api-key").value.trim();
    if ($("remember").checked && key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch { /* storage disabled: the key lives in the field only */ }
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => state.ctrl?.abort());
$("new-chat").addEventListener("click", newChat);
$("export").addEventListener("click", exportChat);
$("model-select").addEventListener("change", (e) => { $("model-name").textContent = e.target.value; });
$("remember").addEventListener("change", rememberKey);
$("api-key").addEventListener("input", rememberKey);
$("api-key").addEventListener("change", loadModels);

try {
  const saved = localStorage.getItem(KEY_STORE);
  if (saved) { $("api-key").value = saved; $("remember").checked = true; }
} catch { /* storage disabled */ }
if (window.matchMedia("(min-width: 800px)").matches) $("settings").open = true;
applyDefaults(FALLBACK);
loadModels();
$("input").focus();

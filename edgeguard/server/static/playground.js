// The edgeguard playground. It talks to the server only through its public endpoints
// (/v1/models, /v1/check, WebSocket /v1/stream) and writes every text with textContent, so
// nothing a user types (or a model answers) is ever parsed as HTML.
"use strict";

const LABELS = ["Safe", "Controversial", "Unsafe"];
const KEY_STORE = "edgeguard-api-key"; // sessionStorage: the key lives in this tab only
const LIVE_CHUNK = 4; // code points per /v1/stream text frame in live mode
const LIVE_DELAY_MS = 20; // between frames, so the colors arrive as a generation's would
// Browsers cannot set headers on a WebSocket: /v1/stream takes the key as the subprotocol
// "bearer.<key>" (offered next to "edgeguard"), which allows only HTTP token characters.
const SUBPROTOCOL_KEY = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

const $ = (id) => document.getElementById(id);
const state = { gen: null, stream: null, keyNeeded: false, upstreamModel: null, chat: [] };

function apiKey() {
  return sessionStorage.getItem(KEY_STORE);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, withKey = true) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (withKey && apiKey() !== null) headers["Authorization"] = "Bearer " + apiKey();
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    throw new ApiError(r.status, `${method} ${path}: HTTP ${r.status}, not JSON`);
  }
  if (!r.ok) {
    const message = data && data.error ? data.error.message : `HTTP ${r.status}`;
    throw new ApiError(r.status, `${method} ${path}: ${message}`);
  }
  return data;
}

function element(tag, text, attrs = {}) {
  const el = document.createElement(tag);
  if (text !== undefined && text !== null) el.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function setLabel(el, label, text) {
  el.dataset.label = label || "";
  el.textContent = text === undefined ? label || "" : text;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

// -- the API key ------------------------------------------------------------------------
function askForKey(message) {
  const form = $("key-form");
  form.hidden = false;
  form.querySelector("label").textContent = message;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  start();
});

// -- what the server runs ---------------------------------------------------------------
async function start() {
  try {
    // /ready names the loaded guards (with --upstream, /v1/models lists the upstream's models).
    const ready = await fetch("/ready").then((r) => r.json());
    // Without the key first: a 401 tells that the server has one, whatever this tab holds.
    const probe = await fetch("/v1/models");
    state.keyNeeded = probe.status === 401;
    let list = null;
    if (!state.keyNeeded) {
      list = probe.ok ? await probe.json() : null;
    } else {
      if (apiKey() === null) {
        askForKey("This server needs its API key (--api-key). It stays in this tab only.");
        return;
      }
      list = await api("GET", "/v1/models").catch((e) => {
        if (e.status === 401) throw e; // anything else is the upstream's business, not the key's
        return null;
      });
    }
    useModels(ready.models);
    useUpstream(list);
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      askForKey("That key was refused; type the server's API key again.");
      return;
    }
    showError(String(e.message || e));
  }
}

function useModels(models) {
  state.gen = models.gen || null;
  state.stream = models.stream || null;
  const names = [];
  if (state.gen) names.push(`Gen: ${state.gen}`);
  if (state.stream) names.push(`Stream: ${state.stream}`);
  $("models").textContent = names.join(" · ");
  $("gen-model").textContent = state.gen || "";
  $("stream-model").textContent = state.stream || "";
  $("check").disabled = false;
  const note = $("live-note");
  if (!state.stream) {
    note.textContent = "Live mode needs a Stream model (edgeguard serve --stream-model).";
  } else if (state.keyNeeded && !SUBPROTOCOL_KEY.test(apiKey())) {
    note.textContent = "Live mode is off: a browser sends the API key to /v1/stream as a WebSocket " +
      "subprotocol, which allows only letters, digits and !#$%&'*+-.^_`|~. Check shows the same per-token verdicts.";
    $("live").disabled = true;
  } else {
    note.textContent = "";
    $("live").disabled = false;
  }
  note.hidden = !note.textContent;
}

// With --upstream, /v1/models lists the upstream's models: the chat box talks to the first.
function useUpstream(list) {
  const theirs = ((list && list.data) || []).filter((m) => m.owned_by !== "edgeguard");
  if (!theirs.length) return;
  state.upstreamModel = theirs[0].id;
  $("chat-upstream").textContent = `model: ${state.upstreamModel}`;
  $("chat").hidden = false;
}

// -- rendering --------------------------------------------------------------------------
function scoresText(scores) {
  return LABELS.filter((l) => l in scores).map((l) => `${l} ${scores[l].toFixed(3)}`).join(" · ");
}

function policyText(v) {
  return `${v.flagged ? "flagged" : "not flagged"} (${v.policy} policy)`;
}

function showGen(v) {
  $("gen").hidden = false;
  setLabel($("gen-label"), v.label);
  const bars = $("gen-bars");
  bars.replaceChildren();
  for (const label of LABELS) {
    const p = v.scores[label];
    const fill = element("div");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    const bar = element("div", null, { class: "bar", "data-label": label, title: `${label} ${p}` });
    bar.append(fill);
    bars.append(element("span", label), bar, element("span", p.toFixed(3), { class: "muted" }));
  }
  $("gen-categories").textContent = v.categories.length ? v.categories.join(", ") : "none";
  $("gen-refusal").textContent = v.refusal === null ? "— (no response)" : v.refusal;
  $("gen-flagged").textContent = policyText(v);
}

function addToken(t) {
  const span = element("span", t.text, {
    class: "token",
    "data-index": String(t.index),
    "data-label": t.label,
    title: `#${t.index} ${t.label}${t.category ? " (" + t.category + ")" : ""}\n${scoresText(t.scores)}`,
  });
  $("tokens").append(span);
}

function markFlagged(index) {
  for (const el of $("tokens").querySelectorAll(".flagged-at")) el.classList.remove("flagged-at");
  if (index === null || index === undefined) return;
  const span = $("tokens").querySelector(`span.token[data-index="${Number(index)}"]`);
  if (span) span.classList.add("flagged-at");
}

function showStreamPrompt(v) {
  $("stream").hidden = false;
  setLabel($("stream-prompt"), v.label, v.label + (v.categories.length ? ` (${v.categories.join(", ")})` : ""));
}

// The response's debounced verdict: {label, category, flagged_at, flagged, policy?}, n tokens.
function showStreamResponse(v, n) {
  setLabel($("stream-label"), v.label, v.label + (v.category ? ` (${v.category})` : ""));
  const where = v.flagged_at === null ? "the debounce did not fire" : `the debounce fired at token ${v.flagged_at}`;
  const policy = v.policy ? `, ${policyText(v)}` : `, ${v.flagged ? "flagged" : "not flagged"}`;
  $("stream-detail").textContent = `${n} tokens; ${where}${policy}`;
  markFlagged(v.flagged_at);
}

function resetResults() {
  showError("");
  const verdict = $("verdict");
  verdict.dataset.state = "pending";
  setLabel(verdict, "", "");
  $("gen").hidden = true;
  $("stream").hidden = true;
  $("tokens").replaceChildren();
  for (const id of ["gen-label", "stream-prompt", "stream-label"]) setLabel($(id), "", "");
  $("stream-detail").textContent = "";
}

// -- checking ---------------------------------------------------------------------------
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function liveStream(prompt, response) {
  return new Promise((resolve, reject) => {
    const url = new URL("/v1/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url, state.keyNeeded ? ["edgeguard", "bearer." + apiKey()] : ["edgeguard"]);
    let final = null;
    let count = 0;
    let failure = null;
    ws.onopen = async () => {
      ws.send(JSON.stringify({ prompt }));
      const points = Array.from(response); // by code point: a chunk never splits a surrogate pair
      for (let i = 0; i < points.length && ws.readyState === WebSocket.OPEN; i += LIVE_CHUNK) {
        ws.send(JSON.stringify({ text: points.slice(i, i + LIVE_CHUNK).join("") }));
        await sleep(LIVE_DELAY_MS);
      }
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ finish: true }));
    };
    ws.onmessage = (message) => {
      const m = JSON.parse(message.data);
      if (m.event === undefined) {
        addToken(m);
        count += 1;
      } else if (m.event === "prompt") {
        showStreamPrompt(m);
      } else if (m.event === "flagged") {
        markFlagged(m.flagged_at);
      } else if (m.event === "verdict") {
        final = m;
        showStreamResponse(m, count);
      } else if (m.event === "error") {
        failure = `/v1/stream: ${m.error.message}`;
      }
    };
    ws.onclose = (event) => {
      if (final !== null) resolve(final);
      else reject(new Error(failure || `/v1/stream closed (code ${event.code}) before its verdict`));
    };
  });
}

async function checkGen(prompt, response) {
  const v = await api("POST", "/v1/check", { model: state.gen, prompt, ...(response ? { response } : {}) });
  showGen(v);
  return v;
}

async function checkStream(prompt, response, live) {
  $("stream").hidden = false;
  if (!response) {
    const v = await api("POST", "/v1/check", { model: state.stream, prompt });
    showStreamPrompt(v);
    setLabel($("stream-label"), "", "");
    $("stream-detail").textContent = "no response to judge";
    return v;
  }
  if (live) return liveStream(prompt, response);
  const [p, v] = await Promise.all([
    api("POST", "/v1/check", { model: state.stream, prompt }),
    api("POST", "/v1/check", { model: state.stream, prompt, response, tokens: true }),
  ]);
  showStreamPrompt(p);
  for (const t of v.tokens) addToken(t);
  showStreamResponse({ ...v, category: v.categories[0] || null }, v.response_tokens);
  return v;
}

async function check() {
  const prompt = $("prompt").value;
  const response = $("response").value || null;
  const live = $("live").checked && !$("live").disabled;
  resetResults();
  $("check").disabled = true;
  const verdict = $("verdict");
  try {
    const [gen, stream] = await Promise.all([
      state.gen ? checkGen(prompt, response) : null,
      state.stream ? checkStream(prompt, response, live) : null,
    ]);
    // The server's own default for /v1/check: Gen when loaded, else Stream.
    const main = gen || stream;
    const where = gen ? "Gen" : "Stream";
    setLabel(verdict, main.label, `${where}: ${main.label} — ${main.flagged ? "flagged" : "not flagged"}`);
    verdict.dataset.state = "done";
  } catch (e) {
    verdict.dataset.state = "error";
    if (e.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      askForKey("That key was refused; type the server's API key again.");
    }
    showError(String(e.message || e));
  } finally {
    $("check").disabled = false;
  }
}

// -- chat through the proxy ---------------------------------------------------------------
function chatMessage(role, text) {
  const el = element("div", text, { class: "message", "data-role": role });
  $("chat-log").append(el);
  return el;
}

// What the guard did with an answer, from the `edgeguard` object of its last chunk.
function guardNote(info) {
  const answer = info.answer || {};
  const what = answer.label ? `${answer.label}${answer.category ? " (" + answer.category + ")" : ""}` : "";
  if (info.action === "block") return `the prompt was refused: ${info.prompt.label}`;
  if (info.action === "cut") return `cut: ${what} at token ${info.flagged_at}; the upstream was stopped`;
  if (info.action === "care") return `continued after a flag at token ${info.flagged_at} ` +
    `(${info.care_retries} continuation${info.care_retries === 1 ? "" : "s"}); the final answer is ${what}`;
  return `judged ${what || "Safe"}, released as it came`;
}

// Reads an SSE body: calls onEvent with each `data:` payload, parsed.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let at;
    while ((at = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of event.split("\n")) {
        const data = line.startsWith("data:") ? line.slice(5).trim() : null;
        if (data && data !== "[DONE]") onEvent(JSON.parse(data));
      }
    }
  }
}

async function chatSend() {
  const text = $("chat-input").value;
  if (!text.trim()) return;
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  state.chat.push({ role: "user", content: text });
  chatMessage("user", text);
  const bubble = chatMessage("assistant", "");
  bubble.dataset.state = "pending";
  const released = element("span", "", { class: "released" });
  bubble.append(released);
  let content = "";
  let refusal = null;
  let info = null;
  try {
    const headers = { "Content-Type": "application/json" };
    if (state.keyNeeded) headers["Authorization"] = "Bearer " + apiKey();
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({ model: state.upstreamModel, messages: state.chat, stream: true }),
    });
    if (!r.ok) {
      const data = await r.json().catch(() => null);
      throw new Error(`/v1/chat/completions: ${data && data.error ? data.error.message : "HTTP " + r.status}`);
    }
    await readEvents(r.body, (chunk) => {
      if (chunk.error) throw new Error(`/v1/chat/completions: ${chunk.error.message}`);
      if (chunk.edgeguard) info = chunk.edgeguard;
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const piece = (choice.delta && choice.delta.content) || "";
      if (choice.finish_reason === "content_filter") {
        refusal = (refusal || "") + piece; // the refusal text, where the guard stopped the answer
      } else {
        content += piece;
        released.textContent = content;
      }
    });
    if (refusal !== null && info && info.action !== "care") {
      bubble.append(element("span", " ✂ ", { class: "cut-mark", title: "where the guard cut the answer" }),
        element("span", refusal, { class: "refusal" }));
    }
    if (info) bubble.append(element("span", guardNote(info), { class: "guard-note" }));
    bubble.dataset.action = info ? info.action : "none";
    state.chat.push({ role: "assistant", content: content + (refusal || "") });
  } catch (e) {
    bubble.dataset.action = "error";
    bubble.append(element("span", String(e.message || e), { class: "guard-note" }));
    state.chat.pop();
  } finally {
    bubble.dataset.state = "done";
    $("chat-send").disabled = false;
  }
}

$("chat-send").addEventListener("click", chatSend);
$("chat-new").addEventListener("click", () => {
  state.chat = [];
  $("chat-log").replaceChildren();
});
$("check").addEventListener("click", check);
start();

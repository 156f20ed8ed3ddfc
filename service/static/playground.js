// The hmt-serve playground: chat over /v1/chat/completions (a session per X-Session-Id), the
// session's memory from GET /sessions/{id}/memory, long documents through the append stream.
// Plain ES module, no dependencies: everything it needs is served by hmt-serve itself.

const $ = (id) => document.getElementById(id);
const DOC_CHUNK_CHARS = 120000; // a document goes in requests of about this size (the server bounds tokens per request)
const phone = window.matchMedia("(max-width: 760px)");

const state = {
  key: localStorage.getItem("hmt.key") || "",
  keysRequired: false,
  model: "",
  sessionId: "",
  messages: [], // the session's transcript, as the server keeps it
  complete: true, // false: the server's transcript lost older messages; continue with X-HMT-Messages: new
  controller: null, // the running reply's AbortController
  recalls: [],
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ----- HTTP ------------------------------------------------------------------------------------

async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  const all = { ...headers };
  if (state.key) all.Authorization = `Bearer ${state.key}`;
  if (body !== undefined) all["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers: all, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const error = (await response.json()).error;
      if (error && error.message) message = error.message;
    } catch { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function json(path, options) { return (await api(path, options)).json(); }

// Server-sent events of a fetch response: {event, data} per block.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// ----- status and formatting -------------------------------------------------------------------------

function say(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
  status.setAttribute("role", error ? "alert" : "status");
}

function fail(error) {
  if (error && error.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 401) {
    say("The server needs an API key: enter it under API key.", true);
    showSessions(true);
    $("api-key").focus();
    return;
  }
  say(error instanceof Error ? error.message : String(error), true);
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

const count = (n) => n.toLocaleString("en-US");
const percent = (weight) => (weight > 0 && weight < 0.005 ? "<1%" : `${Math.round(weight * 100)}%`);

function ago(unixSeconds) {
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

// ----- panels ----------------------------------------------------------------------------------------

function showPanel(button, panel, open) {
  panel.hidden = !open;
  button.setAttribute("aria-expanded", String(open));
}

function showSessions(open) { showPanel($("toggle-sessions"), $("sessions"), open); }

function showMemory(open) {
  showPanel($("toggle-memory"), $("memory"), open);
  if (open) refreshMemory();
}

// ----- sessions ---------------------------------------------------------------------------------------

function setSession(id) {
  state.sessionId = id;
  $("session-id").textContent = id || "none";
  if (id) {
    localStorage.setItem("hmt.session", id);
    history.replaceState(null, "", `#session=${encodeURIComponent(id)}`);
  }
  for (const button of $("session-list").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.id === id));
  }
}

// the server picks the id (a random one when the body names none)
async function createSession() { setSession((await json("/sessions", { method: "POST", body: {} })).id); }

async function newSession() {
  if (busy()) return;
  try {
    await createSession();
    state.messages = [];
    state.complete = true;
    state.recalls = [];
    render();
    say("New session: its memory starts empty.");
    await Promise.all([listSessions(), refreshMemory()]);
    $("prompt").focus();
  } catch (error) { fail(error); }
}

async function resume(id) {
  if (busy() || !id) return;
  try {
    await json(`/sessions/${encodeURIComponent(id)}`); // 404 for an unknown id
    setSession(id);
    await restore();
    say(`Resumed session ${id}.`);
    if (phone.matches) showSessions(false);
  } catch (error) { fail(error); }
}

async function restore() {
  const transcript = await json(`/sessions/${encodeURIComponent(state.sessionId)}/messages`);
  state.messages = transcript.messages.map(({ role, content }) => ({ role, content }));
  state.complete = transcript.complete;
  render();
  await refreshMemory();
}

async function listSessions() {
  if (state.keysRequired && !state.key) return;
  try {
    const listed = await json("/sessions");
    const list = $("session-list");
    list.replaceChildren();
    for (const session of listed.sessions) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.id = session.id;
      button.setAttribute("aria-current", String(session.id === state.sessionId));
      const name = document.createElement("span");
      name.textContent = session.id.length > 14 ? `${session.id.slice(0, 12)}…` : session.id;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = ago(session.last_used);
      button.title = `Resume ${session.id}`;
      button.append(name, meta);
      button.addEventListener("click", () => resume(session.id));
      const item = document.createElement("li");
      item.append(button);
      list.append(item);
    }
    if (!listed.sessions.length) {
      const item = document.createElement("li");
      item.className = "hint";
      item.textContent = "No sessions yet.";
      list.append(item);
    }
  } catch (error) { fail(error); }
}

// ----- chat ----------------------------------------------------------------------------------------

function busy() { return state.controller !== null; }

function setBusy(on) {
  document.body.dataset.busy = String(on);
  if (!on) document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1); // requests finished
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("doc-append").disabled = on;
  for (const button of $("messages").querySelectorAll(".who button")) button.disabled = on;
}

function bubble(message, index) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  item.dataset.index = String(index);
  const who = document.createElement("div");
  who.className = "who";
  const role = document.createElement("span");
  role.textContent = message.role === "user" ? "You" : message.role === "assistant" ? "HMT" : message.role;
  who.append(role);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = message.content;
  item.append(who, text);
  return item;
}

function render() {
  const list = $("messages");
  list.replaceChildren(...state.messages.map(bubble));
  // edit any of your messages; regenerate the last reply (both branch from the server's per-turn snapshots)
  const lastReply = state.messages.length - 1;
  state.messages.forEach((message, index) => {
    const who = list.children[index].querySelector(".who");
    if (message.role === "user" && state.complete) who.append(action("Edit", () => edit(index)));
    if (message.role === "assistant" && index === lastReply && state.complete) {
      who.append(action("Regenerate", () => regenerate()));
    }
  });
  list.scrollTop = list.scrollHeight;
}

function action(label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.className = label.toLowerCase();
  button.addEventListener("click", onClick);
  return button;
}

function settings() {
  const number = (id, fallback) => {
    const value = Number($(id).value);
    return Number.isFinite(value) && $(id).value !== "" ? value : fallback;
  };
  return {
    temperature: Math.min(2, Math.max(0, number("temperature", 0.7))),
    top_p: Math.min(1, Math.max(0.01, number("top-p", 1))),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 256))),
  };
}

async function ensureSession() {
  if (!state.sessionId) await createSession();
}

async function send(text) {
  if (busy() || !text.trim()) return;
  const message = { role: "user", content: text };
  // the whole history, so an edit or regenerate can branch; only the new message when the
  // server's transcript is incomplete (then it continues where the session stands)
  const delta = !state.complete;
  await reply([...state.messages, message], delta ? [message] : null);
}

async function regenerate() {
  if (busy()) return;
  const last = state.messages.length - 1;
  if (last < 0 || state.messages[last].role !== "assistant") return;
  await reply(state.messages.slice(0, last), null);
}

function edit(index) {
  if (busy()) return;
  const item = $("messages").children[index];
  const text = item.querySelector(".text");
  const area = document.createElement("textarea");
  area.value = state.messages[index].content;
  area.rows = 3;
  area.setAttribute("aria-label", "Edit message");
  const save = action("Save and send", () => {
    const edited = area.value.trim() ? area.value : state.messages[index].content;
    reply([...state.messages.slice(0, index), { role: "user", content: edited }], null);
  });
  const cancel = action("Cancel", () => render());
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); save.click(); }
    if (event.key === "Escape") { event.preventDefault(); render(); }
  });
  const row = document.createElement("div");
  row.className = "row";
  row.append(save, cancel);
  text.replaceWith(area, row);
  area.focus();
}

// Stream a reply to `messages` (sent whole, or only `newOnly` with X-HMT-Messages: new).
async function reply(messages, newOnly) {
  try { await ensureSession(); } catch (error) { fail(error); return; }
  const controller = new AbortController();
  state.controller = controller;
  state.messages = messages;
  render();
  const answer = { role: "assistant", content: "" };
  const item = bubble(answer, messages.length);
  item.classList.add("streaming");
  $("messages").append(item);
  const text = item.querySelector(".text");
  setBusy(true);
  say("");
  let stopped = false;
  try {
    const headers = { "X-Session-Id": state.sessionId };
    if (newOnly) headers["X-HMT-Messages"] = "new";
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal, headers,
      body: { model: state.model, messages: newOnly || messages, stream: true, ...settings() },
    });
    for await (const { data } of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        answer.content += delta;
        text.textContent = answer.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (error) {
    stopped = error && error.name === "AbortError";
    if (!stopped) fail(error);
  } finally {
    item.classList.remove("streaming");
    $("stop").disabled = true;
  }
  // still busy until the page shows what the server saved: no other request may overtake it
  await settle(messages.length + 1, stopped);
  await listSessions();
  state.controller = null;
  setBusy(false);
}

// After a reply, show what the server saved: a stopped reply is saved once the model thread sees
// the disconnect, so wait (briefly) for the transcript to hold it.
async function settle(expected, stopped) {
  try {
    for (let attempt = 0; attempt < 30; attempt += 1) {
      const transcript = await json(`/sessions/${encodeURIComponent(state.sessionId)}/messages`);
      if (transcript.messages.length >= expected || attempt === 29) {
        state.messages = transcript.messages.map(({ role, content }) => ({ role, content }));
        state.complete = transcript.complete;
        break;
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    render();
    if (stopped) {
      const last = $("messages").lastElementChild;
      if (last) last.classList.add("stopped");
      say("Stopped: the reply so far is kept in the session.");
    }
    await refreshMemory();
  } catch (error) { fail(error); }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ----- long documents -----------------------------------------------------------------------------------

function chunks(text) {
  const parts = [];
  let start = 0;
  while (start < text.length) {
    let end = Math.min(text.length, start + DOC_CHUNK_CHARS);
    if (end < text.length) { // cut at whitespace, so no word is split between two requests
      const space = text.lastIndexOf(" ", end);
      if (space > start + DOC_CHUNK_CHARS / 2) end = space;
    }
    parts.push(text.slice(start, end));
    start = end;
  }
  return parts;
}

async function appendDocument() {
  if (busy()) return;
  const text = $("doc-text").value;
  if (!text.trim()) { say("Paste a text or choose a file first.", true); return; }
  const progress = $("doc-progress");
  const status = $("doc-status");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  progress.value = 0;
  progress.max = 1;
  say("");
  try {
    await ensureSession();
    const parts = chunks(text);
    let tokens = 0;
    for (const [index, part] of parts.entries()) {
      const response = await api(`/sessions/${encodeURIComponent(state.sessionId)}/append`, {
        method: "POST", signal: controller.signal, headers: { Accept: "text/event-stream" }, body: { text: part },
      });
      for await (const { event, data } of events(response)) {
        const body = JSON.parse(data);
        if (event === "segment") {
          const within = body.segments_expected ? body.segments_committed / body.segments_expected : 1;
          progress.value = (index + within) / parts.length;
          status.textContent = `${count(body.tokens_seen)} tokens in the session, segment ${count(body.segments_total)}`;
          addRecall(body.recall);
          showStats({ tokens_seen: body.tokens_seen, segments_total: body.segments_total });
        } else if (event === "summary") {
          tokens += body.tokens_appended;
          progress.value = (index + 1) / parts.length;
        } else if (event === "error") {
          throw new Error(body.error.message);
        }
      }
    }
    progress.value = 1;
    status.textContent = `Read ${count(tokens)} tokens. Ask about it below.`;
    $("doc-text").value = "";
  } catch (error) {
    fail(error);
  }
  await refreshMemory();
  await listSessions();
  state.controller = null;
  setBusy(false);
}

async function loadFile() {
  const file = $("doc-file").files[0];
  if (!file) return;
  $("doc-text").value = await file.text();
  $("doc-status").textContent = `${file.name}: ${count(file.size)} bytes loaded; press Append to session.`;
}

// ----- memory ----------------------------------------------------------------------------------------

function showStats(memory) {
  if (memory.tokens_seen !== undefined) $("m-tokens").textContent = count(memory.tokens_seen);
  if (memory.segments_total !== undefined) $("m-segments").textContent = count(memory.segments_total);
  if (memory.memories !== undefined) $("m-memories").textContent = `${count(memory.memories)} of ${count(memory.memory_capacity)}`;
  if (memory.state_bytes === undefined) return;
  $("m-state").textContent = bytes(memory.state_bytes);
  $("m-kv").textContent = bytes(memory.kv_cache_bytes);
  const largest = Math.max(memory.state_bytes, memory.kv_cache_bytes, 1);
  $("bar-state").style.width = `${(100 * memory.state_bytes) / largest}%`;
  $("bar-kv").style.width = `${(100 * memory.kv_cache_bytes) / largest}%`;
  const ratio = memory.kv_cache_bytes / Math.max(memory.state_bytes, 1);
  $("m-ratio").textContent = memory.tokens_seen
    ? `A KV cache of this history would be ${ratio >= 10 ? Math.round(ratio) : ratio.toFixed(2)}x the session's state; the state stops growing once long-term memory is full.`
    : "";
}

async function refreshMemory() {
  if (!state.sessionId) return;
  try {
    const memory = await json(`/sessions/${encodeURIComponent(state.sessionId)}/memory`);
    showStats(memory);
    state.recalls = memory.recalls;
    drawRecalls();
  } catch (error) { fail(error); }
}

function addRecall(recall) {
  state.recalls = [...state.recalls.filter((r) => r.segment < recall.segment), recall].slice(-64);
  drawRecalls();
}

function drawRecalls() {
  const recalls = state.recalls;
  const list = $("recall-list");
  list.replaceChildren(...recalls.slice().reverse().map((recall) => {
    const item = document.createElement("li");
    item.className = "recall-entry";
    const top = recall.slots.map((slot, i) => `${slot} (${percent(recall.weights[i])})`);
    item.textContent = top.length ? `segment ${recall.segment} recalled ${top.join(", ")}` : `segment ${recall.segment}: memory empty`;
    return item;
  }));
  const canvas = $("recall-map");
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320;
  const rows = Math.max(recalls.length, 1);
  const rowHeight = Math.max(3, Math.min(14, Math.floor(240 / rows)));
  const height = rows * rowHeight + 18;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  canvas.style.height = `${height}px`;
  const context = canvas.getContext("2d");
  context.scale(scale, scale);
  context.clearRect(0, 0, width, height);
  if (!recalls.length) {
    context.fillStyle = "#5b6470";
    context.font = "12px system-ui, sans-serif";
    context.fillText("No segment committed yet.", 8, 14);
    canvas.setAttribute("aria-label", "Recall heatmap: no segment committed yet");
    return;
  }
  // x: the earlier segment a memory came from; y: the committed segment whose recall read it
  const first = Math.min(...recalls.map((r) => Math.min(r.segment, ...r.slots)));
  const last = Math.max(...recalls.map((r) => r.segment));
  const span = Math.max(last - first + 1, 1);
  const cell = (width - 8) / span;
  recalls.forEach((recall, row) => {
    const y = row * rowHeight;
    context.fillStyle = "#e4e7eb";
    context.fillRect(4 + (recall.segment - first) * cell, y, Math.max(cell, 1.5), rowHeight - 1);
    recall.slots.forEach((slot, i) => {
      context.fillStyle = `rgba(31, 78, 121, ${0.15 + 0.85 * Math.min(1, recall.weights[i] / recall.weights[0])})`;
      context.fillRect(4 + (slot - first) * cell, y, Math.max(cell, 2), rowHeight - 1);
    });
  });
  context.fillStyle = "#5b6470";
  context.font = "11px system-ui, sans-serif";
  context.fillText(`segment ${first}`, 4, height - 4);
  const label = `segment ${last}`;
  context.fillText(label, width - 4 - context.measureText(label).width, height - 4);
  canvas.setAttribute("aria-label", `Recall heatmap of segments ${recalls[0].segment} to ${last}`);
}

// ----- start --------------------------------------------------------------------------------------------

async function start() {
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", async () => {
    const key = $("api-key").value.trim();
    if (key === state.key && state.model) return; // Enter, then the blur: connect once
    state.key = key;
    localStorage.setItem("hmt.key", key);
    await connect();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("api-key").dispatchEvent(new Event("change"));
  });
  $("toggle-sessions").addEventListener("click", () => showSessions($("sessions").hidden));
  $("toggle-memory").addEventListener("click", () => showMemory($("memory").hidden));
  $("new-session").addEventListener("click", newSession);
  $("resume-form").addEventListener("submit", (event) => {
    event.preventDefault();
    resume($("resume-id").value.trim());
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || busy()) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && busy()) stop();
  });
  $("stop").addEventListener("click", stop);
  $("doc-append").addEventListener("click", appendDocument);
  $("doc-file").addEventListener("change", loadFile);
  showSessions(!phone.matches);
  const config = await (await fetch("/playground.json")).json();
  state.keysRequired = config.keys;
  await connect();
}

async function connect() {
  $("key-hint").textContent = state.keysRequired ? "This server requires a key." : "This server has no keys: leave empty.";
  if (state.keysRequired && !state.key) {
    say("Enter an API key to start.");
    showSessions(true);
    return;
  }
  try {
    const models = await json("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    say("");
    if (phone.matches) showSessions(false); // the chat first; the Sessions button opens the panel
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get("session");
    const id = fromUrl || localStorage.getItem("hmt.session");
    if (id) {
      try {
        await json(`/sessions/${encodeURIComponent(id)}`);
        setSession(id);
        await restore();
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 404)) throw error;
        say(`Session ${id} no longer exists: start a new one.`);
      }
    }
    await listSessions();
  } catch (error) { fail(error); }
}

start();

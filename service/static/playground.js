// The hmt-serve playground: chat over the Responses API (POST /v1/responses, streamed), each turn
// continuing the one before by `previous_response_id`, so the server holds the conversation and a
// turn reads only its new message. A conversation is named by its newest response's id (in the
// page's address: a reload or a shared link resumes it); the memory is that response's state's
// (GET /v1/responses/{id}/memory), live from `hmt.segment` events while a turn reads.
// Plain ES module, no dependencies: everything it needs is served by hmt-serve itself.

const $ = (id) => document.getElementById(id);
const MAX_TURNS = 200; // a resumed conversation shows at most its last this many turns
const LISTED = 50; // conversations remembered in this browser
const phone = window.matchMedia("(max-width: 760px)");

const state = {
  key: localStorage.getItem("hmt.key") || "",
  keysRequired: false,
  model: "",
  head: "", // the conversation's newest response: the next turn continues it
  root: "", // its first response: the conversation's entry in the list
  turns: [], // {id, previous, input, document, output, status}: one per response, oldest first
  complete: true, // false: older turns were not loaded (expired, deleted, or past MAX_TURNS)
  controller: null, // the running request's AbortController
  running: null, // the turn being answered
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

// ----- conversations ----------------------------------------------------------------------------------
// The server keeps every response (and its state) for its TTL, but lists none: this browser remembers
// the conversations it had, each as {root, head, title, used}; any response id resumes from another.

function remembered() {
  try { return JSON.parse(localStorage.getItem("hmt.conversations") || "[]"); } catch { return []; }
}

function remember() {
  if (!state.head) return;
  const first = state.turns.find((turn) => !turn.document) || state.turns[0];
  const title = first ? first.input.slice(0, 60) : state.head;
  const root = state.root || state.head;
  const entry = { root, head: state.head, title, used: Date.now() / 1000 };
  const others = remembered().filter((c) => c.root !== root && c.head !== state.head);
  localStorage.setItem("hmt.conversations", JSON.stringify([entry, ...others].slice(0, LISTED)));
}

function forget(head) {
  localStorage.setItem("hmt.conversations", JSON.stringify(remembered().filter((c) => c.head !== head)));
}

function setHead(id) {
  state.head = id;
  if (id && !state.root) state.root = id;
  $("session-id").textContent = id || "new";
  if (id) {
    localStorage.setItem("hmt.response", id);
    history.replaceState(null, "", `#response=${encodeURIComponent(id)}`);
    remember();
  } else {
    localStorage.removeItem("hmt.response");
    history.replaceState(null, "", location.pathname);
  }
  for (const button of $("session-list").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.root === (state.root || id)));
  }
}

function newSession() {
  if (busy()) return;
  state.turns = [];
  state.complete = true;
  state.recalls = [];
  state.root = "";
  setHead("");
  render();
  showStats({ tokens_seen: 0, segments_total: 0, state_bytes: 0, kv_cache_bytes: 0 });
  $("m-memories").textContent = "0";
  drawRecalls();
  say("New conversation: its memory starts empty.");
  listSessions();
  $("prompt").focus();
}

async function resume(id) {
  if (busy() || !id) return;
  try {
    await restore(id);
    say(`Resumed conversation at ${id}.`);
    if (phone.matches) showSessions(false);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      forget(id);
      listSessions();
      say(`Response ${id} no longer exists (expired, deleted, or another key's): start a new conversation.`, true);
    } else fail(error);
  }
}

// The text of a response's input items (the user's messages).
function inputText(items) {
  return items.filter((item) => item.type === "message")
    .map((item) => item.content.map((part) => part.text || "").join("")).join("\n\n");
}

function outputText(response) {
  return response.output.filter((item) => item.type === "message")
    .map((item) => item.content.map((part) => part.text || "").join("")).join("");
}

async function turnOf(id) {
  const path = `/v1/responses/${encodeURIComponent(id)}`;
  const [response, items] = await Promise.all([json(path), json(`${path}/input_items?order=asc&limit=100`)]);
  return {
    id, previous: response.previous_response_id || "", input: inputText(items.data),
    document: (response.metadata || {}).playground === "document", output: outputText(response),
    status: response.status,
  };
}

// A conversation from its newest response: back along previous_response_id, one turn at a time.
async function restore(id) {
  const turns = [await turnOf(id)]; // a 404 here: the response is not there
  let complete = true;
  while (turns[0].previous) {
    if (turns.length >= MAX_TURNS) { complete = false; break; }
    try { turns.unshift(await turnOf(turns[0].previous)); } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) throw error;
      complete = false; // an earlier response expired or was deleted; its state lives on in the later ones
      break;
    }
  }
  state.turns = turns;
  state.complete = complete;
  const known = remembered().find((c) => c.head === id || c.root === turns[0].id);
  state.root = known ? known.root : turns[0].id;
  setHead(id);
  render();
  await Promise.all([refreshMemory(), listSessions()]);
}

function listSessions() {
  const list = $("session-list");
  list.replaceChildren();
  const listed = remembered();
  for (const conversation of listed) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = conversation.head;
    button.dataset.root = conversation.root;
    button.setAttribute("aria-current", String(conversation.root === state.root && Boolean(state.head)));
    const name = document.createElement("span");
    name.textContent = conversation.title.length > 24 ? `${conversation.title.slice(0, 22)}…` : conversation.title;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ago(conversation.used);
    button.title = `Resume at ${conversation.head}`;
    button.append(name, meta);
    button.addEventListener("click", () => resume(conversation.head));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
  if (!listed.length) {
    const item = document.createElement("li");
    item.className = "hint";
    item.textContent = "No conversations yet.";
    list.append(item);
  }
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

function bubble(role, content, index, documentTurn = false) {
  const item = document.createElement("li");
  item.className = `message ${role}${documentTurn ? " doc-turn" : ""}`;
  item.dataset.index = String(index);
  const who = document.createElement("div");
  who.className = "who";
  const label = document.createElement("span");
  label.textContent = role === "user" ? (documentTurn ? "Document" : "You") : "HMT";
  who.append(label);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = documentTurn && content.length > 400
    ? `${content.slice(0, 400)}… (${count(content.length)} characters)` : content;
  item.append(who, text);
  return item;
}

function render() {
  const list = $("messages");
  const items = [];
  if (!state.complete) {
    const item = document.createElement("li");
    item.className = "hint";
    item.textContent = "Earlier turns are not shown (expired, deleted, or many); the memory still holds them.";
    items.push(item);
  }
  state.turns.forEach((turn, index) => {
    const user = bubble("user", turn.input, index, turn.document);
    // edit any of your messages, regenerate the last reply: both branch from the response before
    if (!turn.document) user.querySelector(".who").append(action("Edit", () => edit(index)));
    const reply = bubble("assistant", turn.output, index);
    if (turn.status === "cancelled") reply.classList.add("stopped");
    if (index === state.turns.length - 1) reply.querySelector(".who").append(action("Regenerate", () => regenerate()));
    items.push(user, reply);
  });
  list.replaceChildren(...items);
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
    max_output_tokens: Math.max(1, Math.round(number("max-tokens", 256))),
  };
}

async function send(text) {
  if (busy() || !text.trim()) return;
  await reply(state.turns, state.head, text, false);
}

async function regenerate() {
  if (busy() || !state.turns.length) return;
  const last = state.turns[state.turns.length - 1];
  await reply(state.turns.slice(0, -1), last.previous, last.input, last.document);
}

function edit(index) {
  if (busy()) return;
  const item = $("messages").querySelector(`.message.user[data-index="${index}"]`);
  const text = item.querySelector(".text");
  const turn = state.turns[index];
  const area = document.createElement("textarea");
  area.value = turn.input;
  area.rows = 3;
  area.setAttribute("aria-label", "Edit message");
  const save = action("Save and send", () => {
    const edited = area.value.trim() ? area.value : turn.input;
    reply(state.turns.slice(0, index), turn.previous, edited, false);
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

function describe(usage, firstMs, totalMs) {
  const cached = usage.input_tokens_details ? usage.input_tokens_details.cached_tokens : 0;
  const rate = usage.output_tokens > 1 && totalMs > firstMs ? (1000 * (usage.output_tokens - 1)) / (totalMs - firstMs) : 0;
  return `Read ${count(usage.input_tokens - cached)} new tokens (${count(cached)} held in memory) · first token in `
    + `${Math.round(firstMs)} ms · ${count(usage.output_tokens)} tokens${rate ? ` at ${rate.toFixed(1)} tokens/s` : ""}`;
}

// One turn: a response to `input` continuing `previous` (none: a new conversation), after `kept`
// (the turns before it); it streams in, and the conversation's head moves to it once stored.
async function reply(kept, previous, input, documentTurn, progress = null) {
  const controller = new AbortController();
  state.controller = controller;
  state.turns = kept;
  render();
  const index = kept.length;
  const turn = { id: "", previous, input, document: documentTurn, output: "", status: "in_progress" };
  state.running = turn;
  const user = bubble("user", input, index, documentTurn);
  const item = bubble("assistant", "", index);
  item.classList.add("streaming");
  $("messages").append(user, item);
  $("messages").scrollTop = $("messages").scrollHeight;
  const text = item.querySelector(".text");
  setBusy(true);
  say("");
  let aborted = false;
  let stats = "";
  const started = performance.now();
  let first = 0;
  try {
    const body = { model: state.model, input, stream: true, ...settings() };
    if (previous) body.previous_response_id = previous;
    if (documentTurn) body.metadata = { playground: "document" };
    const response = await api("/v1/responses", {
      method: "POST", signal: controller.signal, headers: { "X-HMT-Progress": "segments" }, body,
    });
    for await (const { data } of events(response)) {
      const event = JSON.parse(data);
      if (event.type === "response.created") turn.id = event.response.id;
      else if (event.type === "hmt.segment") {
        if (progress) progress(event);
        addRecall(event.recall);
        showStats({ tokens_seen: event.tokens_seen, segments_total: event.segments_total });
      } else if (event.type === "response.output_text.delta") {
        first = first || performance.now() - started;
        turn.output += event.delta;
        text.textContent = turn.output;
        $("messages").scrollTop = $("messages").scrollHeight;
      } else if (event.type === "response.completed" || event.type === "response.incomplete") {
        turn.output = outputText(event.response);
        turn.status = event.response.status;
        stats = describe(event.response.usage, first, performance.now() - started);
      } else if (event.type === "response.failed") {
        throw new Error(event.response.error ? event.response.error.message : "the response failed");
      } else if (event.type === "error") {
        throw new Error(event.message || (event.error && event.error.message) || "error");
      }
    }
  } catch (error) {
    aborted = error && error.name === "AbortError";
    if (!aborted) fail(error);
  } finally {
    item.classList.remove("streaming");
    $("stop").disabled = true;
  }
  const stopped = aborted || turn.status === "cancelled";
  // still busy until the page shows what the server stored: no other request may overtake it
  await settle(turn, aborted, stopped);
  if (stats && !stopped) say(stats);
  listSessions();
  state.controller = null;
  state.running = null;
  setBusy(false);
}

// After a reply, show what the server stored. A cancelled reply's stream ends once it is stored (status
// cancelled, with the reply so far); after a disconnect (the cancel went to another replica) it is
// stored once the model thread sees the disconnect, so wait (briefly) for it.
async function settle(turn, aborted, stopped) {
  try {
    if (turn.id) {
      for (let attempt = 0; attempt < (aborted ? 50 : 1); attempt += 1) {
        try {
          Object.assign(turn, await turnOf(turn.id));
          state.turns = [...state.turns, turn];
          setHead(turn.id);
          break;
        } catch (error) {
          if (!(error instanceof ApiError && error.status === 404)) throw error;
          await new Promise((resolve) => setTimeout(resolve, 100)); // not stored yet
        }
      }
    }
    render();
    if (stopped) {
      const last = $("messages").lastElementChild;
      if (last) last.classList.add("stopped");
      say("Stopped: the reply so far is kept; the next turn continues from it.");
    }
    await refreshMemory();
  } catch (error) { fail(error); }
}

// Stop: cancel the response (POST /v1/responses/{id}/cancel), whose stream then ends with what it
// said so far; before the response has an id, or when the cancel fails, leave the stream instead.
async function stop() {
  const { controller, running } = state;
  if (!controller || controller.signal.aborted) return;
  $("stop").disabled = true;
  if (running && running.id) {
    try {
      await api(`/v1/responses/${encodeURIComponent(running.id)}/cancel`, { method: "POST" });
      return;
    } catch { /* not running on the replica that got the cancel */ }
  }
  controller.abort();
}

// ----- long documents -----------------------------------------------------------------------------------

// A document is a turn of its own: the response reads it segment by segment (the progress bar
// follows the hmt.segment events) and answers it; ask about it in the next turns.
async function appendDocument() {
  if (busy()) return;
  const text = $("doc-text").value;
  if (!text.trim()) { say("Paste a text or choose a file first.", true); return; }
  const progress = $("doc-progress");
  const status = $("doc-status");
  progress.value = 0;
  progress.max = 1;
  let reading = true;
  const before = state.turns.length;
  await reply(state.turns, state.head, text, true, (event) => {
    if (!reading) return;
    progress.value = Math.min(1, event.segments_expected ? event.segments_committed / event.segments_expected : 1);
    status.textContent = `${count(event.tokens_seen)} tokens in the conversation, segment ${count(event.segments_total)}`;
    if (progress.value >= 1) reading = false;
  });
  if (state.turns.length > before) {
    progress.value = 1;
    status.textContent = `Read ${count(text.length)} characters. Ask about it below.`;
    $("doc-text").value = "";
  }
}

async function loadFile() {
  const file = $("doc-file").files[0];
  if (!file) return;
  $("doc-text").value = await file.text();
  $("doc-status").textContent = `${file.name}: ${count(file.size)} bytes loaded; press Read into the conversation.`;
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
    ? `A KV cache of this history would be ${ratio >= 10 ? Math.round(ratio) : ratio.toFixed(2)}x the conversation's state; the state stops growing once long-term memory is full.`
    : "";
}

async function refreshMemory() {
  if (!state.head) return;
  try {
    const memory = await json(`/v1/responses/${encodeURIComponent(state.head)}/memory`);
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
    if (phone.matches) showSessions(false); // the chat first; the Conversations button opens the panel
    const id = new URLSearchParams(location.hash.slice(1)).get("response") || localStorage.getItem("hmt.response");
    listSessions();
    if (id) await resume(id);
  } catch (error) { fail(error); }
}

start();

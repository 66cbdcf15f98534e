// owngpt's chat page: talks to this server's OpenAI-compatible API and renders the text as it streams in.
// Two modes: chat (POST /v1/chat/completions with the conversation) and completion (POST /v1/completions: the model
// continues the text typed, for plain language models trained with --task lm). /health says which the model is; the
// page starts in that mode and shows it. Plain browser JavaScript, no libraries: fetch + ReadableStream + SSE parser.
"use strict";

const $ = (id) => document.getElementById(id);
const store = window.localStorage;
const FIELDS = ["api-key", "system", "temperature", "top-p", "max-tokens"];

let history = []; // [{role, content}] of the conversation so far (system prompt added per request)
let modelId = null;
let controller = null; // AbortController of the running request
let serverMode = null; // "chat" or "completion": what the model is (GET /health)

const MODE_NOTES = {
  chat: "Chat mode: the model answers the conversation.",
  completion: "Completion mode: type the beginning of a text and the model continues it.",
};

function mode() {
  return $("mode").value;
}

function showMode() {
  let note = MODE_NOTES[mode()];
  if (serverMode === "completion" && mode() === "chat") {
    note += " This model is a plain language model (not chat-tuned): it continues a User:/Bot: transcript.";
  }
  $("mode-note").textContent = note;
  $("input").placeholder = mode() === "chat" ? "Type a message. Enter sends, Shift+Enter adds a line."
    : "Type the beginning of a text. Enter sends, Shift+Enter adds a line.";
  $("send").textContent = mode() === "chat" ? "Send" : "Continue";
  document.body.dataset.mode = mode();
}

async function loadMode() {
  try {
    const h = await (await fetch("/health")).json();
    if (h.mode === "chat" || h.mode === "completion") {
      serverMode = h.mode;
      $("mode").value = h.mode;
    }
  } catch {
    // the model list reports an unreachable server
  }
  showMode();
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text; // textContent, never innerHTML: model output is untrusted text
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return { message: body.error?.message || response.statusText, code: body.error?.code };
  } catch {
    return { message: `${response.status} ${response.statusText}`, code: null };
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      const e = await errorMessage(r);
      setStatus(r.status === 401 ? "enter the server's API key" : e.message, true);
      $("model").textContent = "…";
      return;
    }
    modelId = (await r.json()).data[0].id;
    $("model").textContent = modelId;
    setStatus("ready");
  } catch (err) {
    setStatus(`server unreachable: ${err}`, true);
  }
}

// Server-sent events: blocks separated by a blank line; we only need their `data:` lines.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody(messages) {
  const body = {
    model: modelId,
    messages,
    stream: true,
    stream_options: { include_usage: true }, // the last chunk counts the tokens: was the reply cut by the limit?
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function complete(text) {
  if (!modelId) await loadModel();
  if (!modelId) return;
  const div = addMessage("completion", "");
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = text;
  const cont = document.createElement("span");
  cont.className = "continuation";
  div.append(prompt, cont);
  div.classList.add("streaming");
  setBusy(true);
  setStatus("generating…");
  controller = new AbortController();
  let out = "";
  let finish = null;
  let usage = null;
  try {
    const body = requestBody(null);
    delete body.messages;
    body.prompt = text;
    const r = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error((await errorMessage(r)).message);
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices?.[0]?.text;
      if (piece) {
        out += piece;
        cont.textContent = out;
        div.scrollIntoView({ block: "end" });
      }
      finish = chunk.choices?.[0]?.finish_reason || finish;
      usage = chunk.usage || usage;
    }
    showFinish(div, finish, usage);
    setStatus("ready");
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped");
    else {
      addMessage("error", String(err.message || err));
      setStatus("error", true);
    }
  } finally {
    div.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
}

async function send(text) {
  if (!modelId) await loadModel();
  if (!modelId) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  setBusy(true);
  setStatus("generating…");
  let reply = "";
  let finish = null;
  let usage = null;
  controller = new AbortController();
  try {
    for (let attempt = 0; ; attempt++) {
      const system = $("system").value.trim();
      const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
      });
      // A conversation longer than the model's context is cut by the server (system prompt + latest turns).
      if (!r.ok) throw new Error((await errorMessage(r)).message);
      for await (const data of sseData(r)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          reply += delta;
          bubble.textContent = reply;
          bubble.scrollIntoView({ block: "end" });
        }
        finish = chunk.choices?.[0]?.finish_reason || finish;
        usage = chunk.usage || usage;
      }
      break;
    }
    history.push({ role: "assistant", content: reply });
    if (!reply.trim()) {
      bubble.classList.add("empty");
      bubble.textContent = "(no text: the model ended its reply at once)";
    }
    showFinish(bubble, finish, usage);
    setStatus("ready");
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
      setStatus("stopped");
    } else {
      history.pop(); // the user's message was not answered: let them resend it
      if (!reply) bubble.remove();
      addMessage("error", String(err.message || err));
      setStatus("error", true);
    }
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
}

// A reply cut by the token limit looks like one the model ended: say so under it, with the way to get more. A chat
// reply also ends ("length") where the model's context is full, before the limit: raising the limit does not help.
function showFinish(msg, finish, usage) {
  msg.dataset.finish = finish || "";
  if (finish !== "length") return;
  const note = document.createElement("div");
  note.className = "msg note cut";
  const limit = parseInt($("max-tokens").value, 10);
  const atLimit = limit > 0 && !(usage && usage.completion_tokens < limit);
  note.textContent = atLimit
    ? `(cut off at the Max tokens limit, ${limit}: raise it in the settings for longer replies)`
    : "(cut off: the model's context is full; Reset conversation starts a new one)";
  msg.after(note);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function reset() {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  setStatus(modelId ? "ready" : "");
}

function init() {
  for (const id of FIELDS) {
    const saved = store.getItem(`owngpt.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("input", () => store.setItem(`owngpt.${id}`, $(id).value));
  }
  for (const id of ["temperature", "top-p"]) {
    const show = () => ($(`${id}-value`).textContent = $(id).value);
    $(id).addEventListener("input", show);
    show();
  }
  $("api-key").addEventListener("change", loadModel);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    if (mode() === "completion") complete(text);
    else send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    // Enter while an input method composes (Chinese pinyin, Japanese kana) picks a candidate: it must not send
    // the half-typed message. keyCode 229 is how Safari and older browsers mark that keydown.
    if (ev.isComposing || ev.keyCode === 229) return;
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", reset);
  $("mode").addEventListener("change", () => {
    reset();
    showMode();
  });
  loadMode();
  loadModel();
}

init();

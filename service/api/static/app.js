// chatloop's web chat: streams answers from /v1/chat/completions and sends thumbs and comparisons.
// Plain JavaScript, no build step: the page is served as is by service/routes/web.py.
"use strict";

const KEY_STORAGE = "chatloop.apiKey";
const STATUS_EVERY_MS = 10000;
const RECEIPTS = { recorded: "Recorded", replaced: "Changed", unchanged: "Already recorded" };
const LETTERS = ["A", "B"];

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const byTestId = (id, root = document) => $(`[data-testid="${id}"]`, root);

const ui = {};
// One turn is the user's message and the answer(s) to it; `chosen` is the answer that continues the conversation.
const turns = [];
let inFlight = null; // the AbortController of the chat request being streamed

class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function template(id) {
  return document.getElementById(id).content.firstElementChild.cloneNode(true);
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error.message || message;
  } catch {
    // not OpenAI's error shape (a proxy's page, say): keep the status line
  }
  return new ApiError(response.status, message, response.headers.get("Retry-After"));
}

async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

function explain(err) {
  if (!(err instanceof ApiError)) return `Could not reach the server (${err.message}).`;
  const message = err.message.replace(/\.$/, "");
  switch (err.status) {
    case 401:
      return `${message}. Enter a valid API key under Settings; it is kept in this browser only.`;
    case 403:
      return `Not allowed: ${message}.`;
    case 429:
      return `Too many requests: please wait ${err.retryAfter ? `${err.retryAfter} s` : "a minute"}, then try again.`;
    case 503:
      return `The server is not ready yet (${message}). Try again in a moment.`;
    default:
      return `${message}.`;
  }
}

// ---- streaming -------------------------------------------------------------------------------------

// Reads an SSE body and calls onChunk with each parsed `data:` payload; returns when [DONE] arrives.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the answer stream ended early");
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new ApiError(500, payload.error.message);
      onChunk(payload);
    }
  }
}

// The conversation before turn `index`: each finished turn's question and its chosen answer.
function history(index) {
  return turns.slice(0, index).filter((turn) => turn.state === "done").flatMap((turn) => [
    { role: "user", content: turn.text },
    { role: "assistant", content: turn.answers[turn.chosen].text },
  ]);
}

function setTurnState(turn, state) {
  turn.state = state;
  turn.el.dataset.state = state;
}

function setAdapter(turn, adapter) {
  if (!adapter) return;
  for (const answer of turn.answers) byTestId("adapter", answer.el).textContent = `adapter: ${adapter}`;
}

function onChunk(turn, chunk) {
  if (turn.id !== chunk.id) {
    turn.id = chunk.id;
    turn.el.dataset.completionId = chunk.id;
  }
  setAdapter(turn, chunk.system_fingerprint);
  const stick = nearBottom();
  for (const choice of chunk.choices) {
    const answer = turn.answers[choice.index];
    if (!answer) continue;
    const delta = choice.delta && choice.delta.content;
    if (delta) {
      answer.text += delta;
      answer.textEl.append(delta);
    }
    if (choice.finish_reason === "length") byTestId("answer-note", answer.el).textContent = "Stopped at the length limit.";
  }
  if (stick) scrollToEnd();
}

async function ask(turn) {
  const index = turns.indexOf(turn);
  buildAnswers(turn);
  setTurnState(turn, "streaming");
  updateRegenerate();
  const controller = new AbortController();
  inFlight = controller;
  setBusy(true);
  const body = {
    model: "chatloop",
    messages: [...history(index), { role: "user", content: turn.text }],
    n: turn.answers.length,
    stream: true,
  };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    setAdapter(turn, response.headers.get("X-Chatloop-Adapter"));
    await readEvents(response, (chunk) => onChunk(turn, chunk));
    setTurnState(turn, "done");
    turn.controls.hidden = false;
  } catch (err) {
    if (err.name === "AbortError") {
      setTurnState(turn, "stopped");
      for (const answer of turn.answers) byTestId("answer-note", answer.el).textContent = "Stopped.";
    } else {
      setTurnState(turn, "error");
      showError(turn, explain(err));
      if (turn.answers.every((answer) => !answer.text)) byTestId("answers", turn.el).replaceChildren();
      if (err instanceof ApiError && err.status === 401) ui.apiKey.focus();
    }
  } finally {
    for (const answer of turn.answers) answer.el.setAttribute("aria-busy", "false");
    if (inFlight === controller) inFlight = null;
    setBusy(false);
    updateRegenerate();
  }
}

// ---- turns and answers -----------------------------------------------------------------------------

function addTurn(text, n) {
  byTestId("empty", ui.log)?.remove();
  const el = template("turn-template");
  byTestId("user-message", el).textContent = text;
  const turn = { text, n, el, answers: [], chosen: 0, id: null, state: "new", controls: null };
  byTestId("regenerate", el).addEventListener("click", () => ask(turn));
  turns.push(turn);
  ui.log.append(el);
  return turn;
}

// (Re)builds a turn's answer cards and its feedback controls, for a first answer or a regenerated one.
function buildAnswers(turn) {
  const list = byTestId("answers", turn.el);
  list.replaceChildren();
  list.classList.toggle("compare", turn.n > 1);
  turn.answers = [];
  turn.chosen = 0;
  turn.id = null;
  delete turn.el.dataset.completionId;
  for (let i = 0; i < turn.n; i++) {
    const el = template("answer-template");
    byTestId("answer-label", el).textContent = turn.n > 1 ? `Answer ${LETTERS[i]}` : "chatloop";
    turn.answers.push({ el, textEl: byTestId("answer-text", el), text: "" });
    list.append(el);
  }
  showError(turn, "");
  turn.controls?.remove();
  turn.controls = turn.n > 1 ? verdictControls(turn) : thumbControls(turn);
  byTestId("regenerate", turn.el).before(turn.controls);
  scrollToEnd();
}

function showError(turn, message) {
  const el = byTestId("error", turn.el);
  el.textContent = message;
  el.hidden = !message;
}

function thumbControls(turn) {
  const el = template("thumbs-template");
  const thumbs = $$(".thumb", el);
  const form = byTestId("comment-form", el);
  const input = byTestId("comment-input", el);
  const state = byTestId("feedback-state", el);
  const toggle = byTestId("comment-toggle", el);
  let rating = null;

  async function vote(value) {
    rating = value;
    for (const b of thumbs) b.setAttribute("aria-pressed", String(Number(b.dataset.rating) === value));
    const body = { completion_id: turn.id, choice_index: 0, rating: value };
    const comment = input.value.trim();
    if (comment) body.comment = comment;
    state.className = "feedback-state";
    state.textContent = "Sending…";
    try {
      const receipt = await postJSON("/v1/feedback", body);
      el.dataset.recorded = String(value);
      const what = `${value > 0 ? "thumbs up" : "thumbs down"}${comment ? ", with your comment" : ""}`;
      state.textContent = `${RECEIPTS[receipt.status] || "Recorded"}: ${what}. Thank you!`;
      if (comment) {
        form.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
      }
      refreshStatus();
    } catch (err) {
      state.classList.add("bad");
      state.textContent = explain(err);
    }
  }

  for (const b of thumbs) b.addEventListener("click", () => vote(Number(b.dataset.rating)));
  toggle.addEventListener("click", () => {
    form.hidden = !form.hidden;
    toggle.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) input.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (rating === null) {
      state.className = "feedback-state bad";
      state.textContent = "Choose thumbs up or down first: the comment is sent with your rating.";
      return;
    }
    vote(rating);
  });
  return el;
}

function verdictControls(turn) {
  const el = template("verdict-template");
  const buttons = $$("button[data-preferred]", el);
  const state = byTestId("verdict-state", el);
  for (const button of buttons) {
    button.addEventListener("click", async () => {
      const raw = button.dataset.preferred;
      const preferred = /^\d+$/.test(raw) ? Number(raw) : raw;
      state.className = "feedback-state";
      state.textContent = "Sending…";
      try {
        await postJSON("/v1/comparisons", { completion_id: turn.id, preferred });
        for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
        // The preferred answer continues the conversation; after a tie or "both bad", A does.
        turn.chosen = typeof preferred === "number" ? preferred : 0;
        turn.answers.forEach((answer, i) => answer.el.classList.toggle("chosen", i === turn.chosen));
        el.dataset.recorded = raw;
        state.textContent = `Recorded: ${button.textContent}. Answer ${LETTERS[turn.chosen]} continues the conversation.`;
        refreshStatus();
      } catch (err) {
        state.classList.add("bad");
        state.textContent = explain(err);
      }
    });
  }
  return el;
}

// Only the last answer can be regenerated (an earlier one has answers built on it), and not mid-stream.
function updateRegenerate() {
  turns.forEach((turn, i) => {
    const button = byTestId("regenerate", turn.el);
    button.hidden = i !== turns.length - 1 || turn.state === "streaming";
    button.textContent = turn.state === "done" ? "Regenerate" : "Try again";
  });
}

// ---- page ------------------------------------------------------------------------------------------

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 48;
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function setBusy(busy) {
  ui.send.textContent = busy ? "Stop" : "Send";
  ui.send.classList.toggle("stop", busy);
  ui.send.dataset.busy = String(busy);
  ui.prompt.required = !busy;
  for (const button of $$('[data-testid="regenerate"]', ui.log)) button.disabled = busy;
}

function send(event) {
  event.preventDefault();
  if (inFlight) {
    inFlight.abort();
    return;
  }
  const text = ui.prompt.value.trim();
  if (!text) return;
  ui.prompt.value = "";
  ask(addTurn(text, ui.compare.checked ? 2 : 1));
}

function newChat() {
  inFlight?.abort();
  turns.length = 0;
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.dataset.testid = "empty";
  empty.textContent = "New conversation.";
  ui.log.replaceChildren(empty);
  ui.prompt.focus();
}

function describeRun(run) {
  if (!run) return "no run yet";
  const parts = [run.status || "unknown"];
  const stage = (run.progress && run.progress.stage) || (run.stage || "").replace(/^chatloop\./, "");
  if (stage && run.status === "running") parts.push(stage);
  if (run.status === "running" && run.progress && run.progress.total) parts.push(`${run.progress.step}/${run.progress.total}`);
  if (run.candidate) parts.push(`candidate ${run.candidate}`);
  return parts.join(" · ");
}

function setStatus(id, text) {
  byTestId(id).textContent = text;
}

async function refreshStatus() {
  const error = byTestId("status-error");
  try {
    const response = await fetch("/v1/status", { headers: authHeaders() });
    if (!response.ok) throw await apiError(response);
    const status = await response.json();
    const counts = status.feedback || {};
    const n = (key) => counts[key] || 0;
    setStatus("status-model", status.status);
    setStatus("status-adapter", status.production_adapter || "—");
    setStatus("status-thumbs", `${n("thumbs_up")} up · ${n("thumbs_down")} down`);
    setStatus("status-comparisons", `${n("comparisons")} (${n("pairs")} ${n("pairs") === 1 ? "pair" : "pairs"})`);
    setStatus("status-new", String(n("new_since_training")));
    setStatus("status-training", describeRun(status.training));
    error.textContent = "";
  } catch (err) {
    error.textContent = explain(err);
  }
}

function saveKey() {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  refreshStatus();
}

function start() {
  Object.assign(ui, {
    log: byTestId("log"),
    composer: byTestId("composer"),
    prompt: byTestId("prompt"),
    send: byTestId("send"),
    compare: byTestId("compare-toggle"),
    apiKey: byTestId("api-key"),
    maxTokens: byTestId("max-tokens"),
  });
  ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  ui.apiKey.addEventListener("change", saveKey);
  byTestId("settings").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey();
  });
  ui.composer.addEventListener("submit", send);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  byTestId("new-chat").addEventListener("click", newChat);
  refreshStatus();
  setInterval(() => document.hidden || refreshStatus(), STATUS_EVERY_MS);
  ui.prompt.focus();
}

document.addEventListener("DOMContentLoaded", start);

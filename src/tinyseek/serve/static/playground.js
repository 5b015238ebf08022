// The tinyseek playground. Completion mode streams a continuation from /v1/completions; chat mode holds a
// conversation through /v1/chat/completions, which renders it with the model's chat template (the same ids as the
// trainer, `tinyseek chat` and transformers' apply_chat_template). Both ask for tinyseek's `routing` field and draw,
// per generated token, the experts each MoE layer routed it to. Plain browser JavaScript: no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
// Light enough for dark text on top; for more experts than colours, hues spread by the golden angle.
const PALETTE = ["#8ecae6", "#ffb703", "#90be6d", "#f4978e", "#b8a1e3", "#f9c74f", "#84dcc6", "#ffafcc",
                 "#a3c4f3", "#e9c46a", "#c7e9b0", "#fbc4ab", "#cdb4db", "#ffd6a5", "#bde0fe", "#d0f4de"];
const STRIP = "strip";
// Where the API key lives once given (a server started with --api-key): this tab only, never sent elsewhere.
const KEY_STORAGE = "tinyseek-api-key";
const MODES = ["completion", "chat"];

const state = {
  model: null,        // the /v1/models entry, with its `tinyseek` description
  mode: "completion",
  // Per mode, per generated token: {text, experts: [[ids] per MoE layer], alternatives: [[text, p]]}.
  tokens: {completion: [], chat: []},
  messages: [],       // chat mode: the conversation the model is sent (OpenAI messages, the system message aside)
  controller: null,   // aborts the running request
};

class RequestError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

function expertColour(expert) {
  if (expert < PALETTE.length) return PALETTE[expert];
  return `hsl(${(expert * 137.508) % 360}, 65%, 76%)`;
}

function moeLayers() {
  return state.model ? state.model.tinyseek.moe_layers : [];
}

function outputOf(mode) {
  return $(mode === "chat" ? "conversation" : "output");
}

function setStatus(text, stateName) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = stateName;
}

// fetch() with the API key; when the server answers 401, the page asks for the key once and tries again.
async function apiFetch(url, options = {}) {
  for (let asked = false; ; asked = true) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = {...(options.headers || {}), ...(key ? {Authorization: `Bearer ${key}`} : {})};
    const response = await fetch(url, {...options, headers});
    if (response.status !== 401 || asked) return response;
    const entered = window.prompt("This server asks for an API key (tinyseek serve --api-key):");
    if (entered === null) return response;
    sessionStorage.setItem(KEY_STORAGE, entered.trim());
  }
}

function showChatNotice(text) {
  const notice = $("chat-notice");
  notice.textContent = text;
  notice.hidden = !text || state.mode !== "chat";
}

async function loadModel() {
  const response = await apiFetch("/v1/models");
  const body = await response.json();
  if (!response.ok) throw new Error(body.error.message);
  state.model = body.data[0];
  const info = state.model.tinyseek;
  const kind = info.moe_layers.length
    ? `${info.n_routed_experts} routed experts, top-${info.num_experts_per_tok}, ${info.moe_layers.length} MoE layers`
    : "dense feed-forward";
  $("model-name").textContent = `${state.model.id} · ${info.attention_type} attention · ${kind}`;
  $("max-tokens").max = info.max_tokens;
  if (info.chat === false) {
    showChatNotice(`This model does not answer chat: ${info.chat_refused}. Completion mode continues ` +
      "plain text.");
  }
  const picker = $("layer");
  picker.replaceChildren();
  if (!info.moe_layers.length) {
    $("dense-note").hidden = false;
    $("colour-experts").disabled = true;
    picker.disabled = true;
    $("load-card").hidden = true;
    return;
  }
  info.moe_layers.forEach((layer, position) => picker.add(new Option(`layer ${layer}`, String(position))));
  picker.add(new Option("all layers (strip)", STRIP));
  const legend = $("legend");
  legend.replaceChildren();
  for (let expert = 0; expert < info.n_routed_experts; expert++) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.innerHTML = `<i class="swatch" style="background:${expertColour(expert)}"></i>${expert}`;
    legend.append(chip);
  }
  legend.hidden = true;
}

function setMode(mode) {
  state.mode = mode;
  for (const name of MODES) {
    const selected = name === mode;
    $(`mode-${name}`).setAttribute("aria-selected", String(selected));
    $(`${name}-controls`).hidden = !selected;
    outputOf(name).hidden = !selected;
  }
  $("generate").hidden = mode !== "completion";
  $("send").hidden = $("reset").hidden = mode !== "chat";
  showChatNotice($("chat-notice").textContent);
  drawHistograms();
}

function sampling() {
  const body = {
    model: state.model.id,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    routing: true,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function run(work) {
  // Runs one streamed request with the buttons and status kept in step; returns the error it ended with, or null.
  const buttons = ["generate", "send", "reset"];
  for (const id of buttons) $(id).disabled = true;
  $("stop").disabled = false;
  setStatus("generating…", "running");
  state.controller = new AbortController();
  const started = performance.now();
  const before = state.tokens[state.mode].length;
  try {
    const finish = await work();
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${state.tokens[state.mode].length - before} tokens in ${seconds.toFixed(2)} s (${finish})`, "done");
    return null;
  } catch (error) {
    const count = state.tokens[state.mode].length - before;
    if (error.name === "AbortError") setStatus(`stopped after ${count} tokens`, "done");
    else setStatus(`error: ${error.message}`, "error");
    return error;
  } finally {
    for (const id of buttons) $(id).disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

async function streamTokens(url, body, into) {
  const response = await apiFetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
    signal: state.controller.signal,
  });
  if (!response.ok) {
    const reply = await response.json().catch(() => ({error: {message: response.statusText}}));
    throw new RequestError(reply.error.message, reply.error.code);
  }
  return readEvents(response, into);
}

async function readEvents(response, into) {
  // Server-sent events: "data: {json}" lines separated by blank lines, ending with "data: [DONE]".
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return finish;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new RequestError(chunk.error.message, chunk.error.code);
      // A chat stream's first chunk names the role only; every later one carries its token's routing.
      if (chunk.tinyseek) for (const token of chunk.tinyseek.tokens) addToken(token, into);
      finish = (chunk.choices[0] || {}).finish_reason || finish;
    }
  }
}

function generate() {
  state.tokens.completion = [];
  const output = $("output");
  output.replaceChildren();
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt-text";
  promptSpan.textContent = $("prompt").value;
  output.append(promptSpan);
  drawHistograms();
  return run(() => streamTokens("/v1/completions", {...sampling(), prompt: $("prompt").value}, output));
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const name = document.createElement("b");
  name.className = "role";
  name.textContent = role === "user" ? "you" : "model";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  turn.append(name, body);
  $("conversation").append(turn);
  return turn;
}

function conversation() {
  const system = $("system").value;
  return (system ? [{role: "system", content: system}] : []).concat(state.messages);
}

async function chatReply(into) {
  // As `tinyseek chat` does, the oldest exchanges go when the conversation no longer fits the model's positions.
  for (;;) {
    try {
      return await streamTokens("/v1/chat/completions", {...sampling(), messages: conversation()}, into);
    } catch (error) {
      if (error.code !== "context_length_exceeded" || state.messages.length < 3) throw error;
      state.messages.splice(0, 2);
      const kept = $("conversation").querySelectorAll(".turn:not(.dropped)");
      for (const turn of Array.from(kept).slice(0, 2)) turn.classList.add("dropped");
      showChatNotice("The oldest exchange no longer fits the model's positions: the model does not see the dimmed " +
        "turns.");
    }
  }
}

async function send() {
  const text = $("message").value;
  if (!text.trim()) return;
  state.messages.push({role: "user", content: text});
  const asked = addTurn("user", text);
  const reply = addTurn("assistant", "").querySelector(".text");
  $("message").value = "";
  const first = state.tokens.chat.length;
  const error = await run(() => chatReply(reply));
  const written = state.tokens.chat.slice(first);
  if (error && error.name !== "AbortError" && !written.length) {
    // Nothing was said: the message goes back to the box, and out of the conversation.
    state.messages.pop();
    asked.remove();
    reply.parentElement.remove();
    $("message").value = text;
    if (error.code === "model_not_chat_trained") showChatNotice(error.message);
    return;
  }
  state.messages.push({role: "assistant", content: written.map((token) => token.text).join("")});
}

function resetConversation() {
  state.messages = [];
  state.tokens.chat = [];
  $("conversation").replaceChildren();
  if (state.model && state.model.tinyseek.chat !== false) showChatNotice("");
  setStatus("", "idle");
  drawHistograms();
}

function addToken(token, into) {
  const mode = into.closest(".output").dataset.mode;
  const index = state.tokens[mode].push(token) - 1;
  const span = document.createElement("span");
  span.className = "token";
  span.dataset.index = String(index);
  into.append(span);
  paintToken(span, token);
  drawHistograms();
}

function paintToken(span, token) {
  const view = $("layer").value;
  span.className = "token";
  span.style.removeProperty("background-color");
  span.style.removeProperty("--second");
  span.textContent = token.text;
  if (!$("colour-experts").checked || !token.experts || !token.experts.length) return;
  if (view === STRIP) {
    const layers = document.createElement("span");
    layers.className = "layers";
    for (const chosen of token.experts) {
      const bar = document.createElement("i");
      bar.style.background = expertColour(chosen[0]);
      bar.title = chosen.join(", ");
      layers.append(bar);
    }
    span.append(layers);
    span.classList.add(`expert-${token.experts[0][0]}`);
    return;
  }
  const chosen = token.experts[Number(view)];
  span.classList.add(`expert-${chosen[0]}`);
  span.style.backgroundColor = expertColour(chosen[0]);
  if (chosen.length > 1) span.style.setProperty("--second", expertColour(chosen[1]));
}

function repaint() {
  const colouring = $("colour-experts").checked && moeLayers().length > 0;
  $("legend").hidden = !colouring;
  for (const mode of MODES) {
    const output = outputOf(mode);
    output.classList.toggle("coloured", colouring);
    output.classList.toggle("strip", colouring && $("layer").value === STRIP);
    for (const span of output.querySelectorAll(".token")) {
      paintToken(span, state.tokens[mode][Number(span.dataset.index)]);
    }
  }
}

function drawHistograms() {
  const container = $("histograms");
  container.replaceChildren();
  const info = state.model && state.model.tinyseek;
  if (!info || !info.moe_layers.length) return;
  info.moe_layers.forEach((layer, position) => {
    const counts = new Array(info.n_routed_experts).fill(0);
    for (const token of state.tokens[state.mode]) for (const expert of token.experts[position]) counts[expert] += 1;
    const total = counts.reduce((a, b) => a + b, 0);
    const mean = total / counts.length;
    const maxVio = mean > 0 ? (Math.max(...counts) - mean) / mean : 0;
    const peak = Math.max(1, ...counts);
    const box = document.createElement("div");
    box.className = "histogram";
    box.innerHTML = `<h3>layer ${layer}<span>MaxVio ${maxVio.toFixed(2)}</span></h3>`;
    const bars = document.createElement("div");
    bars.className = "bars";
    const labels = document.createElement("div");
    labels.className = "bar-labels";
    counts.forEach((count, expert) => {
      const bar = document.createElement("div");
      bar.style.height = `${(82 * count) / peak}%`;
      bar.style.background = expertColour(expert);
      bar.title = `expert ${expert}: ${count} tokens`;
      bar.innerHTML = `<span>${count}</span>`;
      bars.append(bar);
      const label = document.createElement("span");
      label.textContent = String(expert);
      labels.append(label);
    });
    box.append(bars, labels);
    container.append(box);
  });
}

function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

function showTooltip(span, event) {
  const token = state.tokens[span.closest(".output").dataset.mode][Number(span.dataset.index)];
  const tooltip = $("tooltip");
  tooltip.replaceChildren();
  const title = document.createElement("h4");
  title.textContent = `token ${Number(span.dataset.index) + 1}: ${visible(token.text)}`;
  tooltip.append(title);
  if (token.experts && token.experts.length) {
    const experts = document.createElement("div");
    experts.className = "experts";
    moeLayers().forEach((layer, position) => {
      const line = document.createElement("div");
      line.append(`layer ${layer}: `);
      for (const expert of token.experts[position]) {
        const badge = document.createElement("b");
        badge.style.background = expertColour(expert);
        badge.textContent = String(expert);
        line.append(badge);
      }
      experts.append(line);
    });
    tooltip.append(experts);
  }
  const table = document.createElement("table");
  const alternatives = token.alternatives || [];
  const likeliest = Math.max(1e-9, ...alternatives.map(([, probability]) => probability));
  for (const [text, probability] of alternatives) {
    const row = table.insertRow();
    if (text === token.text) row.className = "chosen";
    row.insertCell().textContent = visible(text);
    const barCell = row.insertCell();
    barCell.style.width = "45%";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(2, (100 * probability) / likeliest)}%`;
    barCell.append(bar);
    const p = row.insertCell();
    p.className = "p";
    p.textContent = `${(100 * probability).toFixed(1)}%`;
  }
  tooltip.append(table);
  tooltip.hidden = false;
  moveTooltip(event);
}

function moveTooltip(event) {
  const tooltip = $("tooltip");
  const x = Math.min(event.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
  const y = event.clientY + 18 + tooltip.offsetHeight > window.innerHeight
    ? event.clientY - tooltip.offsetHeight - 12 : event.clientY + 18;
  tooltip.style.left = `${x}px`;
  tooltip.style.top = `${y}px`;
}

$("mode-completion").addEventListener("click", () => setMode("completion"));
$("mode-chat").addEventListener("click", () => setMode("chat"));
$("generate").addEventListener("click", generate);
$("send").addEventListener("click", send);
$("reset").addEventListener("click", resetConversation);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("colour-experts").addEventListener("change", repaint);
$("layer").addEventListener("change", repaint);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("generate").disabled) generate();
});
$("message").addEventListener("keydown", (event) => {
  // Enter sends, as in chat applications; Shift+Enter starts a new line.
  if (event.key === "Enter" && !event.shiftKey && !$("send").disabled) {
    event.preventDefault();
    send();
  }
});
for (const mode of MODES) {
  const output = outputOf(mode);
  output.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".token");
    if (span) showTooltip(span, event);
  });
  output.addEventListener("mousemove", (event) => { if (!$("tooltip").hidden) moveTooltip(event); });
  output.addEventListener("mouseout", (event) => {
    if (event.target.closest(".token")) $("tooltip").hidden = true;
  });
}
loadModel().catch((error) => setStatus(`cannot reach the server: ${error.message}`, "error"));

// The playground's behaviour: plain JavaScript, no libraries. Every action is one call of the
// server's public API (the same a curl user makes), and every error the API answers is shown in
// the page with its status and message.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "gpt2-playground-api-key";  // sessionStorage: this tab only, never sent elsewhere
  let modelId = null;  // the model the server runs (GET /health); /v1/* requests name it
  let chat = [];  // the conversation so far, as /v1/chat/completions takes it
  let running = null;  // AbortController of the side-by-side generation in flight
  let labelCalls = 0;  // how many times the label list was asked for

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // ---- talking to the server

  function headers(json) {
    const h = json ? {"Content-Type": "application/json"} : {};
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorOf(response) {  // {"detail": ...} everywhere, OpenAI's {"error": {...}} under /v1
    let message = response.statusText || "request failed";
    try {
      const data = await response.json();
      message = (data.error && data.error.message) || data.detail || JSON.stringify(data);
    } catch (e) { /* not JSON: keep the status text */ }
    return new ApiError(response.status, message);
  }

  async function send(method, path, body, signal) {
    let response;
    try {
      response = await fetch(path, {method, signal, headers: headers(body !== undefined),
                                    body: body === undefined ? undefined : JSON.stringify(body)});
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "cannot reach the server (" + e.message + ")");
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function api(method, path, body) {
    return (await send(method, path, body)).json();
  }

  // POST a streaming request; onChunk gets each JSON chunk of the server-sent events until [DONE].
  async function stream(path, body, onChunk, signal) {
    const response = await send("POST", path, Object.assign({}, body, {stream: true}), signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;  // a keep-alive comment
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message);  // failed after the stream began
        onChunk(chunk);
      }
    }
  }

  // ---- errors and status

  function showError(e) {
    if (e && e.name === "AbortError") return;  // stopped by the user
    const box = $("error");
    box.textContent = (e.status ? e.status + ": " : "") + e.message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  async function refreshStatus() {
    const box = $("status");
    try {
      const health = await api("GET", "/health");
      modelId = health.model_loaded ? health.model : null;
      box.textContent = health.model_loaded ? "model " + health.model + " · ready"
                                            : "no model loaded: " + (health.detail || "");
      box.className = "status " + (health.model_loaded ? "ok" : "down");
    } catch (e) {
      modelId = null;
      box.textContent = e.status ? "server answered " + e.status : "server unreachable";
      box.className = "status down";
    }
  }

  async function model() {
    if (!modelId) await refreshStatus();
    if (!modelId) throw new ApiError(503, "the server has no model loaded");
    return modelId;
  }

  // ---- the LUT: teach, list, delete

  function lutName() { return $("lut-name").value.trim(); }

  function lutPath() { return "/luts/" + encodeURIComponent(lutName()); }

  function renderLabels(labels) {
    const list = $("labels");
    list.textContent = "";
    if (!labels.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "no labels yet";
      list.appendChild(li);
    }
    for (const label of labels) {
      const li = document.createElement("li");
      const text = document.createElement("span");
      text.className = "label-text";
      text.textContent = label.label;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = (label.label_context ? "after “" + label.label_context + "” · " : "") +
        (label.recall === "text_start" ? "fires where a text starts with “" : "fires on “") + label.trigger +
        "” · " + label.entries + " entries";
      text.appendChild(meta);
      const del = document.createElement("button");
      del.className = "small delete";
      del.dataset.id = label.id;
      del.title = "delete this label";
      del.textContent = "✕";
      del.addEventListener("click", () => deleteLabel(label.id));
      li.append(text, del);
      list.appendChild(li);
    }
  }

  async function loadLabels() {
    const call = ++labelCalls;  // an answer to an older call (another key or name) is dropped
    for (const id of ["labels-lut", "out-lut-name"]) $(id).textContent = lutName() || "(none)";
    if (!lutName()) return renderLabels([]);
    try {
      const lut = await api("GET", lutPath());
      if (call === labelCalls) renderLabels(lut.labels);
    } catch (e) {
      if (call !== labelCalls) return;
      if (e.status === 404) renderLabels([]);  // nothing taught to this name yet
      else showError(e);
    }
  }

  async function teach() {
    clearError();
    const button = $("teach-btn");
    button.disabled = true;
    try {
      const context = $("teach-context").value;
      await api("POST", "/train_lut", {lut_name: lutName(), label: $("teach-label").value,
                                       label_context: context.trim() ? context : null});
      $("teach-label").value = "";
      $("teach-context").value = "";
      await loadLabels();
    } catch (e) {
      showError(e);
    } finally {
      button.disabled = false;
    }
  }

  async function deleteLabel(id) {
    clearError();
    try {
      await api("DELETE", lutPath() + "/labels/" + id);
      await loadLabels();
    } catch (e) {
      showError(e);
    }
  }

  // ---- side by side: the same request with and without the LUT, both streamed

  function sampling() {  // the sampling fields that are filled in; empty ones take the server's defaults
    const out = {};
    for (const [id, name, parse] of [["max-tokens", "max_tokens", parseInt], ["temperature", "temperature", parseFloat],
                                     ["top-k", "top_k", parseInt], ["top-p", "top_p", parseFloat],
                                     ["seed", "seed", parseInt]]) {
      const value = parse($(id).value);
      if (!Number.isNaN(value)) out[name] = value;
    }
    return out;
  }

  function startOutput(box, prompt) {
    box.textContent = "";
    const shown = document.createElement("span");
    shown.className = "prompt";
    shown.textContent = prompt;
    const text = document.createTextNode("");
    box.append(shown, text);
    box.classList.add("running");
    return text;
  }

  // Replace a text node with its text where the spans a LUT produced (lut_trace) are marked; the
  // label each came from shows on hover.
  function markTrace(node, spans) {
    if (!spans || !spans.length) return;
    const text = node.data;
    const parts = document.createDocumentFragment();
    let at = 0;
    for (const span of spans) {
      parts.append(document.createTextNode(text.slice(at, span.start)));
      const mark = document.createElement("mark");
      mark.className = "lut";
      mark.textContent = text.slice(span.start, span.end);
      mark.title = "from label #" + span.label_id + ": " + span.label +
        (span.label_context ? " (after: " + span.label_context + ")" : "") + " — " + span.how;
      parts.append(mark);
      at = span.end;
    }
    parts.append(document.createTextNode(text.slice(at)));
    node.replaceWith(parts);
  }

  async function generateSide(box, request, signal) {
    const text = startOutput(box, request.prompt);
    let trace = null;
    try {
      await stream("/v1/completions", request, (chunk) => {
        for (const choice of chunk.choices) {
          text.appendData(choice.text);
          if (choice.lut_trace) trace = choice.lut_trace;
        }
      }, signal);
      markTrace(text, trace);
    } finally {
      box.classList.remove("running");
    }
  }

  async function generate() {
    if (running) return running.abort();  // the button says Stop while a generation runs
    clearError();
    const button = $("generate-btn");
    running = new AbortController();
    button.textContent = "Stop";
    try {
      const base = Object.assign({model: await model(), prompt: $("prompt").value}, sampling());
      const sides = [generateSide($("out-base"), base, running.signal)];
      if (lutName()) {
        const request = Object.assign({lut_name: lutName(), lut_trace: true}, base);
        sides.push(generateSide($("out-lut"), request, running.signal));
      }
      else $("out-lut").textContent = "(enter a LUT name)";
      const results = await Promise.allSettled(sides);
      const failed = results.find((r) => r.status === "rejected");
      if (failed) showError(failed.reason);
    } catch (e) {
      showError(e);
    } finally {
      running = null;
      button.textContent = "Generate";
    }
  }

  // ---- chat

  function addMessage(role, content) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const text = document.createElement("span");
    text.className = "content";
    text.textContent = content;
    div.append(who, text);
    $("chat-log").appendChild(div);
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
    return text;
  }

  async function sendChat(event) {
    event.preventDefault();
    const content = $("chat-input").value.trim();
    if (!content) return;
    clearError();
    $("chat-input").value = "";
    $("chat-send").disabled = true;
    const messages = chat.concat([{role: "user", content}]);
    addMessage("user", content);
    const answer = addMessage("assistant", "");
    answer.parentNode.classList.add("running");
    try {
      const request = Object.assign({model: await model(), messages}, sampling());
      if ($("chat-use-lut").checked && lutName()) Object.assign(request, {lut_name: lutName(), lut_trace: true});
      let trace = null;
      await stream("/v1/chat/completions", request, (chunk) => {
        for (const choice of chunk.choices) {
          answer.textContent += choice.delta.content || "";
          if (choice.lut_trace) trace = choice.lut_trace;
        }
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      });
      chat = messages.concat([{role: "assistant", content: answer.textContent}]);
      if (answer.firstChild) markTrace(answer.firstChild, trace);
    } catch (e) {  // the turn is not kept: the next message is sent without it
      answer.parentNode.classList.add("failed");
      answer.textContent = "(no answer)";
      showError(e);
    } finally {
      answer.parentNode.classList.remove("running");
      $("chat-send").disabled = false;
    }
  }

  function resetChat() {
    chat = [];
    $("chat-log").textContent = "";
    clearError();
  }

  // ---- wiring

  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll("[role=tab]")) {
        other.setAttribute("aria-selected", String(other === tab));
        $(other.dataset.panel).hidden = other !== tab;
      }
    });
  }
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()));
  $("api-key").addEventListener("change", () => { clearError(); loadLabels(); });
  $("lut-name").addEventListener("change", () => { clearError(); loadLabels(); });
  $("teach-btn").addEventListener("click", teach);
  $("labels-refresh").addEventListener("click", () => { clearError(); loadLabels(); });
  $("generate-btn").addEventListener("click", generate);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-reset").addEventListener("click", resetChat);
  refreshStatus();
  loadLabels();
  setInterval(refreshStatus, 15000);
})();

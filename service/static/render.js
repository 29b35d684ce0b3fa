// Log entries -> DOM elements. Agents' text messages are Markdown, rendered and sanitised by markdown.js; everything
// else (the user's own messages, tool calls, status lines) goes in through textContent.

import { renderMarkdownInto } from "./markdown.js";

const LIFECYCLE = new Set(["run_started", "run_completed", "run_cancelled", "run_failed", "run_interrupted"]);

export function isLifecycle(entry) {
  return LIFECYCLE.has(entry.type);
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** Lifecycle fields stand at the top level (README "Log entries") and in metadata; read either. */
function field(entry, name) {
  if (entry[name] !== undefined && entry[name] !== null) return entry[name];
  return entry.metadata ? entry.metadata[name] : undefined;
}

function asText(content) {
  if (typeof content === "string") return content;
  try {
    return JSON.stringify(content);
  } catch (exc) {
    return String(content);
  }
}

/** `{"expression": "6*7"}` -> `6*7`; several arguments -> `a=1, b=2`; anything else as sent. */
function formatArgs(raw) {
  let args = raw;
  if (typeof raw === "string") {
    try {
      args = JSON.parse(raw);
    } catch (exc) {
      return raw;
    }
  }
  if (args && typeof args === "object" && !Array.isArray(args)) {
    const keys = Object.keys(args);
    if (keys.length === 1) return asText(args[keys[0]]);
    return keys.map((k) => `${k}=${asText(args[k])}`).join(", ");
  }
  return asText(args);
}

function bubble(kind, source, text, time, markdown = false) {
  const li = el("li", `msg ${kind}`);
  const head = el("div", "meta");
  head.append(el("span", "who", kind.startsWith("user") ? "You" : source || "agent"));
  if (time) head.append(el(kind.includes("pending") ? "span" : "time", "when", time));
  let body;
  if (markdown) {
    body = el("div", "text md");
    renderMarkdownInto(body, text);
  } else {
    body = el("div", "text", text);
  }
  li.append(head, body);
  return li;
}

const PARTIAL_REASONS = new Set(["cancelled", "interrupted", "failed", "stalled"]);

/** A message the run left unfinished (README "Log entries", `metadata.partial`): say so, and why. */
function markPartial(node, entry) {
  const raw = field(entry, "partial_reason");
  const reason = PARTIAL_REASONS.has(raw) ? raw : "";
  node.classList.add("partial");
  node.dataset.partial = "true";
  if (reason) node.dataset.partialReason = reason;
  const mark = el("span", "partial-mark", reason ? `partial: ${reason}` : "partial");
  mark.title = "The run stopped before this answer was finished; this is the text streamed until then.";
  node.querySelector(".meta").append(mark);
}

function statusLine(kind, text) {
  return el("li", `msg status ${kind}`, text);
}

/**
 * The element for one durable entry. `toolCalls` maps call ids to "name(args)" so an execution result can be
 * shown as "calculator(6*7) -> 42" even though request and result are separate entries.
 */
export function renderEntry(entry, toolCalls) {
  const time = formatTime(entry.created_at);
  let node;
  switch (entry.type) {
    case "TextMessage":
      if (entry.source === "user") {
        node = bubble("user", entry.source, asText(entry.content), time);
      } else {
        node = bubble("agent", entry.source, asText(entry.content), time, true);
        if (field(entry, "partial")) markPartial(node, entry);
      }
      break;
    case "StopMessage":
    case "MultiModalMessage":
      node = bubble(entry.source === "user" ? "user" : "agent", entry.source, asText(entry.content), time);
      break;
    case "ToolCallRequestEvent": {
      const calls = Array.isArray(entry.content) ? entry.content : [];
      const text = calls
        .map((c) => {
          const call = `${c.name}(${formatArgs(c.arguments)})`;
          if (c.id) toolCalls.set(c.id, call);
          return call;
        })
        .join("; ");
      node = statusLine("tool", `${entry.source || "agent"} calls ${text}`);
      break;
    }
    case "ToolCallExecutionEvent": {
      const results = Array.isArray(entry.content) ? entry.content : [];
      const text = results
        .map((r) => `${toolCalls.get(r.call_id) || r.name || "tool"} -> ${asText(r.content)}${r.is_error ? " (error)" : ""}`)
        .join("; ");
      node = statusLine("tool", text);
      break;
    }
    case "ToolCallSummaryMessage":
      node = bubble("agent summary", entry.source, asText(entry.content), time);
      break;
    case "ThoughtEvent":
      node = statusLine("thought", `${entry.source || "agent"} thinks: ${asText(entry.content)}`);
      break;
    case "HandoffMessage":
      node = statusLine("handoff", `${entry.source} hands off to ${field(entry, "target") || "another agent"}`);
      break;
    case "UserInputRequestedEvent":
      node = statusLine("ask", "The team is waiting for your answer");
      break;
    case "run_started": {
      const attempt = Number(field(entry, "attempt") || 1);
      node = statusLine("lifecycle", attempt > 1 ? `Run started (attempt ${attempt})` : "Run started");
      break;
    }
    case "run_completed":
      node = statusLine("lifecycle", "Run completed");
      break;
    case "run_cancelled":
      node = statusLine("lifecycle cancelled", "Run cancelled");
      break;
    case "run_failed": {
      const retrying = field(entry, "retrying");
      const error = field(entry, "error");
      const text = `Run failed${error ? `: ${asText(error)}` : ""}${retrying ? " (retrying)" : ""}`;
      node = statusLine(`lifecycle failed${retrying ? " retrying" : ""}`, text);
      break;
    }
    case "run_interrupted":
      node = statusLine("lifecycle interrupted", "Run interrupted (the server running it stopped); it will be retried");
      break;
    default:
      node = statusLine("other", `${entry.type}${entry.source ? ` (${entry.source})` : ""}: ${asText(entry.content)}`);
  }
  node.dataset.testid = "message";
  node.dataset.seq = String(entry.seq);
  node.dataset.type = entry.type;
  if (entry.source) node.dataset.source = entry.source;
  if (entry.client_msg_id) node.dataset.clientMsgId = entry.client_msg_id;
  return node;
}

/** The user's own message before the server has it: shown at once, replaced by the durable entry. */
export function renderPending(item) {
  const node = bubble("user pending", "user", item.content, "sending…");
  node.dataset.testid = "message";
  node.dataset.pending = "true";
  node.dataset.clientMsgId = item.client_msg_id;
  return node;
}

/** A live streaming bubble, grown chunk by chunk (as Markdown), replaced by its durable message. */
export function renderStreaming(source, messageId) {
  const node = bubble("agent streaming", source, "", undefined, true);
  node.dataset.testid = "message";
  node.dataset.streaming = "true";
  node.dataset.source = source || "";
  if (messageId) node.dataset.messageId = messageId;
  node.setAttribute("aria-busy", "true");
  streamed.set(node, "");
  return node;
}

// The raw text of each streaming bubble; it is re-rendered at most once per animation frame, however fast the
// chunks come (a resumed stream starts with the whole text so far, then many small chunks).
const streamed = new WeakMap();
const dirty = new Set();
let frame = 0;

function renderDirty() {
  frame = 0;
  for (const node of dirty) renderMarkdownInto(node.querySelector(".text"), streamed.get(node) || "");
  dirty.clear();
}

function schedule(node) {
  dirty.add(node);
  if (!frame) frame = requestAnimationFrame(renderDirty);
}

/** The text streamed so far in `node`. */
export function streamedText(node) {
  return streamed.get(node) || "";
}

export function appendChunk(node, text) {
  streamed.set(node, streamedText(node) + text);
  schedule(node);
}

/** The first `offset` characters (Unicode code points, as the server counts) of a bubble's streamed text. */
export function streamedPrefix(node, offset) {
  const text = streamedText(node);
  return offset >= text.length ? text : Array.from(text).slice(0, offset).join("");
}

/** A resumed stream's first chunk: the whole text so far replaces whatever this bubble had (never doubled). */
export function setStreamText(node, text) {
  streamed.set(node, text);
  schedule(node);
}

/** Renders a bubble's pending text now (before it leaves the page, so what it last showed is complete). */
export function flushStreaming(node) {
  if (!dirty.delete(node)) return;
  renderMarkdownInto(node.querySelector(".text"), streamedText(node));
}

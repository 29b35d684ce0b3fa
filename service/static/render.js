// Log entries -> DOM elements. Text always goes in through textContent: nothing the agents say is HTML.

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

function bubble(kind, source, text, time) {
  const li = el("li", `msg ${kind}`);
  const head = el("div", "meta");
  head.append(el("span", "who", kind.startsWith("user") ? "You" : source || "agent"));
  if (time) head.append(el(kind.includes("pending") ? "span" : "time", "when", time));
  li.append(head, el("div", "text", text));
  return li;
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
      node = statusLine("lifecycle interrupted", "Run interrupted (the server stopped); it will be retried");
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

/** A live streaming bubble, grown chunk by chunk, replaced by its durable message. */
export function renderStreaming(source, messageId) {
  const node = bubble("agent streaming", source, "");
  node.dataset.testid = "message";
  node.dataset.streaming = "true";
  node.dataset.source = source || "";
  if (messageId) node.dataset.messageId = messageId;
  node.setAttribute("aria-busy", "true");
  return node;
}

export function appendChunk(node, text) {
  node.querySelector(".text").textContent += text;
}

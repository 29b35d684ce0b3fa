// One open chat: its history (last page, older pages on scroll-up), the live socket, the outbox, the run status.
// Every durable entry is rendered exactly once, keyed by seq: `this.shown` is the highest seq on screen and every
// entry with seq <= shown is ignored; a seq beyond shown + 1 is a gap, filled over HTTP before going on.

import { api, uuid } from "./api.js";
import * as outbox from "./outbox.js";
import {
  appendChunk,
  flushStreaming,
  isLifecycle,
  renderEntry,
  renderPending,
  renderStreaming,
  setStreamText,
  streamedPrefix,
} from "./render.js";
import { ChatSocket } from "./socket.js";

const PAGE = 50;
const ACK_DELAY_MS = 250;
const ACTIVE = new Set(["queued", "running", "awaiting_input", "retrying"]);
// Frames of the socket itself; some carry a "seq" (an ack's) that is not a log entry's.
const CONTROL = new Set(["session", "ack", "error", "pong"]);
// How many message ids of durable entries to remember, to ignore a late chunk of a message already on screen.
const DONE_IDS = 500;

function field(entry, name) {
  if (entry[name] !== undefined && entry[name] !== null) return entry[name];
  return entry.metadata ? entry.metadata[name] : undefined;
}

/** The AutoGen message id of a durable entry, which equals its streaming chunks' full_message_id. */
function messageId(entry) {
  const m = entry.metadata || {};
  return m.id || m.message_id || m.autogen_id || entry.id || null;
}

export class ChatView {
  /**
   * @param {object} o
   * @param {string} o.sessionId
   * @param {string} o.clientId
   * @param {object} o.dom  {scroller, log, live, older}
   * @param {(status: string) => void} o.onStatus
   * @param {(state: string, detail: object) => void} o.onConnection
   * @param {(text: string) => void} o.onError
   * @param {(neverOpened: boolean) => Promise<boolean>} o.onSocketFailure
   * @param {() => void} o.onActivity  something happened worth refreshing the session list for
   */
  constructor(o) {
    Object.assign(this, o);
    this.shown = 0;
    this.first = 1;
    this.hasMore = false;
    this.loadingOlder = false;
    this.toolCalls = new Map();
    this.streams = new Map();
    this.doneIds = new Set();
    this.chain = Promise.resolve();
    this.status = "idle";
    this.asked = false;
    this.lastUserSeq = 0;
    this.runInputSeq = 0;
    this.lastAcked = 0;
    this.ackTimer = null;
    this.socket = null;
    this.closed = false;
  }

  async open() {
    const session = await api.getSession(this.sessionId);
    this.session = session;
    const page = await api.pageBefore(this.sessionId, session.last_seq + 1, PAGE);
    if (this.closed) return;
    const msgs = page.messages;
    this.first = msgs.length ? msgs[0].seq : session.last_seq + 1;
    this.shown = this.first - 1;
    this.hasMore = page.has_more;
    for (const entry of msgs) this.apply(entry, { quiet: true });
    this.setStatus(session.status);
    for (const item of outbox.forSession(this.sessionId)) this.showPending(item);
    this.updateOlder();
    this.scrollToBottom();
    this.socket = new ChatSocket({
      sessionId: this.sessionId,
      clientId: this.clientId,
      getAfter: () => this.shown,
      onFrame: (frame) => this.enqueueFrame(frame),
      onState: this.onConnection,
      onOpen: () => this.flush(),
      onFailure: this.onSocketFailure,
    });
    this.socket.start();
  }

  close() {
    this.closed = true;
    clearTimeout(this.ackTimer);
    if (this.socket) this.socket.stop();
  }

  get active() {
    return ACTIVE.has(this.status);
  }

  // Frames are handled one at a time, in order, even when a gap makes one wait for an HTTP fetch.
  enqueueFrame(frame) {
    this.chain = this.chain.then(() => this.handle(frame)).catch((exc) => this.onError(exc.message));
  }

  async handle(frame) {
    if (this.closed) return;
    if (CONTROL.has(frame.type) || typeof frame.seq !== "number") {
      this.handleControl(frame);
      return;
    }
    if (frame.seq <= this.shown) return;
    if (frame.seq > this.shown + 1) await this.fillGap(frame.seq - 1);
    if (frame.seq === this.shown + 1) this.apply(frame, {});
  }

  handleControl(frame) {
    switch (frame.type) {
      case "session":
        this.setStatus(frame.status);
        break;
      case "ack":
        if (frame.client_msg_id) {
          outbox.remove(frame.client_msg_id);
          // Already on screen (or older than what is loaded): the durable entry will not come again.
          if (frame.seq <= this.shown) this.dropPending(frame.client_msg_id);
        }
        break;
      case "error":
        this.onError(`${frame.code || "error"}: ${frame.message || "the server refused a message"}`);
        // A refused message would be refused again on every reconnect: stop re-sending it. (Only when the
        // server names the message; queue_full and unavailable are worth retrying later.)
        if (frame.client_msg_id && (frame.code === "bad_request" || frame.code === "too_large")) {
          outbox.remove(frame.client_msg_id);
          this.markFailed(frame.client_msg_id);
        }
        break;
      case "ModelClientStreamingChunkEvent":
        this.streamChunk(frame);
        break;
      default:
        break; // pong and anything new: nothing to show
    }
  }

  async fillGap(upTo) {
    while (this.shown < upTo && !this.closed) {
      const page = await api.pageAfter(this.sessionId, this.shown, Math.min(1000, upTo - this.shown));
      if (!page.messages.length) return;
      for (const entry of page.messages) if (entry.seq === this.shown + 1) this.apply(entry, {});
    }
  }

  /** Puts the next durable entry on screen and updates everything that depends on it. */
  apply(entry, { quiet }) {
    const stick = this.nearBottom();
    if (entry.type === "TextMessage" && entry.source === "user" && entry.client_msg_id) {
      this.dropPending(entry.client_msg_id);
      outbox.remove(entry.client_msg_id);
    } else if (entry.source !== "user" && !isLifecycle(entry)) {
      this.dropStream(entry);
      this.rememberDone(entry);
    }
    this.log.append(renderEntry(entry, this.toolCalls));
    this.shown = entry.seq;
    this.track(entry);
    if (isLifecycle(entry)) this.clearStreams(); // a run that ended never finishes its half-streamed bubbles
    if (!quiet) {
      this.scheduleAck();
      if (stick) this.scrollToBottom();
      if (isLifecycle(entry) || entry.source === "user") this.onActivity();
    }
  }

  /** The run status as the log tells it; the `session` frame's status is the truth at connect time. */
  track(entry) {
    switch (entry.type) {
      case "TextMessage":
        if (entry.source === "user") {
          this.asked = false;
          if (this.status === "awaiting_input") {
            // The answer: taken by the waiting run, not another input waiting in the queue.
            this.setStatus("running");
          } else {
            this.lastUserSeq = entry.seq;
            if (this.status !== "running") this.setStatus("queued");
          }
        }
        break;
      case "UserInputRequestedEvent":
        this.asked = true;
        this.setStatus("awaiting_input");
        break;
      case "run_started":
        this.asked = false;
        this.runInputSeq = Number(field(entry, "input_seq") || entry.seq - 1);
        this.setStatus("running");
        break;
      case "run_failed":
        if (field(entry, "retrying")) this.setStatus("retrying");
        else this.setStatus(this.lastUserSeq > this.runInputSeq ? "queued" : "failed");
        break;
      case "run_interrupted":
        this.setStatus("queued");
        break;
      case "run_completed":
      case "run_cancelled":
        if (this.asked && entry.type === "run_completed") this.setStatus("awaiting_input");
        else this.setStatus(this.lastUserSeq > this.runInputSeq ? "queued" : "idle");
        break;
      default:
        break;
    }
  }

  setStatus(status) {
    this.status = status || "idle";
    this.onStatus(this.status);
  }

  async loadOlder() {
    if (!this.hasMore || this.loadingOlder || this.closed) return;
    this.loadingOlder = true;
    try {
      const page = await api.pageBefore(this.sessionId, this.first, PAGE);
      const older = page.messages.filter((e) => e.seq < this.first);
      if (older.length) {
        const before = this.scroller.scrollHeight;
        const frag = document.createDocumentFragment();
        for (const entry of older) frag.append(renderEntry(entry, this.toolCalls));
        this.log.prepend(frag);
        this.first = older[0].seq;
        // Keep what the reader was looking at in place.
        this.scroller.scrollTop += this.scroller.scrollHeight - before;
      }
      this.hasMore = page.has_more && older.length > 0;
    } finally {
      this.loadingOlder = false;
      this.updateOlder();
    }
  }

  updateOlder() {
    this.older.hidden = !this.hasMore;
  }

  // ---- sending ----

  send(content) {
    const item = { session_id: this.sessionId, client_msg_id: uuid(), content, at: Date.now() };
    outbox.add(item);
    this.showPending(item);
    this.scrollToBottom();
    this.sendFrame(item);
  }

  sendFrame(item) {
    return this.socket && this.socket.send({
      type: "TextMessage",
      source: "user",
      content: item.content,
      client_msg_id: item.client_msg_id,
    });
  }

  /** On every (re)connect: re-send what was never acknowledged. Other chats' messages go over HTTP. */
  flush() {
    for (const item of outbox.all()) {
      if (item.session_id === this.sessionId) this.sendFrame(item);
      else
        api
          .postMessage(item.session_id, item.content, item.client_msg_id)
          .then(() => outbox.remove(item.client_msg_id))
          .catch(() => {}); // kept for the next reconnect
    }
    this.scheduleAck();
  }

  cancel() {
    // Aimed at the run on screen (README "HTTP"): a second click after it ended never stops the next message.
    const target = Number.isInteger(this.runInputSeq) && this.runInputSeq > 0 ? { input_seq: this.runInputSeq } : {};
    if (this.socket && this.socket.send({ type: "cancel", ...target })) return;
    api.cancel(this.sessionId, target.input_seq).catch((exc) => this.onError(exc.message));
  }

  showPending(item) {
    if (this.live.querySelector(`[data-pending][data-client-msg-id="${CSS.escape(item.client_msg_id)}"]`)) return;
    if (this.log.querySelector(`[data-client-msg-id="${CSS.escape(item.client_msg_id)}"]`)) {
      outbox.remove(item.client_msg_id); // durable already
      return;
    }
    // Pending user messages stay below any streaming bubble: they were typed after it started.
    this.live.append(renderPending(item));
  }

  markFailed(clientMsgId) {
    const node = this.live.querySelector(`[data-pending][data-client-msg-id="${CSS.escape(clientMsgId)}"]`);
    if (!node) return;
    node.dataset.failed = "true";
    node.classList.add("failed");
    node.querySelector(".when").textContent = "not sent";
  }

  dropPending(clientMsgId) {
    const node = this.live.querySelector(`[data-pending][data-client-msg-id="${CSS.escape(clientMsgId)}"]`);
    if (node) node.remove();
  }

  scheduleAck() {
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      if (this.shown > this.lastAcked && this.socket && this.socket.send({ type: "ack", seq: this.shown })) {
        this.lastAcked = this.shown;
      }
    }, ACK_DELAY_MS);
  }

  // ---- streaming ----

  /**
   * One streamed chunk (README "Streaming": `seq` null, `full_message_id`, `offset`). The text before `offset`
   * is kept and the chunk's text put after it, so a resumed chunk after a reconnect (the whole text so far,
   * offset 0) or after a lag (the rest, from where this connection was) never shows a piece twice or leaves one out.
   */
  streamChunk(frame) {
    if (frame.full_message_id && this.doneIds.has(frame.full_message_id)) return; // already durable on screen
    const key = frame.full_message_id || `source:${frame.source}`;
    let node = this.streams.get(key);
    const stick = this.nearBottom();
    if (!node) {
      node = renderStreaming(frame.source, frame.full_message_id);
      this.streams.set(key, node);
      const firstPending = this.live.querySelector("[data-pending]");
      this.live.insertBefore(node, firstPending);
    }
    const text = typeof frame.content === "string" ? frame.content : "";
    if (Number.isInteger(frame.offset)) setStreamText(node, streamedPrefix(node, frame.offset) + text);
    else appendChunk(node, text);
    if (stick) this.scrollToBottom();
  }

  rememberDone(entry) {
    const id = messageId(entry);
    if (!id) return;
    this.doneIds.add(id);
    if (this.doneIds.size > DONE_IDS) this.doneIds.delete(this.doneIds.values().next().value);
  }

  removeStream(key, node) {
    flushStreaming(node);
    node.remove();
    this.streams.delete(key);
  }

  dropStream(entry) {
    const id = messageId(entry);
    if (id && this.streams.has(id)) {
      this.removeStream(id, this.streams.get(id));
      return;
    }
    if (entry.type !== "TextMessage") return;
    // No id to match on: the durable message of a source replaces that source's streaming bubble (one without an id).
    for (const [key, node] of this.streams) {
      const sameSource = node.dataset.source === (entry.source || "");
      if (sameSource && (!id || !node.dataset.messageId)) this.removeStream(key, node);
    }
  }

  clearStreams() {
    for (const [key, node] of this.streams) this.removeStream(key, node);
  }

  // ---- scrolling ----

  nearBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }
}

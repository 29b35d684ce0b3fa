// One WebSocket to /ws/chat/queue that reconnects by itself with backoff, resuming after the last seq shown.

import { getToken } from "./api.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 10000;
const PING_EVERY_MS = 20000;
const PONG_WITHIN_MS = 10000;
// The server closes with this code when the chat was deleted (service/ws.py SESSION_DELETED).
const SESSION_DELETED = 4404;
// After this many failed attempts in a row, say "offline" rather than "reconnecting".
const OFFLINE_AFTER = 3;

export class ChatSocket {
  /**
   * @param {object} o
   * @param {string} o.sessionId
   * @param {string} o.clientId
   * @param {() => number} o.getAfter  the last seq shown, read at every (re)connect
   * @param {(frame: object) => void} o.onFrame
   * @param {(state: string, detail: object) => void} o.onState  connecting | connected | reconnecting | offline
   * @param {() => void} o.onOpen  the server's `session` frame arrived: safe to (re)send the outbox
   * @param {(neverOpened: boolean) => Promise<boolean>} o.onFailure  resolves false to stop retrying (401)
   */
  constructor(o) {
    Object.assign(this, o);
    this.ws = null;
    this.stopped = false;
    this.failures = 0;
    this.timer = null;
    this.pingTimer = null;
    this.lastFrameAt = 0;
    this.onOnline = () => this.reconnectNow();
    window.addEventListener("online", this.onOnline);
  }

  start() {
    this.stopped = false;
    this.connect(this.failures === 0 ? "connecting" : "reconnecting");
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    window.removeEventListener("online", this.onOnline);
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close();
      this.ws = null;
    }
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.ready;
  }

  /** Sends a frame if the socket is open; false otherwise (the caller keeps it for later). */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  reconnectNow() {
    if (this.stopped || this.isOpen) return;
    clearTimeout(this.timer);
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close();
      this.ws = null;
    }
    this.connect("reconnecting");
  }

  url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ session_id: this.sessionId, client_id: this.clientId });
    q.set("after", String(this.getAfter()));
    const token = getToken();
    if (token) q.set("token", token);
    return `${proto}//${location.host}/ws/chat/queue?${q}`;
  }

  connect(state) {
    this.onState(state, { failures: this.failures });
    this.ready = false;
    let opened = false;
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this.lastFrameAt = Date.now();
    };
    ws.onmessage = (ev) => {
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (exc) {
        return;
      }
      if (frame.type === "session") {
        this.ready = true;
        this.failures = 0; // reset the backoff only once the server really speaks to us
        this.onState("connected", {});
        this.startPings();
        this.onFrame(frame);
        this.onOpen();
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      clearInterval(this.pingTimer);
      if (this.stopped) return;
      if (event.code === SESSION_DELETED) {
        // Reconnecting would create a new, empty chat under the same id: stop here.
        this.stopped = true;
        this.onState("deleted", {});
        return;
      }
      this.failures += 1;
      this.scheduleRetry(!opened);
    };
  }

  async scheduleRetry(neverOpened) {
    const delay = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** (this.failures - 1));
    const offline = !navigator.onLine || this.failures >= OFFLINE_AFTER;
    this.onState(offline ? "offline" : "reconnecting", { failures: this.failures, delayMs: delay });
    const keepGoing = await this.onFailure(neverOpened);
    if (!keepGoing || this.stopped) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (!this.stopped && !this.ws) this.connect("reconnecting");
    }, delay);
  }

  // A half-open TCP connection (laptop sleep, a dead proxy) never fires onclose: ping, and drop it if silent.
  startPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (!this.isOpen) return;
      const sentAt = Date.now();
      this.send({ type: "ping" });
      setTimeout(() => {
        if (this.ws && this.lastFrameAt < sentAt) this.ws.close();
      }, PONG_WITHIN_MS);
    }, PING_EVERY_MS);
  }
}

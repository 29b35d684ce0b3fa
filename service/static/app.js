// The page shell: session list, URL hash routing (#<session id>), composer, connection and run indicators,
// the token form for JWT mode, and unobtrusive errors. The open chat itself lives in chat.js.

import { ApiError, api, getToken, onAuthRequired, setToken, uuid } from "./api.js";
import { ChatView } from "./chat.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  toggle: $("toggle-sessions"),
  newChat: $("new-chat"),
  sessions: $("session-list"),
  title: $("chat-title"),
  runStatus: $("run-status"),
  conn: $("connection-state"),
  scroller: $("messages"),
  log: $("log"),
  live: $("live"),
  older: $("load-older"),
  empty: $("empty"),
  form: $("composer"),
  input: $("composer-input"),
  label: $("composer-label"),
  send: $("send"),
  cancel: $("cancel"),
  toast: $("toast"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
};

const CLIENT_KEY = "chat.client_id";
let clientId = localStorage.getItem(CLIENT_KEY);
if (!clientId) {
  clientId = uuid();
  localStorage.setItem(CLIENT_KEY, clientId);
}

const STATUS_TEXT = {
  idle: "Idle",
  queued: "Queued",
  running: "Running…",
  awaiting_input: "Waiting for your answer",
  retrying: "Failed, retrying",
  failed: "Failed",
};
const CONN_TEXT = {
  idle: "No chat open",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  offline: "Offline, retrying",
};
const DEFAULT_PLACEHOLDER = "Type a message. Enter sends, Shift+Enter adds a line.";

let chat = null;
let sessions = [];
let authWaiting = false;

// ---- errors ----

let toastTimer = null;
function showError(text) {
  ui.toast.textContent = text;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    ui.toast.hidden = true;
  }, 8000);
}

function reportError(exc) {
  if (exc instanceof ApiError && exc.status === 401) return; // the token form says it better
  showError(exc instanceof ApiError ? `${exc.message} (${exc.code})` : String(exc.message || exc));
}

// ---- indicators ----

function setRunStatus(status) {
  // The open chat's entry in the list follows what its socket says, without waiting for the next refresh.
  const listed = chat && sessions.find((s) => s.session_id === chat.sessionId);
  if (listed && listed.status !== status && status !== "retrying") {
    listed.status = status;
    renderSessions();
  }
  ui.runStatus.dataset.status = status;
  ui.runStatus.textContent = STATUS_TEXT[status] || status;
  ui.cancel.disabled = !chat || !chat.active;
  const asking = status === "awaiting_input";
  ui.label.textContent = asking ? "Your answer to the team's question" : "Message";
  ui.input.placeholder = asking ? "The team asked you something: your next message answers it." : DEFAULT_PLACEHOLDER;
  ui.form.classList.toggle("asking", asking);
}

function setConnection(state, detail) {
  ui.conn.dataset.state = state;
  let text = CONN_TEXT[state] || state;
  if (detail && detail.delayMs && state !== "connected") text += ` in ${Math.ceil(detail.delayMs / 1000)} s`;
  ui.conn.textContent = text;
}

// ---- session list ----

function sessionLabel(s) {
  return s.title || `Chat ${s.session_id}`;
}

function renderSessions() {
  ui.sessions.replaceChildren();
  for (const s of sessions) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `#${encodeURIComponent(s.session_id)}`;
    a.dataset.testid = "session-item";
    a.dataset.sessionId = s.session_id;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = sessionLabel(s);
    const meta = document.createElement("span");
    meta.className = "sub";
    const when = new Date(s.updated_at);
    meta.textContent = `${STATUS_TEXT[s.status] || s.status} · ${Number.isNaN(when.getTime()) ? "" : when.toLocaleString()}`;
    a.append(name, meta);
    if (chat && chat.sessionId === s.session_id) a.setAttribute("aria-current", "page");
    a.addEventListener("click", () => setSidebar(false));
    li.append(a);
    ui.sessions.append(li);
  }
}

async function refreshSessions() {
  try {
    sessions = await api.listSessions();
    renderSessions();
  } catch (exc) {
    if (!(exc instanceof ApiError && exc.status === 0)) reportError(exc);
  }
}

let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshSessions, 300);
}

function setSidebar(open) {
  ui.app.classList.toggle("sidebar-open", open);
  ui.toggle.setAttribute("aria-expanded", String(open));
}

// ---- opening a chat ----

function currentHashId() {
  const raw = location.hash.replace(/^#/, "");
  return raw ? decodeURIComponent(raw) : null;
}

async function openChat(sessionId) {
  if (chat && chat.sessionId === sessionId && !chat.closed) return;
  if (chat) chat.close();
  ui.log.replaceChildren();
  ui.live.replaceChildren();
  ui.older.hidden = true;
  const known = sessions.find((s) => s.session_id === sessionId);
  ui.title.textContent = known ? sessionLabel(known) : `Chat ${sessionId}`;
  const view = new ChatView({
    sessionId,
    clientId,
    scroller: ui.scroller,
    log: ui.log,
    live: ui.live,
    older: ui.older,
    onStatus: (status) => {
      if (chat === view) setRunStatus(status);
    },
    onConnection: (state, detail) => {
      if (chat !== view) return;
      if (state === "deleted") {
        forget(view.sessionId);
        chat = null;
        view.close();
        history.replaceState(null, "", location.pathname);
        openDefault();
        showError("This chat was deleted.");
        return;
      }
      setConnection(state, detail);
    },
    onError: showError,
    onSocketFailure: socketFailed,
    onActivity: refreshSoon,
  });
  chat = view;
  renderSessions();
  setRunStatus("idle");
  ui.empty.hidden = true;
  try {
    await view.open();
    if (view.session && view.session.title) ui.title.textContent = view.session.title;
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 404) {
      showError(`There is no chat ${sessionId}.`);
      forget(sessionId); // or openDefault could pick it again
      chat = null;
      history.replaceState(null, "", location.pathname);
      await openDefault();
      return;
    }
    reportError(exc);
  }
}

// The socket failed: if it never opened, ask the HTTP side why (a 401 means we need a token; stop retrying).
async function socketFailed(neverOpened) {
  if (!neverOpened) return true;
  try {
    await api.listSessions();
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 401) return false;
  }
  return true;
}

async function newChat() {
  try {
    const s = await api.createSession();
    sessions = [s, ...sessions.filter((x) => x.session_id !== s.session_id)];
    history.pushState(null, "", `#${encodeURIComponent(s.session_id)}`); // pushState fires no hashchange
    ui.input.focus();
    await openChat(s.session_id);
  } catch (exc) {
    reportError(exc);
  }
}

// A chat that no longer exists leaves the list at once.
function forget(sessionId) {
  sessions = sessions.filter((s) => s.session_id !== sessionId);
  renderSessions();
}

// The newest chat; with none, an empty page whose first message creates one (no empty chats piling up).
async function openDefault() {
  if (sessions.length) {
    history.replaceState(null, "", `#${encodeURIComponent(sessions[0].session_id)}`);
    await openChat(sessions[0].session_id);
  } else {
    ui.log.replaceChildren();
    ui.live.replaceChildren();
    ui.older.hidden = true;
    ui.empty.hidden = false;
    ui.title.textContent = "Agent chat";
    setConnection("idle", {});
  }
}

async function start() {
  try {
    sessions = await api.listSessions();
  } catch (exc) {
    reportError(exc);
    return;
  }
  renderSessions();
  if (chat) return; // the user was quicker (New chat)
  const id = currentHashId();
  if (id) await openChat(id);
  else await openDefault();
}

// ---- JWT ----

onAuthRequired(() => {
  if (authWaiting) return;
  authWaiting = true;
  if (chat) chat.close();
  setConnection("offline", {});
  $("token-error").hidden = getToken() === "";
  ui.tokenForm.hidden = false;
  ui.tokenInput.focus();
});

ui.tokenForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken(ui.tokenInput.value.trim());
  ui.tokenInput.value = "";
  ui.tokenForm.hidden = true;
  authWaiting = false;
  chat = null;
  start();
});

// ---- composer ----

ui.form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const content = ui.input.value.trim();
  if (!content) return;
  if (!chat) {
    await newChat();
    if (!chat) return;
  }
  ui.input.value = "";
  chat.send(content);
});

ui.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.cancel.addEventListener("click", () => {
  if (chat) chat.cancel();
});

ui.newChat.addEventListener("click", () => {
  setSidebar(false);
  newChat();
});

ui.toggle.addEventListener("click", () => setSidebar(!ui.app.classList.contains("sidebar-open")));
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && ui.app.classList.contains("sidebar-open")) {
    setSidebar(false);
    ui.toggle.focus();
  }
});

ui.older.addEventListener("click", () => chat && chat.loadOlder().catch(reportError));
ui.scroller.addEventListener("scroll", () => {
  if (chat && ui.scroller.scrollTop < 80) chat.loadOlder().catch(reportError);
});

window.addEventListener("hashchange", () => {
  const id = currentHashId();
  if (id) openChat(id);
});

start();

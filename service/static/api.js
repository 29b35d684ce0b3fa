// HTTP side of the wire contract (README "The protocol"): sessions, history pages, the JWT token.
// Every failure becomes an ApiError carrying the canonical {"error": {"code", "message"}} body.

const TOKEN_KEY = "chat.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The token lives in sessionStorage: it goes away with the tab, as a bearer credential should.
export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

const authListeners = new Set();

/** Called with no argument whenever the server answers 401: the page then asks for a token. */
export function onAuthRequired(fn) {
  authListeners.add(fn);
}

export function uuid() {
  // randomUUID exists only in secure contexts; getRandomValues everywhere (a page served over plain http on a LAN).
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (exc) {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  if (resp.status === 204) return null;
  let data = null;
  try {
    data = await resp.json();
  } catch (exc) {
    data = null;
  }
  if (!resp.ok) {
    const err = (data && data.error) || {};
    if (resp.status === 401) authListeners.forEach((fn) => fn());
    throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || resp.statusText);
  }
  return data;
}

const enc = encodeURIComponent;

export const api = {
  listSessions: () => request("GET", "/sessions").then((d) => d.sessions),
  createSession: (title) => request("POST", "/sessions", title ? { title } : {}),
  getSession: (id) => request("GET", `/sessions/${enc(id)}`),
  deleteSession: (id) => request("DELETE", `/sessions/${enc(id)}`),
  /** The `limit` entries just below seq `before`, oldest first. */
  pageBefore: (id, before, limit = 50) =>
    request("GET", `/sessions/${enc(id)}/messages?before=${before}&limit=${limit}`),
  /** Entries with seq > `after`, oldest first. */
  pageAfter: (id, after, limit = 100) =>
    request("GET", `/sessions/${enc(id)}/messages?after=${after}&limit=${limit}`),
  postMessage: (id, content, clientMsgId) =>
    request("POST", `/sessions/${enc(id)}/messages`, { content, client_msg_id: clientMsgId }),
  cancel: (id, inputSeq) =>
    request("POST", `/sessions/${enc(id)}/cancel`, inputSeq === undefined ? undefined : { input_seq: inputSeq }),
};

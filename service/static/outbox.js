// Messages the user sent that the server has not acknowledged yet. Kept in localStorage so they survive a reload,
// a closed tab or a dead server, and re-sent on every reconnect: the server de-duplicates by client_msg_id.

const KEY = "chat.outbox";

/** @returns {{session_id: string, client_msg_id: string, content: string, at: number}[]} */
export function all() {
  // Read afresh every time: another tab of the same origin may have changed it.
  try {
    const items = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch (exc) {
    return [];
  }
}

function save(items) {
  localStorage.setItem(KEY, JSON.stringify(items));
}

export function add(item) {
  save([...all().filter((i) => i.client_msg_id !== item.client_msg_id), item]);
}

export function remove(clientMsgId) {
  const items = all();
  const kept = items.filter((i) => i.client_msg_id !== clientMsgId);
  if (kept.length !== items.length) save(kept);
}

export function has(clientMsgId) {
  return all().some((i) => i.client_msg_id === clientMsgId);
}

export function forSession(sessionId) {
  return all().filter((i) => i.session_id === sessionId);
}

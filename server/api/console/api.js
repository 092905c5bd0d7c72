// Every call the console makes goes through here: the public /v1 API, with the user's API key (kept in
// sessionStorage) as any client sends it. No private route, no other origin.

const KEY_ITEM = "labelserve.apiKey";

export const who = { auth: null, id: null, scopes: [], checked: false };
const listeners = new Set();

export function onAuthChange(listener) {
  listeners.add(listener);
}

function authChanged() {
  for (const listener of listeners) listener(who);
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  return checkKey();
}

// Whether the current key (or no key, on a server without keys) may use any of `scopes`.
export function can(...scopes) {
  return who.checked && scopes.some((scope) => who.scopes.includes(scope));
}

// What the page tells the user instead of offering a button that would fail.
export function needs(...scopes) {
  if (!who.checked) return "Checking access…";
  if (who.auth && !who.id) return "Enter an API key above to use this.";
  return `Key '${who.id}' has scopes [${who.scopes.join(", ")}]; this needs the ${scopes.join(" or ")} scope.`;
}

export async function checkKey() {
  const reply = await api("GET", "/v1/whoami", { quiet: true });
  if (reply.ok) {
    Object.assign(who, reply.data, { checked: true });
  } else if (reply.status === 401) {
    Object.assign(who, { auth: true, id: null, scopes: [], checked: true, error: reply.error });
  } else {
    Object.assign(who, { auth: null, id: null, scopes: [], checked: true, error: reply.error });
  }
  authChanged();
  return who;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

// Server-Timing: "read;dur=0.32, encode;dur=4420.11" -> [["read", 0.32], ["encode", 4420.11]]
export function serverTiming(header) {
  if (!header) return [];
  return header.split(",").map((part) => {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    return [name.trim(), dur ? Number(dur.slice(4)) : 0];
  });
}

// Returns {ok, status, data, error, headers, timing}; never throws for an HTTP error. `json` sends a JSON
// body; `body` sends anything fetch takes (a File, FormData) as it is. `lines` takes an NDJSON reply one
// parsed line at a time, as the server streams it.
export async function api(method, path, { json, body, headers = {}, quiet = false, blob = false, lines } = {}) {
  const sent = { ...headers };
  const key = storedKey();
  if (key) sent.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body });
  } catch (exc) {
    return { ok: false, status: 0, error: new ApiError(0, "unreachable", `the server did not answer (${exc})`) };
  }
  const reply = {
    ok: response.ok,
    status: response.status,
    headers: response.headers,
    timing: serverTiming(response.headers.get("Server-Timing")),
  };
  const type = response.headers.get("Content-Type") || "";
  if (response.ok && lines) {
    await readLines(response.body, lines);
    return reply;
  }
  if (response.ok) {
    reply.data = blob ? await response.blob() : type.includes("json") ? await response.json() : await response.text();
    return reply;
  }
  let code = `http_${response.status}`;
  let message = response.statusText;
  if (type.includes("json")) {
    const data = await response.json();
    if (data && data.error) ({ code, message } = data.error);
    else if (data && data.detail) message = JSON.stringify(data.detail);
  }
  reply.error = new ApiError(response.status, code, message);
  if (response.status === 401 && !quiet && who.checked && who.id) checkKey(); // revoked meanwhile
  return reply;
}

async function readLines(stream, onLine) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let rest = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const parts = (rest + value).split("\n");
    rest = parts.pop();
    for (const part of parts) if (part.trim()) onLine(JSON.parse(part));
  }
  if (rest.trim()) onLine(JSON.parse(rest));
}

// The same, for callers that want the data or an exception.
export async function call(method, path, options) {
  const reply = await api(method, path, options);
  if (!reply.ok) throw reply.error;
  return reply;
}

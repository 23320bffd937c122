// Calls to the cmdflow API with the signed-in credential. Every failure becomes an ApiError
// carrying the HTTP status and the API's `{code, detail}`, so pages can show it as it is.

const TOKEN_KEY = 'cmdflow.console.token';

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status || 'network'} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

let unauthorized = () => {};

/** Called with the ApiError of any 401, after which the console asks to sign in again. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/**
 * `path` under the gateway's origin; `query` values that are empty are left out; `body` is
 * sent as JSON. Returns the parsed JSON (null for an empty answer).
 */
export async function api(path, { method = 'GET', query = null, body = undefined } = {}) {
  const url = new URL(path, window.location.origin);
  if (query) {
    for (const [key, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && String(value).trim() !== '') {
        url.searchParams.set(key, String(value).trim());
      }
    }
  }
  const headers = { Accept: 'application/json' };
  const credential = token();
  if (credential) headers.Authorization = `Bearer ${credential}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, 'network', `the gateway did not answer (${e.message})`);
  }
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(
      response.status,
      (json && json.code) || 'error',
      (json && json.detail) || text || response.statusText,
    );
    if (response.status === 401) unauthorized(error);
    throw error;
  }
  return json;
}

/** The path of one owner's resource, with the owner escaped. */
export function ownerPath(owner, rest = '') {
  return `/v1/owners/${encodeURIComponent(owner)}${rest}`;
}

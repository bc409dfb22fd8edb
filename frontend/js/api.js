// The REST API, as the page uses it. Errors become ApiError with the server's {"error": {code, message}}.

const KEY_STORAGE = "imsrc.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getApiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  // Reads of <img> tags cannot send headers; the server accepts this cookie for reads only.
  document.cookie = key
    ? `imsrc_api_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`
    : "imsrc_api_key=; path=/; max-age=0; SameSite=Strict";
}

function headers(extra = {}) {
  const key = getApiKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function toError(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error) ({ code, message } = body.error);
  } catch { /* not JSON */ }
  const err = new ApiError(response.status, code, message);
  if (response.status === 401 || response.status === 403) window.dispatchEvent(new CustomEvent("imsrc:unauthorized", { detail: err }));
  return err;
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

export async function api(path, { method = "GET", json, body, signal } = {}) {
  const init = { method, signal, headers: headers({ Accept: "application/json" }) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "the server cannot be reached");
  }
  if (!response.ok) throw await toError(response);
  return response.status === 204 ? null : response.json();
}

let statusPromise = null;
/** /api/status, fetched once per page load unless refresh is asked for. */
export function status({ refresh = false } = {}) {
  if (refresh || !statusPromise) {
    statusPromise = api("/api/status").catch((e) => { statusPromise = null; throw e; });
  }
  return statusPromise;
}

let categoriesPromise = null;
export function categories({ refresh = false } = {}) {
  if (refresh || !categoriesPromise) {
    categoriesPromise = api("/api/categories").catch((e) => { categoriesPromise = null; throw e; });
  }
  return categoriesPromise;
}

/**
 * POST one file with XHR (fetch has no upload progress). onProgress(fraction 0..1).
 * Resolves with the parsed JSON body; rejects with ApiError.
 */
export function uploadWithProgress(url, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    xhr.setRequestHeader("Accept", "application/json");
    const key = getApiKey();
    if (key) xhr.setRequestHeader("X-API-Key", key);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(body);
        return;
      }
      const err = new ApiError(xhr.status, body?.error?.code || "http_error",
                               body?.error?.message || `${xhr.status} ${xhr.statusText}`);
      if (xhr.status === 401 || xhr.status === 403) window.dispatchEvent(new CustomEvent("imsrc:unauthorized", { detail: err }));
      reject(err);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload was interrupted")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "cancelled")));
    xhr.send(formData);
  });
}

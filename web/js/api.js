// The HTTP client for /api/v1 (contract: docs/api.md, served as the
// OpenAPI document at /api/v1/openapi.json). Every failure becomes an
// ApiError: `status` 0 means the server could not be reached at all.

const BASE = "/api/v1";

export class ApiError extends Error {
  constructor(status, code, message, retryAfterSecs = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfterSecs = retryAfterSecs;
  }

  /** Worth trying again later: unreachable, timed out, rate limited or a server-side failure. */
  get transient() {
    return this.status === 0 || this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

/**
 * A signal that aborts when `signal` does or after `ms` (built by hand: AbortSignal.any is
 * missing in older browsers), and `release` to call when the request is over.
 */
function withTimeout(signal, ms) {
  const controller = new AbortController();
  const forward = () => controller.abort(signal.reason);
  const timer = setTimeout(() => controller.abort(new DOMException("timed out", "TimeoutError")), ms);
  if (signal?.aborted) forward();
  else signal?.addEventListener("abort", forward, { once: true });
  const release = () => {
    clearTimeout(timer);
    signal?.removeEventListener("abort", forward);
  };
  return { signal: controller.signal, release };
}

export class Api {
  constructor(token = null) {
    this.token = token;
  }

  /**
   * One request. `body` is sent as JSON; `timeoutMs` aborts a request that
   * hangs (a dead connection must not stall a loop forever).
   */
  async request(method, path, { body, signal, timeoutMs = 30000 } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const limit = withTimeout(signal, timeoutMs);
    try {
      let response;
      let data = null;
      try {
        response = await fetch(BASE + path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: limit.signal,
          cache: "no-store",
          credentials: "omit",
        });
        if (response.status !== 204) data = await response.json();
      } catch (error) {
        if (signal?.aborted) throw signal.reason ?? error;
        // Unreachable, timed out, or an answer that is not the API's JSON (a proxy's error page,
        // a body cut off by a restart): all worth retrying.
        if (!response || response.ok || response.status >= 500) {
          throw new ApiError(0, "network_error", "The server cannot be reached.");
        }
      }
      if (!response.ok) {
        const error = data?.error ?? {};
        const retryAfter = Number.parseFloat(response.headers.get("Retry-After"));
        throw new ApiError(
          response.status,
          error.code ?? "http_error",
          error.message ?? `The server answered ${response.status}.`,
          Number.isFinite(retryAfter) ? retryAfter : null,
        );
      }
      return data;
    } finally {
      limit.release();
    }
  }

  get(path, options) {
    return this.request("GET", path, options);
  }

  post(path, body, options) {
    return this.request("POST", path, { ...options, body });
  }

  delete(path, options) {
    return this.request("DELETE", path, options);
  }

  // The contract's calls, by name.

  signUp(username, password) {
    return this.post("/users", { username, password });
  }

  signIn(username, password) {
    return this.post("/tokens", { username, password });
  }

  signOut() {
    return this.delete("/tokens/current");
  }

  me() {
    return this.get("/me");
  }

  conversations() {
    return this.get("/conversations");
  }

  conversation(id) {
    return this.get(`/conversations/${id}`);
  }

  startConversation(peer) {
    return this.post("/conversations", { peer });
  }

  latestMessages(id, limit) {
    return this.get(`/conversations/${id}/messages?limit=${limit}`);
  }

  messagesBefore(id, before, limit) {
    return this.get(`/conversations/${id}/messages?before=${before}&limit=${limit}`);
  }

  send(id, text, clientId) {
    return this.post(`/conversations/${id}/messages`, { text, client_id: clientId });
  }

  markRead(id, seq) {
    return this.post(`/conversations/${id}/read`, { seq });
  }

  events(after, { limit, timeoutSecs, signal, timeoutMs }) {
    return this.get(`/events?after=${after}&limit=${limit}&timeout=${timeoutSecs}`, { signal, timeoutMs });
  }
}

// The page's model of one signed-in user's chats, kept live by one long-poll
// on the event stream, plus the outbox that gets every typed message
// acknowledged exactly once. Long form: docs/web.md.
//
// Delivery, in short (the server's side is in docs/design.md):
// - Start: read the stream's head H, then the conversation list; the list is
//   at least as new as H, and every event after H is applied on top of it.
//   Applying is idempotent (marks only grow, messages are keyed by
//   conversation id + seq), so an event the list already reflects is harmless.
// - The loop asks for events after its cursor, applies them in order and
//   moves the cursor to the last one applied. A page cut by `limit` is
//   followed at once by the next; a failure keeps the cursor and retries with
//   jittered exponential backoff, so nothing is missed or applied twice.
// - Every message gets a client_id when it is typed. The outbox sends one
//   message at a time, in the order typed, and retries a send that failed
//   for a transient reason with the same client_id until the server
//   acknowledges it: a retry after a lost answer returns the original
//   message instead of storing a second one. The outbox is kept in
//   localStorage, so a reload does not lose it either; tabs of the same user
//   share it (each keeps the others' items when it writes, and takes up
//   theirs), so closing a tab loses nothing.
// - A conversation shows every known message from the bottom of the history
//   loaded. The answer to a send can come before the stream's event of an
//   earlier message from the peer; that message fills its place when its
//   event comes, and the history above stays in view meanwhile.

import { ApiError } from "./api.js";

/** Messages fetched per page of history. */
const HISTORY_PAGE = 50;
/** Events asked for per long-poll; a longer backlog arrives in further pages at once. */
const EVENTS_PAGE = 200;
/** How long the server holds an idle long-poll (seconds), under common proxy idle limits of 30-60 s. */
const LONG_POLL_SECS = 25;
/** Give up on a long-poll that has not answered this long after the server should have (ms). */
const LONG_POLL_GRACE_MS = 15000;
/** A send that has not been answered in this long is retried (same client_id, so at most once stored). */
const SEND_TIMEOUT_MS = 20000;
/** Backoff between attempts while the server is unreachable: first delay and cap (ms). */
const BACKOFF_FIRST_MS = 250;
const BACKOFF_CAP_MS = 4000;

/** Jittered exponential backoff before attempt number `failures` + 1. */
export function backoffMs(failures, retryAfterSecs = null) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** Math.max(0, failures - 1));
  const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
  return retryAfterSecs == null ? delay : Math.max(delay, retryAfterSecs * 1000);
}

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Resolves after `ms`, or rejects at once when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(done, ms);
    function done() {
      signal.removeEventListener("abort", aborted);
      resolve();
    }
    function aborted() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    signal.addEventListener("abort", aborted, { once: true });
  });
}

/** Outbox order: the order the messages were typed, in whichever tab. */
function typedOrder(a, b) {
  return a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0;
}

function activity(conversation) {
  return Date.parse(conversation.last_message?.created_at ?? conversation.created_at) || 0;
}

/**
 * Emits "change" events (detail: {what: "conversations" | "messages" | "status" | "outbox",
 * conversationId?}) and one "unauthorized" event when the token stops working.
 */
export class ChatClient extends EventTarget {
  constructor(api, username) {
    super();
    this.api = api;
    this.me = username;
    this.conversations = new Map();
    this.messages = new Map(); // conversation id -> Map(seq -> message)
    // Conversations whose latest page has been fetched -> the lowest seq loaded: shown from there up.
    this.loaded = new Map();
    this.cursor = 0;
    this.status = "connecting";
    this.started = false;
    this.openId = null;
    this.stopper = new AbortController();
    this.outboxKey = `chatapi.outbox.${username}`;
    this.outbox = this.#loadOutbox();
    this.outboxGone = new Set(); // client_ids this tab settled or dropped: never taken back from storage
    this.outboxBusy = false;
    this.outboxWake = null;
    this.reading = new Map(); // conversation id -> seq of a read mark in flight
    this.readFailures = 0;
    this.readRetry = null;
  }

  // Lifecycle -----------------------------------------------------------------

  start() {
    // Another tab of this user wrote the shared outbox: take up what it added.
    window.addEventListener(
      "storage",
      (event) => {
        if (event.key === this.outboxKey) this.#adoptOutbox();
      },
      { signal: this.stopper.signal },
    );
    this.#run().catch((error) => this.#fatal(error));
    this.#pumpOutbox();
  }

  stop() {
    this.stopper.abort(new DOMException("signed out", "AbortError"));
  }

  get stopped() {
    return this.stopper.signal.aborted;
  }

  // Queries -------------------------------------------------------------------

  /** Conversations, most recent activity first. */
  conversationList() {
    return [...this.conversations.values()].sort((a, b) => activity(b) - activity(a) || b.id - a.id);
  }

  unread(conversation) {
    return Math.max(0, conversation.last_seq - conversation.read_seq);
  }

  /** The lowest seq shown: the bottom of the history loaded (nothing before the latest page is). */
  floorSeq(conversationId) {
    return this.loaded.get(conversationId) ?? (this.conversations.get(conversationId)?.last_seq ?? 0) + 1;
  }

  hasOlder(conversationId) {
    return this.floorSeq(conversationId) > 1;
  }

  /** The known messages of a conversation from `floorSeq` up, in seq order. */
  messageList(conversationId) {
    const bySeq = this.messages.get(conversationId);
    if (!bySeq) return [];
    const floor = this.floorSeq(conversationId);
    return [...bySeq.values()].filter((message) => message.seq >= floor).sort((a, b) => a.seq - b.seq);
  }

  /** Messages typed here that the server has not acknowledged yet, in the order typed. */
  pendingList(conversationId) {
    return this.outbox.filter((item) => item.conversation_id === conversationId);
  }

  /** "sent", "delivered" or "read": how far the peer has got with one of my messages. */
  receiptState(message) {
    const conversation = this.conversations.get(message.conversation_id);
    if (conversation && conversation.peer_read_seq >= message.seq) return "read";
    if (conversation && conversation.peer_delivered_seq >= message.seq) return "delivered";
    return "sent";
  }

  // Actions -------------------------------------------------------------------

  /** Starts (or finds) the conversation with `peer`; errors (404 user_not_found, ...) are the caller's to show. */
  async startConversation(peer) {
    const conversation = await this.#call(() => this.api.startConversation(peer), { retry: false });
    this.#mergeConversation(conversation);
    this.#changed("conversations");
    return this.conversations.get(conversation.id);
  }

  /** Opens (or with null, closes) a conversation: loads its latest page and marks it read. */
  async open(conversationId) {
    this.openId = conversationId;
    if (conversationId == null) return;
    if (!this.conversations.has(conversationId)) {
      this.#mergeConversation(await this.#call(() => this.api.conversation(conversationId)));
      this.#changed("conversations");
    }
    if (!this.loaded.has(conversationId)) {
      const page = await this.#call(() => this.api.latestMessages(conversationId, HISTORY_PAGE));
      this.#addMessages(conversationId, page.messages);
      this.loaded.set(conversationId, page.messages.length ? page.messages[0].seq : page.last_seq + 1);
      this.#changed("messages", conversationId);
    }
    this.markRead();
  }

  /** Fetches the page of history before the oldest message shown; false when there is none. */
  async loadOlder(conversationId) {
    const floor = this.floorSeq(conversationId);
    if (floor <= 1) return false;
    const page = await this.#call(() => this.api.messagesBefore(conversationId, floor, HISTORY_PAGE));
    this.#addMessages(conversationId, page.messages);
    this.loaded.set(conversationId, page.messages.length ? Math.min(floor, page.messages[0].seq) : 1);
    this.#changed("messages", conversationId);
    return page.messages.length > 0;
  }

  /** Queues a message: it shows at once as pending and is sent until acknowledged. */
  send(conversationId, text) {
    const item = {
      client_id: newClientId(),
      conversation_id: conversationId,
      text,
      created_at: new Date().toISOString(),
      state: "pending",
      error: null,
    };
    this.outbox.push(item);
    this.#saveOutbox();
    this.#changed("outbox", conversationId);
    this.#pumpOutbox();
    return item;
  }

  /**
   * Tries a message that the server refused once more, with the same client_id: a refused message
   * was not stored, and if another tab has stored it since, the server answers with that one.
   */
  retry(clientId) {
    const item = this.outbox.find((entry) => entry.client_id === clientId);
    if (!item || item.state !== "failed") return;
    item.state = "pending";
    item.error = null;
    this.#saveOutbox();
    this.#changed("outbox", item.conversation_id);
    this.#pumpOutbox();
  }

  discard(clientId) {
    const item = this.outbox.find((entry) => entry.client_id === clientId);
    if (!item || item.state !== "failed") return;
    this.#dropFromOutbox([item.client_id]);
    this.#changed("outbox", item.conversation_id);
  }

  /** Drops what this browser keeps for the user (on sign-out). */
  forget() {
    localStorage.removeItem(this.outboxKey);
  }

  /** Marks the open conversation read up to its newest message, if the page is being looked at. */
  markRead() {
    const id = this.openId;
    if (id == null || this.stopped || document.visibilityState !== "visible" || !this.loaded.has(id)) return;
    const conversation = this.conversations.get(id);
    if (!conversation) return;
    const seq = conversation.last_seq;
    if (seq <= conversation.read_seq || (this.reading.get(id) ?? 0) >= seq) return;
    this.reading.set(id, seq);
    this.api
      .markRead(id, seq)
      .then((updated) => {
        this.readFailures = 0;
        this.#mergeConversation(updated);
        this.#changed("conversations");
      })
      .catch((error) => {
        if (error instanceof ApiError && error.status === 401) return this.#unauthorized();
        // Not recorded: the peer sees no read tick and other devices an unread count. Try again
        // after a pause (a quiet conversation may bring no event to do it).
        this.readFailures += 1;
        clearTimeout(this.readRetry);
        this.readRetry = setTimeout(() => this.markRead(), backoffMs(this.readFailures, error.retryAfterSecs));
      })
      .finally(() => {
        if (this.reading.get(id) === seq) this.reading.delete(id);
      });
  }

  // The event loop --------------------------------------------------------------

  async #run() {
    const signal = this.stopper.signal;
    let failures = 0;
    let emptyEarly = 0;
    await this.#bootstrap();
    while (!this.stopped) {
      try {
        // After a failure, a quick probe (timeout 0) tells at once whether the server is back.
        const timeoutSecs = this.status === "online" ? LONG_POLL_SECS : 0;
        const askedAt = Date.now();
        const page = await this.api.events(this.cursor, {
          limit: EVENTS_PAGE,
          timeoutSecs,
          signal,
          timeoutMs: timeoutSecs * 1000 + LONG_POLL_GRACE_MS,
        });
        if (page.events.length === 0 && page.last_pos < this.cursor) {
          // The stream is behind our cursor: the server's data was replaced. Start over.
          await this.#startOver();
          continue;
        }
        for (const event of page.events) {
          if (event.pos <= this.cursor) continue;
          await this.#apply(event);
          this.cursor = event.pos;
        }
        failures = 0;
        this.#setStatus("online");
        this.markRead();
        // Nothing, long before the timeout: the server is stopping (it answers waiting polls at
        // once while it drains, and would answer the next one at once too) or another tab's
        // poll took our place. Pause before asking again rather than spin on it.
        const early = timeoutSecs > 0 && page.events.length === 0 && Date.now() - askedAt < timeoutSecs * 500;
        emptyEarly = early ? emptyEarly + 1 : 0;
        if (early) await sleep(backoffMs(emptyEarly), signal).catch(() => {});
      } catch (error) {
        if (this.stopped) return;
        if (error instanceof ApiError && error.status === 401) return this.#unauthorized();
        if (!(error instanceof ApiError)) console.error("event loop", error);
        failures += 1;
        this.#setStatus("reconnecting");
        await sleep(backoffMs(failures, error.retryAfterSecs), signal).catch(() => {});
      }
    }
  }

  /** The head of the stream, then the conversation list (retried until the server answers). */
  async #bootstrap() {
    const head = await this.#call(() => this.api.events(0, { limit: 1, timeoutSecs: 0 }));
    const { conversations } = await this.#call(() => this.api.conversations());
    for (const conversation of conversations) this.#mergeConversation(conversation);
    this.cursor = head.last_pos;
    this.started = true;
    this.#setStatus("online");
    this.#changed("conversations");
  }

  /** Forgets everything the server told (not the outbox) and loads it again. */
  async #startOver() {
    for (const known of [this.conversations, this.messages, this.loaded, this.reading]) known.clear();
    this.#changed("messages", this.openId);
    await this.#bootstrap();
    if (this.openId != null && this.conversations.has(this.openId)) await this.open(this.openId);
  }

  async #apply(event) {
    if (event.type === "message") {
      const message = event.message;
      if (!this.conversations.has(message.conversation_id)) {
        // Normally announced by a `conversation` event first; fetch it if not.
        this.#mergeConversation(await this.api.conversation(message.conversation_id));
      }
      this.#addMessages(message.conversation_id, [message]);
      this.#changed("messages", message.conversation_id);
      this.#changed("conversations");
    } else if (event.type === "receipt") {
      const conversation = this.conversations.get(event.conversation_id);
      if (!conversation) return;
      if (event.user === this.me) {
        conversation.read_seq = Math.max(conversation.read_seq, event.read_seq);
      } else {
        conversation.peer_delivered_seq = Math.max(conversation.peer_delivered_seq, event.delivered_seq);
        conversation.peer_read_seq = Math.max(conversation.peer_read_seq, event.read_seq);
        this.#changed("messages", event.conversation_id);
      }
      this.#changed("conversations");
    } else if (event.type === "conversation") {
      this.#mergeConversation(event.conversation);
      this.#changed("conversations");
    }
  }

  // The outbox --------------------------------------------------------------------

  async #pumpOutbox() {
    if (this.outboxBusy) return;
    this.outboxBusy = true;
    const signal = this.stopper.signal;
    let failures = 0;
    try {
      for (;;) {
        const item = this.outbox.find((entry) => entry.state === "pending");
        if (!item || this.stopped) break;
        try {
          const message = await this.api.request("POST", `/conversations/${item.conversation_id}/messages`, {
            body: { text: item.text, client_id: item.client_id },
            signal,
            timeoutMs: SEND_TIMEOUT_MS,
          });
          failures = 0;
          this.#dropFromOutbox([item.client_id]);
          this.#addMessages(item.conversation_id, [message]);
          this.#changed("messages", item.conversation_id);
          this.#changed("conversations");
        } catch (error) {
          if (this.stopped) break;
          if (error instanceof ApiError && error.status === 401) {
            this.#unauthorized();
            break;
          }
          if (!(error instanceof ApiError) || error.transient) {
            failures += 1;
            item.retrying = error.message || "the server cannot be reached";
            this.#changed("outbox", item.conversation_id);
            await this.#outboxPause(backoffMs(failures, error.retryAfterSecs));
            continue;
          }
          // Refused for good (the text, the conversation): say so and let the user decide.
          item.state = "failed";
          item.error = error.message;
          this.#saveOutbox();
          this.#changed("outbox", item.conversation_id);
        }
      }
    } finally {
      this.outboxBusy = false;
    }
  }

  /** Waits before the next send attempt; cut short when the event loop sees the server again. */
  #outboxPause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const signal = this.stopper.signal;
      const self = this;
      function done() {
        clearTimeout(timer);
        self.outboxWake = null;
        signal.removeEventListener("abort", done);
        resolve();
      }
      this.outboxWake = done;
      signal.addEventListener("abort", done, { once: true });
    });
  }

  #loadOutbox() {
    try {
      const items = JSON.parse(localStorage.getItem(this.outboxKey) ?? "[]");
      return Array.isArray(items) ? items.filter((item) => item && item.client_id && item.text) : [];
    } catch {
      return [];
    }
  }

  /** Takes up the items other tabs of this user added to the shared outbox. */
  #adoptOutbox() {
    const added = this.#othersOutbox();
    if (!added.length) return;
    this.outbox = [...this.outbox, ...added].sort(typedOrder);
    for (const id of new Set(added.map((item) => item.conversation_id))) this.#changed("outbox", id);
    this.#pumpOutbox();
  }

  /** The stored outbox items that are not this tab's and that it has not seen settled or dropped. */
  #othersOutbox() {
    const mine = new Set(this.outbox.map((item) => item.client_id));
    return this.#loadOutbox().filter((item) => !mine.has(item.client_id) && !this.outboxGone.has(item.client_id));
  }

  #dropFromOutbox(clientIds) {
    const gone = new Set(clientIds);
    for (const id of gone) this.outboxGone.add(id);
    this.outbox = this.outbox.filter((item) => !gone.has(item.client_id));
    this.#saveOutbox();
  }

  #saveOutbox() {
    // Other tabs of this user keep their unsent messages in the same place: keep theirs too.
    const others = this.#othersOutbox();
    const own = this.outbox.map(({ client_id, conversation_id, text, created_at, state, error }) => ({
      client_id,
      conversation_id,
      text,
      created_at,
      state,
      error,
    }));
    const items = [...own, ...others].sort(typedOrder);
    try {
      if (items.length) localStorage.setItem(this.outboxKey, JSON.stringify(items));
      else localStorage.removeItem(this.outboxKey);
    } catch {
      // Storage full or disabled: the outbox still lives in memory.
    }
  }

  // State changes -------------------------------------------------------------------

  #mergeConversation(incoming) {
    const known = this.conversations.get(incoming.id);
    if (!known) {
      this.conversations.set(incoming.id, { ...incoming });
      return;
    }
    known.peer = incoming.peer;
    known.created_at = incoming.created_at;
    for (const mark of ["last_seq", "read_seq", "peer_delivered_seq", "peer_read_seq"]) {
      known[mark] = Math.max(known[mark], incoming[mark]);
    }
    if (incoming.last_message && (!known.last_message || incoming.last_message.seq >= known.last_message.seq)) {
      known.last_message = incoming.last_message;
    }
  }

  #addMessages(conversationId, messages) {
    let bySeq = this.messages.get(conversationId);
    if (!bySeq) {
      bySeq = new Map();
      this.messages.set(conversationId, bySeq);
    }
    const conversation = this.conversations.get(conversationId);
    for (const message of messages) {
      bySeq.set(message.seq, message);
      if (!conversation) continue;
      conversation.last_seq = Math.max(conversation.last_seq, message.seq);
      if (message.sender === this.me) {
        // Sending counts as reading (and as delivery) on the server too.
        conversation.read_seq = Math.max(conversation.read_seq, message.seq);
      }
      if (!conversation.last_message || message.seq >= conversation.last_message.seq) {
        conversation.last_message = message;
      }
    }
    // A message of mine that arrived through the stream (or a replayed send) settles its outbox entry,
    // a refused one too (another tab retried it and it is stored now).
    const settled = new Set(messages.filter((m) => m.sender === this.me && m.client_id).map((m) => m.client_id));
    for (const id of settled) this.outboxGone.add(id); // stored: no tab's copy is to be taken up again
    if (this.outbox.some((item) => settled.has(item.client_id))) {
      // The in-flight send, if any, will get 200 with the same message and find nothing left to do.
      this.#dropFromOutbox(settled);
    }
  }

  #setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    if (status === "online" && this.outboxWake) this.outboxWake();
    this.#changed("status");
  }

  #changed(what, conversationId = null) {
    this.dispatchEvent(new CustomEvent("change", { detail: { what, conversationId } }));
  }

  #unauthorized() {
    if (this.stopped) return;
    this.stop();
    this.dispatchEvent(new CustomEvent("unauthorized"));
  }

  #fatal(error) {
    if (this.stopped) return;
    if (error instanceof ApiError && error.status === 401) return this.#unauthorized();
    console.error("chat client stopped", error);
  }

  /** One call, retried with backoff while the failure is transient (unless `retry` is false); 401 ends the session. */
  async #call(fn, { retry = true } = {}) {
    let failures = 0;
    for (;;) {
      try {
        const result = await fn();
        // It failed before and now answered: the server is back (the event loop may be mid-backoff).
        if (failures) this.#setStatus("online");
        return result;
      } catch (error) {
        if (this.stopped) throw error;
        if (!(error instanceof ApiError)) throw error;
        if (error.status === 401) {
          this.#unauthorized();
          throw error;
        }
        if (!error.transient || !retry) throw error;
        failures += 1;
        this.#setStatus("reconnecting");
        await sleep(backoffMs(failures, error.retryAfterSecs), this.stopper.signal);
      }
    }
  }
}

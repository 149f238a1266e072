// The signed-in screen: conversation list, open conversation and composer.
//
// Every piece of text that came from a user or the server goes into the page
// through textContent (or an attribute), never through innerHTML: a message
// is plain text, whatever it looks like.

import { ApiError } from "./api.js";
import {
  TEXT_MAX_CHARS,
  clockTime,
  codePoints,
  colourIndex,
  dayKey,
  dayLabel,
  fullTime,
  isBlank,
  isUsername,
  listTime,
  sendable,
} from "./text.js";

/** Within this many pixels of the bottom, new messages keep the view scrolled to the end. */
const STICK_TO_BOTTOM_PX = 80;
/** Scrolled up further than this from the newest message, a button offers to jump back. */
const JUMP_BUTTON_AFTER_PX = 400;
/** Closer than this to the top of the history, the previous page is fetched. */
const LOAD_OLDER_AT_PX = 200;
/** From this many code points on, the counter warns that the limit is near. */
const COUNT_WARN_AT = 3800;
/** The composer grows with its text up to this height (px), then scrolls. */
const COMPOSER_MAX_PX = 160;
/**
 * An announcement stays in the live region this long (ms): screen readers take its text when it goes
 * in, and after that it would only be found again, out of place, by someone reading the page through.
 */
const ANNOUNCEMENT_MS = 5000;

/** Both panes side by side from this width on (keep in step with app.css). */
const WIDE_LAYOUT = "(min-width: 48rem)";
/** The reader asked for less motion: scrolls jump instead of gliding. */
const REDUCED_MOTION = "(prefers-reduced-motion: reduce)";

const SVG_NS = "http://www.w3.org/2000/svg";
const ICONS = {
  pending: ["M12 7v5l3 2", "M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18"],
  sent: ["M5 12.5l4.5 4.5L19 7.5"],
  delivered: ["M2.5 12.5L7 17l9.5-9.5", "M11 15.5l1.5 1.5L22 7.5"],
  read: ["M2.5 12.5L7 17l9.5-9.5", "M11 15.5l1.5 1.5L22 7.5"],
  failed: ["M12 7v6", "M12 16.5v.5", "M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18"],
};
const STATE_LABELS = {
  pending: "Sending",
  sent: "Sent",
  delivered: "Delivered",
  read: "Read",
  failed: "Not sent",
};

/** Element with optional class and text: the only way this module makes markup. */
function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function icon(paths) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  for (const d of paths) {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

/** "You:" or "bob:", before a message's text for screen readers. */
function speaker(row) {
  return row.mine ? "You:" : `${row.sender}:`;
}

function setAvatar(node, name) {
  node.textContent = (name[0] ?? "?").toUpperCase();
  for (let i = 0; i < 8; i += 1) node.classList.remove(`avatar--${i}`);
  node.classList.add("avatar", `avatar--${colourIndex(name)}`);
}

/**
 * Keeps `container`'s children equal to one element per item, in order, reusing
 * the element of each key: focus, scroll position and text selection survive.
 */
function reconcile(container, items, keyOf, create, update) {
  const wanted = new Set(items.map(keyOf));
  const existing = new Map();
  for (const child of [...container.children]) {
    if (wanted.has(child.dataset.key)) existing.set(child.dataset.key, child);
    else child.remove();
  }
  let next = container.firstElementChild;
  for (const item of items) {
    const key = keyOf(item);
    let node = existing.get(key);
    if (!node) {
      node = create(item);
      node.dataset.key = key;
    }
    update(node, item);
    if (node === next) next = next.nextElementSibling;
    else container.insertBefore(node, next);
  }
}

export class ChatView {
  constructor(client) {
    this.client = client;
    this.openId = null;
    this.drafts = new Map();
    this.dirty = new Set();
    this.flushQueued = false;
    this.loadingOlder = false;
    this.filled = false; // the open conversation's loaded messages are in the list
    this.listStop = null; // the key of the conversation that holds the list's one Tab stop
    this.unreadShown = new Map(); // conversation id -> its unread count in the list, to announce the new ones
    this.listShown = false; // the list has been rendered since the client started
    this.disposers = [];

    const $ = (id) => document.getElementById(id);
    this.app = $("app");
    this.list = $("conversation-list");
    this.listEmpty = $("conversations-empty");
    this.connection = $("connection");
    this.connectionText = $("connection-text");
    this.newChat = $("new-chat");
    this.newChatPeer = $("new-chat-peer");
    this.newChatError = $("new-chat-error");
    this.paneEmpty = $("pane-empty");
    this.conversation = $("conversation");
    this.title = $("conversation-title");
    this.avatar = $("conversation-avatar");
    this.scroller = $("messages");
    this.messageList = $("message-list");
    this.loadOlderButton = $("load-older");
    this.historyStart = $("history-start");
    this.jumpButton = $("jump-to-latest");
    this.composer = $("composer");
    this.composerText = $("composer-text");
    this.composerCount = $("composer-count");
    this.announcer = $("announcements");
    this.sendButton = this.composer.querySelector("button[type=submit]");
    $("me-name").textContent = client.me;
    setAvatar($("me-avatar"), client.me);
    this.app.dataset.view = "list";

    this.#listen(client, "change", (event) => this.#schedule(event.detail));
    this.#listen(window, "hashchange", () => this.#route());
    this.#listen(document, "visibilitychange", () => {
      this.client.markRead();
      this.#renderList();
    });
    this.#listen(this.newChat, "submit", (event) => this.#startChat(event));
    this.#listen(this.newChatPeer, "input", () => this.#showNewChatError(""));
    this.#listen(this.composer, "submit", (event) => {
      event.preventDefault();
      this.#send();
    });
    this.#listen(this.composerText, "keydown", (event) => this.#composerKey(event));
    this.#listen(this.composerText, "input", () => this.#composerChanged());
    this.#listen(this.scroller, "scroll", () => {
      this.#maybeLoadOlder();
      this.#updateJump();
    });
    this.#listen(this.jumpButton, "click", () => {
      const behavior = window.matchMedia(REDUCED_MOTION).matches ? "instant" : "smooth";
      this.scroller.scrollTo({ top: this.scroller.scrollHeight, behavior });
      this.composerText.focus({ preventScroll: true });
    });
    this.#listen(this.loadOlderButton, "click", () => this.#loadOlder());
    this.#listen(this.list, "keydown", (event) => this.#listKey(event));
    this.#listen(this.list, "focusin", (event) => {
      this.listStop = event.target.closest("li")?.dataset.key;
      this.#placeListStop();
    });
    this.#listen(document.getElementById("back"), "click", () => {
      location.hash = "";
    });
    this.#listen(this.messageList, "click", (event) => this.#messageAction(event));
    this.#listen(this.conversation, "keydown", (event) => {
      // One pane at a time (phones): Escape goes back to the list, like the back button.
      if (event.key === "Escape" && !window.matchMedia(WIDE_LAYOUT).matches) location.hash = "";
    });

    this.#renderStatus();
    this.#renderList();
    this.#route();
  }

  /**
   * Gives the focus to the screen (after signing in): to the field that starts a chat, or on a phone
   * to the screen's heading, not to bring the on-screen keyboard up over the list.
   */
  focusStart() {
    if (window.matchMedia(WIDE_LAYOUT).matches) this.newChatPeer.focus();
    else document.getElementById("app-heading").focus();
  }

  dispose() {
    for (const dispose of this.disposers) dispose();
    this.disposers = [];
    this.list.replaceChildren();
    this.messageList.replaceChildren();
    this.announcer.replaceChildren();
    document.getElementById("me-name").textContent = "";
    document.getElementById("me-avatar").textContent = "";
    this.conversation.hidden = true;
    this.paneEmpty.hidden = false;
    this.composerText.value = "";
    this.newChatPeer.value = "";
    this.#showNewChatError("");
    this.openId = null;
    this.app.dataset.view = "list";
    document.title = "chatapi";
  }

  #listen(target, type, handler) {
    target.addEventListener(type, handler);
    this.disposers.push(() => target.removeEventListener(type, handler));
  }

  // Rendering, batched: many events in one page cause one render. ---------------------

  #schedule({ what, conversationId }) {
    if (what === "messages" || what === "outbox") {
      if (conversationId !== this.openId) return;
      this.dirty.add("conversation");
    } else {
      this.dirty.add(what);
    }
    if (what === "conversations") this.dirty.add("header");
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      const dirty = this.dirty;
      this.dirty = new Set();
      if (dirty.has("status")) this.#renderStatus();
      if (dirty.has("conversations")) this.#renderList();
      if (dirty.has("conversation") || dirty.has("conversations")) this.#renderConversation();
    });
  }

  #renderStatus() {
    const status = this.client.status;
    const was = this.connection.dataset.state;
    if (status === "reconnecting" && was !== "reconnecting") this.#announce(["Reconnecting…"]);
    if (status === "online" && was === "reconnecting") this.#announce(["Connected again."]);
    this.connection.dataset.state = status;
    this.connection.hidden = status === "online";
    this.connectionText.textContent = status === "reconnecting" ? "Reconnecting…" : "Connecting…";
  }

  #renderList() {
    const conversations = this.client.conversationList();
    this.listEmpty.hidden = conversations.length > 0 || !this.client.started;
    const news = [];
    // A conversation that moves up (new message) is taken out and put back: the focus would drop to the page.
    const focused = this.list.contains(document.activeElement) ? document.activeElement : null;
    reconcile(
      this.list,
      conversations,
      (c) => String(c.id),
      (c) => {
        const li = el("li");
        const link = el("a", "conversation-item");
        link.href = `#/c/${c.id}`;
        link.dataset.testid = "conversation-item";
        const avatar = el("span");
        avatar.setAttribute("aria-hidden", "true");
        const body = el("span", "conversation-body");
        const top = el("span", "conversation-top");
        const bottom = el("span", "conversation-bottom");
        top.append(el("span", "conversation-peer"), el("time", "conversation-time"));
        const badge = el("span", "badge");
        badge.dataset.testid = "unread-badge";
        bottom.append(el("span", "conversation-preview"), badge);
        body.append(top, bottom);
        link.append(avatar, body);
        li.append(link);
        return li;
      },
      (li, c) => {
        const link = li.firstElementChild;
        const [avatar, body] = link.children;
        const [top, bottom] = body.children;
        const [peer, time] = top.children;
        const [preview, badge] = bottom.children;
        link.dataset.peer = c.peer;
        setAvatar(avatar, c.peer);
        peer.textContent = c.peer;
        const last = c.last_message;
        const when = new Date(last?.created_at ?? c.created_at);
        time.textContent = listTime(when);
        time.dateTime = when.toISOString();
        time.title = fullTime(when);
        preview.textContent = last
          ? `${last.sender === this.client.me ? "You: " : ""}${last.text.replace(/\s+/gu, " ").trim()}`
          : "No messages yet";
        preview.classList.toggle("conversation-preview--empty", !last);
        const unread = this.client.unread(c);
        // More unread than the list showed: news, unless it is the open conversation (which says it itself).
        if (this.listShown && unread > (this.unreadShown.get(c.id) ?? 0) && c.id !== this.openId) {
          news.push(`New message from ${c.peer}`);
        }
        this.unreadShown.set(c.id, unread);
        badge.textContent = String(unread);
        badge.hidden = unread === 0 || c.id === this.openId;
        link.classList.toggle("conversation-item--unread", unread > 0 && c.id !== this.openId);
        link.setAttribute(
          "aria-label",
          `${c.peer}${unread && c.id !== this.openId ? `, ${unread} unread` : ""}${last ? `: ${preview.textContent}` : ""}`,
        );
        if (c.id === this.openId) link.setAttribute("aria-current", "page");
        else link.removeAttribute("aria-current");
      },
    );
    if (focused?.isConnected && document.activeElement !== focused) focused.focus();
    this.#placeListStop();
    this.#announce(news);
    this.listShown = this.client.started;
    // The tab's title counts what is unread, including the open conversation while the page is hidden.
    const watching = document.visibilityState === "visible" ? this.openId : null;
    const unreadTotal = conversations.reduce((sum, c) => sum + (c.id === watching ? 0 : this.client.unread(c)), 0);
    document.title = unreadTotal ? `(${unreadTotal}) chatapi` : "chatapi";
  }

  /**
   * The list is one Tab stop, not one per conversation, and the arrow keys move within it (as in
   * a menu): the stop is the conversation focused last, else the open one, else the first.
   */
  #placeListStop() {
    const links = this.#listLinks();
    const stop =
      links.find((link) => link.parentElement.dataset.key === this.listStop) ??
      links.find((link) => link.parentElement.dataset.key === String(this.openId)) ??
      links[0];
    for (const link of links) link.tabIndex = link === stop ? 0 : -1;
  }

  #listKey(event) {
    const links = this.#listLinks();
    const at = links.indexOf(document.activeElement);
    const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: links.length - 1 }[event.key];
    if (at < 0 || to === undefined || event.altKey || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    links[Math.max(0, Math.min(links.length - 1, to))].focus();
  }

  #listLinks() {
    return [...this.list.querySelectorAll(".conversation-item")];
  }

  #renderConversation() {
    const id = this.openId;
    const conversation = id == null ? null : this.client.conversations.get(id);
    this.paneEmpty.hidden = conversation != null;
    this.conversation.hidden = conversation == null;
    if (!conversation) return;
    this.title.textContent = conversation.peer;
    this.composerText.placeholder = `Message ${conversation.peer}`;
    setAvatar(this.avatar, conversation.peer);
    this.scroller.setAttribute("aria-label", `Messages with ${conversation.peer}`);
    if (!this.client.loaded.has(id)) {
      this.messageList.replaceChildren();
      this.filled = false;
      this.loadOlderButton.hidden = true;
      this.historyStart.hidden = true;
      return;
    }

    const distanceFromBottom = this.scroller.scrollHeight - this.scroller.scrollTop - this.scroller.clientHeight;
    const stick = this.stickToBottom || distanceFromBottom < STICK_TO_BOTTOM_PX;
    const heightBefore = this.scroller.scrollHeight;
    const topBefore = this.scroller.scrollTop;
    const firstBefore = this.messageList.querySelector("[data-testid=message]")?.dataset.key;

    const rows = [];
    let lastDay = null;
    const addDay = (date) => {
      const key = dayKey(date);
      if (key !== lastDay) rows.push({ kind: "day", key: `d:${key}`, date });
      lastDay = key;
    };
    for (const message of this.client.messageList(id)) {
      const date = new Date(message.created_at);
      addDay(date);
      const mine = message.sender === this.client.me;
      rows.push({
        kind: "message",
        key: mine && message.client_id ? `c:${message.client_id}` : `s:${message.seq}`,
        text: message.text,
        mine,
        date,
        seq: message.seq,
        sender: message.sender,
        state: mine ? this.client.receiptState(message) : null,
      });
    }
    for (const item of this.client.pendingList(id)) {
      const date = new Date(item.created_at);
      addDay(date);
      rows.push({
        kind: "message",
        key: `c:${item.client_id}`,
        text: item.text,
        mine: true,
        date,
        seq: null,
        sender: this.client.me,
        state: item.state === "failed" ? "failed" : "pending",
        error: item.error,
        retrying: item.state === "failed" ? null : (item.retrying ?? null),
        clientId: item.client_id,
      });
    }

    // What screen readers are told: each message that comes in, each note on sending that goes up.
    // A whole page going in at once (the conversation opened, or older history) is not news, and
    // is not read out. (Not "no message shown yet": in an open, empty conversation the first
    // message is news.)
    const quiet = !this.filled || this.loadingOlder;
    this.filled = true;
    const news = [];
    reconcile(
      this.messageList,
      rows,
      (row) => row.key,
      (row) => {
        if (row.kind === "day") return this.#createDay();
        news.push(`${speaker(row)} ${row.text}`);
        return this.#createMessage();
      },
      (node, row) => {
        if (row.kind === "day") this.#updateDay(node, row);
        else news.push(...this.#updateMessage(node, row));
      },
    );
    if (!quiet) this.#announce(news);

    const hasOlder = this.client.hasOlder(id);
    this.loadOlderButton.hidden = !hasOlder;
    this.historyStart.hidden = hasOlder;

    const firstAfter = this.messageList.querySelector("[data-testid=message]")?.dataset.key;
    if (stick) {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.stickToBottom = false;
    } else if (firstBefore && firstAfter !== firstBefore) {
      // Older history went in above: keep what the reader was looking at in place.
      this.scroller.scrollTop = topBefore + (this.scroller.scrollHeight - heightBefore);
    }
    this.#updateJump();
  }

  /** Shows "Jump to latest" while the reader is scrolled up, away from the newest messages. */
  #updateJump() {
    const distance = this.scroller.scrollHeight - this.scroller.scrollTop - this.scroller.clientHeight;
    this.jumpButton.hidden = distance < JUMP_BUTTON_AFTER_PX;
  }

  #createDay() {
    const li = el("li", "day");
    li.append(el("span", "day-label"));
    return li;
  }

  #updateDay(li, row) {
    li.firstElementChild.textContent = dayLabel(row.date);
  }

  #createMessage() {
    const li = el("li", "message");
    li.dataset.testid = "message";
    const bubble = el("div", "bubble");
    // Who said it, for screen readers (the page shows it by the bubble's side and colour).
    const who = el("span", "visually-hidden");
    const text = el("p", "message-text");
    text.dataset.testid = "message-text";
    const meta = el("span", "message-meta");
    const time = el("time", "message-time");
    const state = el("span", "message-state");
    state.dataset.testid = "message-state";
    state.setAttribute("role", "img");
    meta.append(time, state);
    bubble.append(who, text, meta);
    li.append(bubble);
    return li;
  }

  #updateMessage(li, row) {
    const [who, text, meta] = li.firstElementChild.children;
    who.textContent = speaker(row);
    const [time, state] = meta.children;
    li.classList.toggle("message--mine", row.mine);
    li.classList.toggle("message--theirs", !row.mine);
    li.dataset.sender = row.sender;
    if (row.seq != null) li.dataset.seq = String(row.seq);
    else delete li.dataset.seq;
    if (text.textContent !== row.text) text.textContent = row.text;
    time.textContent = clockTime(row.date);
    time.dateTime = row.date.toISOString();
    time.title = fullTime(row.date);
    if (row.mine) {
      if (li.dataset.state !== row.state) {
        li.dataset.state = row.state;
        state.replaceChildren(icon(ICONS[row.state]));
        state.setAttribute("aria-label", STATE_LABELS[row.state]);
        state.title = STATE_LABELS[row.state];
      }
      state.hidden = false;
    } else {
      delete li.dataset.state;
      state.hidden = true;
    }
    // The notes put up now, to be announced.
    return [this.#updateFailure(li, row), this.#updateRetrying(li, row)].filter(Boolean);
  }

  /** A send that keeps failing for a passing reason says so, under its clock. Returns the note if new. */
  #updateRetrying(li, row) {
    let note = li.querySelector(".message-retrying");
    if (!row.retrying) {
      note?.remove();
      return null;
    }
    const put = !note;
    if (put) {
      note = el("div", "message-retrying");
      note.dataset.testid = "message-retrying";
      li.append(note);
    }
    note.textContent = `Not sent yet (${row.retrying}); trying again…`;
    return put ? note.textContent : null;
  }

  /** A message refused for good says so, with Retry and Delete. Returns the note if new. */
  #updateFailure(li, row) {
    let failure = li.querySelector(".message-failure");
    if (row.state !== "failed") {
      failure?.remove();
      return null;
    }
    const put = !failure;
    if (put) {
      failure = el("div", "message-failure");
      failure.append(el("span", "message-failure-text"));
      const retry = el("button", "link-button", "Retry");
      retry.type = "button";
      retry.dataset.action = "retry";
      const discard = el("button", "link-button", "Delete");
      discard.type = "button";
      discard.dataset.action = "discard";
      failure.append(retry, discard);
      li.append(failure);
    }
    failure.dataset.clientId = row.clientId;
    failure.firstElementChild.textContent = `Not sent: ${row.error ?? "refused by the server"}`;
    return put ? failure.firstElementChild.textContent : null;
  }

  /** Tells screen readers `lines`, through the page's live region (the screen shows them already). */
  #announce(lines) {
    for (const text of lines) {
      const line = el("p", "", text);
      this.announcer.append(line);
      setTimeout(() => line.remove(), ANNOUNCEMENT_MS);
    }
  }

  #messageAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const clientId = button.closest(".message-failure")?.dataset.clientId;
    if (!clientId) return;
    if (button.dataset.action === "retry") this.client.retry(clientId);
    else this.client.discard(clientId);
    this.composerText.focus();
  }

  // Navigation -------------------------------------------------------------------

  #route() {
    const match = /^#\/c\/(\d+)$/.exec(location.hash);
    const id = match ? Number(match[1]) : null;
    if (id === this.openId) return;
    const previous = this.openId;
    this.app.dataset.view = id == null ? "list" : "conversation";
    if (this.openId != null) this.drafts.set(this.openId, this.composerText.value);
    this.openId = id;
    this.messageList.replaceChildren();
    this.filled = false;
    this.stickToBottom = true;
    this.composerText.value = id == null ? "" : (this.drafts.get(id) ?? "");
    this.#composerChanged();
    this.#renderList();
    this.#renderConversation();
    if (id == null) {
      this.client.open(null);
      if (document.activeElement === document.body || this.conversation.contains(document.activeElement)) {
        this.list.querySelector(`a[href="#/c/${previous}"]`)?.focus();
      }
      return;
    }
    if (window.matchMedia(WIDE_LAYOUT).matches || document.activeElement?.closest(".conversation-list")) {
      this.composerText.focus({ preventScroll: true });
    }
    this.client
      .open(id)
      .then(() => {
        if (this.openId !== id) return;
        this.stickToBottom = true;
        this.#renderConversation();
        this.#renderList();
        this.#fillViewport();
      })
      .catch((error) => {
        if (this.openId === id && error instanceof ApiError && error.status === 404) location.hash = "";
      });
  }

  async #startChat(event) {
    event.preventDefault();
    const peer = this.newChatPeer.value.trim();
    if (!peer) return this.#showNewChatError("Type the username of the person to chat with.");
    if (peer.toLowerCase() === this.client.me) return this.#showNewChatError("That is you. Pick someone else.");
    if (!isUsername(peer)) return this.#showNewChatError(`There is no user called “${peer}”.`);
    const button = this.newChat.querySelector("button");
    button.disabled = true;
    try {
      const conversation = await this.client.startConversation(peer);
      this.newChatPeer.value = "";
      this.#showNewChatError("");
      location.hash = `#/c/${conversation.id}`;
      this.composerText.focus();
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.code === "user_not_found") this.#showNewChatError(`There is no user called “${peer}”.`);
      else if (error.code === "invalid_peer") this.#showNewChatError("That is you. Pick someone else.");
      else if (error.status === 0) this.#showNewChatError("Cannot reach the server. Try again in a moment.");
      else if (error.status !== 401) this.#showNewChatError(error.message);
      // The button lost the focus when it was disabled: it goes to the field, to correct the name.
      this.newChatPeer.focus();
    } finally {
      button.disabled = false;
    }
  }

  #showNewChatError(message) {
    this.newChatError.textContent = message;
    this.newChatPeer.setAttribute("aria-invalid", message ? "true" : "false");
    if (message) this.newChatPeer.setAttribute("aria-describedby", "new-chat-error");
    else this.newChatPeer.removeAttribute("aria-describedby");
  }

  // History ------------------------------------------------------------------------

  #maybeLoadOlder() {
    if (this.scroller.scrollTop < LOAD_OLDER_AT_PX) this.#loadOlder();
  }

  async #loadOlder() {
    const id = this.openId;
    if (id == null || this.loadingOlder || !this.client.loaded.has(id) || !this.client.hasOlder(id)) return;
    this.loadingOlder = true;
    // aria-disabled, not disabled: a disabled button loses the keyboard focus to the page's start.
    const focused = document.activeElement === this.loadOlderButton;
    this.loadOlderButton.setAttribute("aria-disabled", "true");
    this.loadOlderButton.textContent = "Loading…";
    try {
      await this.client.loadOlder(id);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
    } finally {
      this.loadingOlder = false;
      this.loadOlderButton.removeAttribute("aria-disabled");
      this.loadOlderButton.textContent = "Load earlier messages";
    }
    // The whole history is in: the button went away, so the focus goes to where it stood.
    if (focused && this.loadOlderButton.hidden) this.historyStart.focus();
    this.#fillViewport();
  }

  /** Loads older pages until the history fills the view (or there is no more). */
  #fillViewport() {
    const id = this.openId;
    if (id == null || !this.client.hasOlder(id)) return;
    if (this.scroller.scrollHeight <= this.scroller.clientHeight + LOAD_OLDER_AT_PX) this.#loadOlder();
  }

  // Composer ------------------------------------------------------------------------

  #composerKey(event) {
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    this.#send();
  }

  #composerChanged() {
    const text = this.composerText.value;
    const count = codePoints(text);
    const over = count > TEXT_MAX_CHARS;
    this.composerCount.textContent = over
      ? `${count} / ${TEXT_MAX_CHARS}: ${count - TEXT_MAX_CHARS} too many`
      : `${count} / ${TEXT_MAX_CHARS}`;
    this.composerCount.dataset.level = over ? "over" : count >= COUNT_WARN_AT ? "near" : "ok";
    this.composerText.setAttribute("aria-invalid", over ? "true" : "false");
    this.sendButton.disabled = over || isBlank(text);
    // Grow with the text (CSSOM changes are allowed by the page's CSP; style attributes are not).
    this.composerText.style.height = "auto";
    this.composerText.style.height = `${Math.min(this.composerText.scrollHeight, COMPOSER_MAX_PX)}px`;
  }

  #send() {
    const id = this.openId;
    const text = sendable(this.composerText.value);
    if (id == null || isBlank(text)) return;
    // The counter shows it in red; a screen reader is told why Enter did nothing.
    if (codePoints(text) > TEXT_MAX_CHARS) {
      this.#announce([`Too long to send: ${this.composerCount.textContent}`]);
      return;
    }
    this.client.send(id, text);
    this.composerText.value = "";
    this.drafts.delete(id);
    this.#composerChanged();
    this.stickToBottom = true;
    this.#renderConversation();
    this.composerText.focus();
  }
}

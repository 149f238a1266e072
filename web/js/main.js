// Entry point: the session (a bearer token in localStorage), the sign-in and
// sign-up form, and switching between the signed-out and signed-in screens.

import { Api, ApiError } from "./api.js";
import { ChatClient } from "./chat.js";
import { isUsername } from "./text.js";
import { ChatView } from "./view.js";

const SESSION_KEY = "chatapi.session";

const $ = (id) => document.getElementById(id);
const authView = $("auth");
const appView = $("app");
const form = $("auth-form");
const usernameInput = $("auth-username");
const passwordInput = $("auth-password");
const submitButton = $("auth-submit");
const errorText = $("auth-error");
const notice = $("auth-notice");
const tabs = [...document.querySelectorAll(".auth-tab")];

let mode = "signin";
let client = null;
let view = null;
let sessionToken = null; // the token of the session this tab runs

function loadSession() {
  try {
    const session = JSON.parse(localStorage.getItem(SESSION_KEY) ?? "null");
    return session && typeof session.token === "string" && typeof session.username === "string" ? session : null;
  } catch {
    return null;
  }
}

function saveSession(session) {
  localStorage.setItem(SESSION_KEY, JSON.stringify(session));
}

function clearSession() {
  // The storage is shared by the tabs: another tab may have signed in since (its own session, or
  // another user). Only this tab's session goes.
  if (loadSession()?.token === sessionToken) localStorage.removeItem(SESSION_KEY);
  sessionToken = null;
}

// Signed out -----------------------------------------------------------------------

function setMode(next) {
  mode = next;
  for (const tab of tabs) {
    const selected = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
  }
  form.setAttribute("aria-labelledby", mode === "signin" ? "tab-signin" : "tab-signup");
  submitButton.textContent = mode === "signin" ? "Sign in" : "Create account";
  passwordInput.autocomplete = mode === "signin" ? "current-password" : "new-password";
  $("auth-username-hint").hidden = mode === "signin";
  $("auth-password-hint").hidden = mode === "signin";
  showError("");
}

function showError(message) {
  errorText.textContent = message;
  const invalid = message ? "true" : "false";
  usernameInput.setAttribute("aria-invalid", invalid);
  passwordInput.setAttribute("aria-invalid", invalid);
  describeFields();
}

/**
 * What a screen reader says after each field's name: the error, the notice (the field has the focus
 * when the form comes up with one) and the hint, those that are shown. A hidden element named by
 * aria-describedby would be read all the same, so only the shown ones are named.
 */
function describeFields() {
  const shown = (...nodes) => nodes.filter((node) => !node.hidden && node.textContent).map((node) => node.id);
  const fields = [
    [usernameInput, shown(errorText, notice, $("auth-username-hint"))],
    [passwordInput, shown(errorText, $("auth-password-hint"))],
  ];
  for (const [field, ids] of fields) {
    if (ids.length) field.setAttribute("aria-describedby", ids.join(" "));
    else field.removeAttribute("aria-describedby");
  }
}

function showAuth(message = "") {
  appView.hidden = true;
  authView.hidden = false;
  notice.textContent = message;
  notice.hidden = !message;
  passwordInput.value = "";
  showError("");
  usernameInput.focus();
}

function describe(error) {
  if (!(error instanceof ApiError)) return "Something went wrong. Try again.";
  switch (error.code) {
    case "invalid_credentials":
      return "Wrong username or password.";
    case "username_taken":
      return "That username is taken. Pick another one.";
    case "invalid_username":
      return "Usernames have 3–32 characters: a–z, 0–9, _ . - (starting with a letter or digit).";
    case "invalid_password":
      return "Passwords have at least 8 characters.";
    case "rate_limited":
      return `Too many attempts. Try again in ${Math.ceil(error.retryAfterSecs ?? 60)} seconds.`;
    case "registration_closed":
      return "This server does not accept new accounts.";
    case "network_error":
      return "Cannot reach the server. Check your connection and try again.";
    default:
      return error.message;
  }
}

async function submit(event) {
  event.preventDefault();
  const username = usernameInput.value.trim();
  const password = passwordInput.value;
  if (!username || !password) return showError("Enter a username and a password.");
  if (mode === "signup" && !isUsername(username)) return showError(describe(new ApiError(400, "invalid_username")));
  if (mode === "signup" && [...password].length < 8) return showError(describe(new ApiError(400, "invalid_password")));
  submitButton.disabled = true;
  showError("");
  try {
    const api = new Api();
    if (mode === "signup") await api.signUp(username, password);
    const { token, user } = await api.signIn(username, password);
    const session = { token, username: user.username };
    saveSession(session);
    // Awaited: the button stays disabled until the page has started, so a second press cannot
    // start a second session (whose client and view would outlive signing out).
    await enter(session);
    // The focus was in the form, gone now: on to the signed-in screen.
    if (!appView.hidden && !appView.contains(document.activeElement)) view.focusStart();
  } catch (error) {
    showError(describe(error));
    passwordInput.focus();
  } finally {
    submitButton.disabled = false;
  }
}

// Signed in -------------------------------------------------------------------------

async function enter(session) {
  sessionToken = session.token;
  const api = new Api(session.token);
  let username = session.username;
  try {
    username = (await api.me()).username;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return sessionEnded();
    // Unreachable for now: start anyway; the client shows "reconnecting" and catches up.
  }
  authView.hidden = true;
  appView.hidden = false;
  notice.hidden = true;
  passwordInput.value = "";
  client = new ChatClient(api, username);
  client.addEventListener("unauthorized", sessionEnded);
  view = new ChatView(client);
  client.start();
}

function leave() {
  client?.stop();
  view?.dispose();
  client = null;
  view = null;
  clearSession();
  if (location.hash) history.replaceState(null, "", location.pathname);
}

function sessionEnded() {
  leave();
  showAuth("Your session has ended (it was signed out, perhaps in another tab). Please sign in again.");
}

async function signOut() {
  const unsent = client?.outbox.length ?? 0;
  if (unsent && !window.confirm(`${unsent} message(s) are not sent yet and will be lost. Sign out anyway?`)) return;
  const api = client?.api;
  client?.forget();
  leave();
  showAuth("You have signed out.");
  try {
    await api?.signOut();
  } catch {
    // The token is gone from this browser either way.
  }
}

for (const tab of tabs) {
  tab.addEventListener("click", () => setMode(tab.dataset.mode));
  tab.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    const other = tabs.find((t) => t !== tab);
    setMode(other.dataset.mode);
    other.focus();
  });
}
form.addEventListener("submit", submit);
$("sign-out").addEventListener("click", signOut);

const session = loadSession();
if (session) enter(session);
else showAuth();

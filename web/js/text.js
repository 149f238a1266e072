// Text rules shared with the server (docs/api.md, "Precise rules") and the
// formatting of names and times for display.

/** The most a message may hold, counted in Unicode code points. */
export const TEXT_MAX_CHARS = 4000;

const USERNAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$/;
// Category Cc except tab, newline and carriage return: the server refuses them.
const REFUSED_CONTROLS = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]/gu;

/** Length as the server counts it: code points, not UTF-16 units. */
export function codePoints(text) {
  let count = 0;
  for (const _ of text) count += 1;
  return count;
}

/** The text as it can be sent: refused control characters removed, lone surrogates replaced by U+FFFD. */
export function sendable(text) {
  const wellFormed = typeof text.toWellFormed === "function" ? text.toWellFormed() : text;
  return wellFormed.replace(REFUSED_CONTROLS, "");
}

export function isBlank(text) {
  return /^\s*$/u.test(text);
}

export function isUsername(name) {
  return USERNAME.test(name);
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const weekdayFormat = new Intl.DateTimeFormat(undefined, { weekday: "short" });
const shortDateFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });
const longDateFormat = new Intl.DateTimeFormat(undefined, { weekday: "long", day: "numeric", month: "long" });
const yearDateFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", year: "numeric" });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function startOfDay(date) {
  return new Date(date.getFullYear(), date.getMonth(), date.getDate()).getTime();
}

const DAY_MS = 24 * 60 * 60 * 1000;

/** Days between the local calendar days of two dates (0 = same day). */
function daysBetween(earlier, later) {
  return Math.round((startOfDay(later) - startOfDay(earlier)) / DAY_MS);
}

/** "14:05" for a message. */
export function clockTime(date) {
  return timeFormat.format(date);
}

/** "Tuesday 24 November 2026 at 14:05:12": the tooltip of a time stamp. */
export function fullTime(date) {
  return fullFormat.format(date);
}

/** A compact time for the conversation list: today a clock time, this week a weekday, else a date. */
export function listTime(date, now = new Date()) {
  const days = daysBetween(date, now);
  if (days <= 0) return timeFormat.format(date);
  if (days === 1) return "Yesterday";
  if (days < 7) return weekdayFormat.format(date);
  if (date.getFullYear() === now.getFullYear()) return shortDateFormat.format(date);
  return yearDateFormat.format(date);
}

/** The label of a day separator in a conversation. */
export function dayLabel(date, now = new Date()) {
  const days = daysBetween(date, now);
  if (days <= 0) return "Today";
  if (days === 1) return "Yesterday";
  if (date.getFullYear() === now.getFullYear()) return longDateFormat.format(date);
  return yearDateFormat.format(date);
}

/** A key that is equal for two dates on the same local day. */
export function dayKey(date) {
  return `${date.getFullYear()}-${date.getMonth() + 1}-${date.getDate()}`;
}

/** One of eight avatar colours, stable for a name. */
export function colourIndex(name) {
  let hash = 0;
  for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return hash % 8;
}

"""The web page in a real browser (Debian's Chromium driven by Playwright)
against a real server: two people chatting live, an offline recipient, a
server restart mid-conversation, markup shown as text, signing out and a
revoked token. Screenshots land in test-artifacts/.

Chromium must be at /usr/bin/chromium (`bin/test` installs Debian's package
as root); without it these tests fail, they never skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from tests.support.api import PASSWORD, Api
from tests.support.server import REPO, ServerProcess

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("CHATAPI_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
# Generous: the machine is shared with other test runs.
WAIT_MS = 20_000
MARKUP = "<img src=x onerror=alert(1)>"

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's 'chromium' package (bin/test does it as root)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def server(start_server, tmp_path: Path) -> ServerProcess:
    return start_server(f"sqlite:///{tmp_path / 'web.sqlite3'}", workers=1)


@dataclass
class Person:
    """One browser profile (its own localStorage) with one tab on the page."""

    name: str
    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def message_texts(self) -> list[str]:
        return self.page.get_by_test_id("message-text").all_text_contents()

    def message(self, text: str):
        return self.page.get_by_test_id("message").filter(
            has=self.page.get_by_test_id("message-text").get_by_text(text, exact=True)
        )

    def send(self, text: str, *, acknowledged: bool = True) -> None:
        """Types a message and presses Enter; by default waits until the server has acknowledged it
        (it has a seq), so that the next message, from whichever side, comes after it."""
        composer = self.page.get_by_test_id("composer")
        composer.fill(text)
        composer.press("Enter")
        expect(composer).to_have_value("")
        if acknowledged:
            expect(self.message(text).last).to_have_attribute("data-seq", re.compile(r"^[0-9]+$"))

    def conversation_with(self, peer: str):
        return self.page.locator(f"[data-testid=conversation-item][data-peer='{peer}']")

    def open_conversation(self, peer: str) -> None:
        self.conversation_with(peer).click()
        expect(self.page.get_by_test_id("conversation-title")).to_have_text(peer)

    def token(self) -> str | None:
        return self.page.evaluate("() => JSON.parse(localStorage.getItem('chatapi.session') || 'null')?.token ?? null")


def watched(person: Person) -> Person:
    """Records the page's script errors, CSP violations and dialogs, for `assert_quiet`."""
    person.page.on("pageerror", lambda error: person.errors.append(str(error)))
    person.page.on(
        "console",
        lambda message: "Content Security Policy" in message.text and person.errors.append(message.text),
    )
    person.page.on("dialog", lambda dialog: (person.dialogs.append(dialog.message), dialog.dismiss()))
    return person


def assert_quiet(person: Person) -> None:
    assert person.errors == [], f"script errors in {person.name}'s page: {person.errors}"
    assert person.dialogs == [], f"dialogs in {person.name}'s page: {person.dialogs}"


@pytest.fixture
def people(browser: Browser, server: ServerProcess) -> Iterator[Callable[..., Person]]:
    """Opens the page in a fresh browser profile; checks afterwards that no script error, CSP violation or
    dialog happened."""
    opened: list[Person] = []

    def open_page(name: str, viewport: dict[str, int] = DESKTOP) -> Person:
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(WAIT_MS)
        person = watched(Person(name, context, context.new_page()))
        person.page.goto(server.base_url + "/")
        opened.append(person)
        return person

    yield open_page
    try:
        for person in opened:
            assert_quiet(person)
    finally:
        for person in opened:
            person.context.close()


def sign_up(person: Person) -> None:
    page = person.page
    page.get_by_test_id("tab-signup").click()
    page.get_by_label("Username", exact=True).fill(person.name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("app-view")).to_be_visible()
    expect(page.get_by_test_id("me-name")).to_have_text(person.name)


def sign_in(person: Person) -> None:
    page = person.page
    expect(page.get_by_test_id("auth-view")).to_be_visible()
    page.get_by_label("Username", exact=True).fill(person.name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("app-view")).to_be_visible()
    expect(page.get_by_test_id("me-name")).to_have_text(person.name)


def one_profile(browser: Browser) -> BrowserContext:
    """One browser profile, for several tabs of one user: they share one localStorage."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(WAIT_MS)
    return context


def alice_in_two_tabs(context: BrowserContext, server: ServerProcess) -> tuple[Person, Person]:
    """Tab A signs alice in; tab B, opened after it, starts from the session they share."""
    tab_a = watched(Person("alice", context, context.new_page()))
    tab_a.page.goto(server.base_url + "/")
    sign_in(tab_a)
    tab_b = watched(Person("alice", context, context.new_page()))
    tab_b.page.goto(server.base_url + "/")
    expect(tab_b.page.get_by_test_id("app-view")).to_be_visible()
    expect(tab_b.page.get_by_test_id("me-name")).to_have_text("alice")
    return tab_a, tab_b


def start_chat(person: Person, peer: str) -> None:
    person.page.get_by_label("Start a chat with a username").fill(peer)
    person.page.get_by_test_id("new-chat-submit").click()
    expect(person.page.get_by_test_id("conversation-title")).to_have_text(peer)


def wait_for(page: Page, condition: Callable[[], object], what: str) -> None:
    """Polls `condition` while the page runs (route handlers only run inside Playwright's calls)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_MS} ms"
        page.wait_for_timeout(50)


def posts_answered(status: int, code: str, message: str) -> Callable[[Route], None]:
    """A route handler: each POST gets this error answer, as if from the server; other requests go through."""
    body = json.dumps({"error": {"code": code, "message": message}})

    def handle(route: Route) -> None:
        if route.request.method == "POST":
            route.fulfill(status=status, content_type="application/json", body=body)
        else:
            route.continue_()

    return handle


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name)


def test_two_people_chat_live_and_see_every_message_once_in_order(people, server: ServerProcess) -> None:
    Api(server.base_url).signed_up("bob")
    alice = people("alice")
    bob = people("bob", PHONE)
    sign_up(alice)
    sign_in(bob)

    # A username that does not exist is refused with a clear message.
    bob.page.get_by_label("Start a chat with a username").fill("nobody")
    bob.page.get_by_test_id("new-chat-submit").click()
    expect(bob.page.get_by_test_id("new-chat-error")).to_have_text("There is no user called “nobody”.")

    # Bob starts the chat; it shows up in alice's list without a reload.
    start_chat(bob, "alice")
    expect(alice.conversation_with("bob")).to_be_visible()

    bob.send("Hi Alice! Are we still on for Saturday?")
    mine = bob.message("Hi Alice! Are we still on for Saturday?")
    # Alice's page is open, so her event loop acknowledges delivery; she has not read it yet.
    expect(mine).to_have_attribute("data-state", "delivered")
    expect(alice.conversation_with("bob").get_by_test_id("unread-badge")).to_have_text("1")
    expect(alice.conversation_with("bob")).to_contain_text("Are we still on for Saturday?")

    alice.open_conversation("bob")
    expect(mine).to_have_attribute("data-state", "read")
    expect(alice.conversation_with("bob").get_by_test_id("unread-badge")).to_be_hidden()

    alice.send("Yes! 10:00 at the station.")
    multiline = "I'll bring:\n- the map\n- sandwiches"
    composer = alice.page.get_by_test_id("composer")
    composer.fill("I'll bring:")
    for line in ["- the map", "- sandwiches"]:
        composer.press("Shift+Enter")
        composer.press_sequentially(line)
    expect(composer).to_have_value(multiline)
    composer.press("Enter")
    expect(alice.message(multiline)).to_have_attribute("data-seq", "3")
    bob.send("Perfect, see you there")
    alice.send("Don't be late this time :)")

    expected = [
        "Hi Alice! Are we still on for Saturday?",
        "Yes! 10:00 at the station.",
        multiline,
        "Perfect, see you there",
        "Don't be late this time :)",
    ]
    for person in (alice, bob):
        expect(person.page.get_by_test_id("message-text")).to_have_count(len(expected))
        assert person.message_texts() == expected, person.name
    # Newlines are kept on screen.
    assert alice.message(multiline).evaluate("el => getComputedStyle(el.querySelector('p')).whiteSpace") == "pre-wrap"
    # Everyone reads everything at once, so every own message ends up read on both sides.
    for person, count in ((alice, 3), (bob, 2)):
        own_messages = person.page.locator("[data-testid=message].message--mine")
        expect(own_messages).to_have_count(count)
        for item in own_messages.all():
            expect(item).to_have_attribute("data-state", "read")

    # The server agrees: each message once, in this order.
    api_bob = Api(server.base_url, bob.token(), "bob")
    conversation_id = api_bob.get("/api/v1/conversations").json()["conversations"][0]["id"]
    stored = api_bob.messages(conversation_id)["messages"]
    assert [m["text"] for m in stored] == expected
    assert [m["seq"] for m in stored] == [1, 2, 3, 4, 5]

    screenshot(alice.page, "desktop.png")
    screenshot(bob.page, "phone.png")


def test_offline_recipient_gets_everything_when_signing_in(people, server: ServerProcess) -> None:
    Api(server.base_url).signed_up("bob")
    alice = people("alice")
    sign_up(alice)
    start_chat(alice, "bob")
    texts = [f"message {n} while bob is away" for n in range(1, 4)]
    for text in texts:
        alice.send(text)
    # Nobody has fetched them: sent (acknowledged with a seq), not delivered.
    for text in texts:
        expect(alice.message(text)).to_have_attribute("data-state", "sent")
        assert alice.message(text).get_attribute("data-seq")

    bob = people("bob")
    sign_in(bob)
    expect(bob.conversation_with("alice").get_by_test_id("unread-badge")).to_have_text("3")
    expect(bob.conversation_with("alice")).to_contain_text(texts[-1])
    # Bob's page fetched the stream: delivered, but he has not opened the conversation yet.
    for text in texts:
        expect(alice.message(text)).to_have_attribute("data-state", "delivered")

    # By keyboard this time: focus the conversation and press Enter.
    bob.conversation_with("alice").focus()
    bob.page.keyboard.press("Enter")
    expect(bob.page.get_by_test_id("conversation-title")).to_have_text("alice")
    expect(bob.page.get_by_test_id("composer")).to_be_focused()
    expect(bob.page.get_by_test_id("message-text")).to_have_count(3)
    assert bob.message_texts() == texts
    for text in texts:
        expect(alice.message(text)).to_have_attribute("data-state", "read")


def test_server_restart_mid_conversation_loses_and_repeats_nothing(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api.signed_up("bob")
    alice = people("alice")
    bob = people("bob")
    sign_in(alice)
    sign_in(bob)
    start_chat(alice, "bob")
    bob.open_conversation("alice")
    alice.send("before the restart")
    expect(alice.message("before the restart")).to_have_attribute("data-state", "read")

    server.stop()
    status = alice.page.get_by_test_id("connection-status")
    expect(status).to_be_visible()
    expect(status).to_contain_text("Reconnecting")

    # Typed while the server is down: shown at once as pending.
    alice.send("typed while the server was down", acknowledged=False)
    down = alice.message("typed while the server was down")
    expect(down).to_have_attribute("data-state", "pending")
    screenshot(alice.page, "reconnecting.png")

    server.start()
    expect(status).to_be_hidden()
    expect(bob.page.get_by_test_id("connection-status")).to_be_hidden()
    expect(down).to_have_attribute("data-state", "read")
    alice.send("after the restart")
    expected = ["before the restart", "typed while the server was down", "after the restart"]
    for person in (alice, bob):
        expect(person.page.get_by_test_id("message-text")).to_have_count(3)
        assert person.message_texts() == expected, person.name

    # The server stored it exactly once.
    api_alice = Api(server.base_url, alice.token(), "alice")
    conversation_id = api_alice.get("/api/v1/conversations").json()["conversations"][0]["id"]
    assert [m["text"] for m in api_alice.messages(conversation_id)["messages"]] == expected


def test_a_stopping_server_is_not_asked_again_and_again(people, server: ServerProcess) -> None:
    """While it drains (SIGTERM) a server answers waiting long-polls at once, empty, and any
    new one too: the page pauses before asking again instead of spinning on it until it is gone."""
    Api(server.base_url).signed_up("alice")
    alice = people("alice")
    sign_in(alice)
    expect(alice.page.get_by_test_id("connection-status")).to_be_hidden()
    alice.page.wait_for_timeout(1000)  # the page's long-poll is waiting
    stopping = alice.page.evaluate("performance.now()")
    server.stop()
    stopped = alice.page.evaluate("performance.now()")
    polls = alice.page.evaluate(
        """([from, to]) => performance.getEntriesByType("resource")
            .filter((entry) => entry.name.includes("/api/v1/events"))
            .filter((entry) => entry.startTime >= from && entry.startTime <= to).length""",
        [stopping, stopped],
    )
    # The answer the stop gave the waiting poll, then a few paced ones (about 100 before).
    assert polls <= 6, f"{polls} event polls in the {(stopped - stopping) / 1000:.2f} s the server took to stop"


def test_failed_and_lost_sends_are_retried_with_the_same_client_id_and_stored_once(
    people, server: ServerProcess
) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    alice = people("alice")
    sign_in(alice)
    start_chat(alice, "bob")

    # The first attempt meets a 503; the second reaches the server but its answer is lost.
    attempts: list[dict] = []

    def flaky(route: Route) -> None:
        if route.request.method != "POST":
            return route.continue_()
        attempts.append(route.request.post_data_json)
        if len(attempts) == 1:
            return route.fulfill(
                status=503,
                content_type="application/json",
                body='{"error": {"code": "service_unavailable", "message": "try again"}}',
            )
        if len(attempts) == 2:
            route.fetch()
            return route.abort("connectionreset")
        return route.continue_()

    alice.page.route("**/api/v1/conversations/*/messages", flaky)
    alice.send("through thick and thin", acknowledged=False)
    expect(alice.message("through thick and thin")).to_have_attribute("data-state", "sent")
    assert len(attempts) >= 2
    assert len({attempt["client_id"] for attempt in attempts}) == 1
    expect(alice.page.get_by_test_id("message-text")).to_have_count(1)

    conversation_id = api_bob.start("alice")["id"]
    assert [m["text"] for m in api_bob.messages(conversation_id)["messages"]] == ["through thick and thin"]

    # Unsent messages survive a reload of the page, and go out once the server answers again.
    alice.page.unroute("**/api/v1/conversations/*/messages")
    alice.page.route(
        "**/api/v1/conversations/*/messages",
        lambda route: route.abort("connectionrefused") if route.request.method == "POST" else route.continue_(),
    )
    alice.send("survives a reload", acknowledged=False)
    expect(alice.message("survives a reload")).to_have_attribute("data-state", "pending")
    alice.page.reload()
    expect(alice.message("survives a reload")).to_have_attribute("data-state", "pending")
    alice.page.unroute("**/api/v1/conversations/*/messages")
    expect(alice.message("survives a reload")).to_have_attribute("data-state", "sent")
    texts = [m["text"] for m in api_bob.messages(conversation_id)["messages"]]
    assert texts == ["through thick and thin", "survives a reload"]


def test_markup_in_messages_is_shown_as_text_and_never_runs(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    alice_elsewhere = api.signed_up("alice")
    api_bob = api.signed_up("bob")
    alice = people("alice")
    sign_in(alice)
    start_chat(alice, "bob")
    # Its (empty) history is in: what goes in from now on is news, not the page that opened it.
    expect(alice.page.get_by_text("This is the beginning of your conversation.")).to_be_visible()
    record_announcements(alice.page)

    alice.send(MARKUP)
    conversation_id = api_bob.start("alice")["id"]
    api_bob.send(conversation_id, "<script>alert(2)</script><b>bold?</b>")
    # Alice's other device: her own message shows up here too, as hers.
    alice_elsewhere.send(conversation_id, "a" * 300)

    expect(alice.page.get_by_test_id("message-text")).to_have_count(3)
    assert alice.message_texts() == [MARKUP, "<script>alert(2)</script><b>bold?</b>", "a" * 300]
    expect(alice.message("a" * 300)).to_have_class(re.compile(r"\bmessage--mine\b"))
    expect(alice.message("<script>alert(2)</script><b>bold?</b>")).to_have_class(re.compile(r"\bmessage--theirs\b"))
    messages = alice.page.get_by_test_id("message-list")
    assert messages.locator("img, script, b").count() == 0
    # Read out to screen readers as the same text.
    assert announced(alice.page)[:2] == [f"You: {MARKUP}", "bob: <script>alert(2)</script><b>bold?</b>"]
    # A word longer than the bubble wraps instead of widening the page.
    assert alice.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    # Give a planted handler every chance to fire: one more round trip after it was rendered.
    alice.send("still safe")
    expect(alice.message("still safe")).to_have_attribute("data-state", "sent")
    assert alice.dialogs == []

    # The composer shows the limit and counts code points, not UTF-16 units.
    composer = alice.page.get_by_test_id("composer")
    composer.fill("😀" * 10)
    expect(alice.page.get_by_test_id("composer-count")).to_have_text("10 / 4000")
    composer.fill("x" * 4001)
    expect(alice.page.get_by_test_id("composer-count")).to_contain_text("4001 / 4000")
    expect(alice.page.get_by_test_id("send")).to_be_disabled()
    composer.press("Enter")
    composer.fill("")
    expect(alice.page.get_by_test_id("message-text")).to_have_count(4)


def test_sign_out_and_revoked_token_lead_back_to_sign_in(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    alice = people("alice")
    sign_in(alice)

    alice.page.get_by_test_id("sign-out").click()
    expect(alice.page.get_by_test_id("auth-view")).to_be_visible()
    expect(alice.page.get_by_test_id("auth-notice")).to_contain_text("signed out")
    assert alice.token() is None

    # Wrong password: a clear message, still signed out.
    alice.page.get_by_label("Username", exact=True).fill("alice")
    alice.page.get_by_label("Password", exact=True).fill("not the password")
    alice.page.get_by_test_id("auth-submit").click()
    expect(alice.page.get_by_test_id("auth-error")).to_have_text("Wrong username or password.")

    sign_in(alice)
    token = alice.token()
    assert token
    assert Api(server.base_url, token).request("DELETE", "/api/v1/tokens/current").status_code == 204

    # The next answer the page gets is a 401: back to sign-in, with a message. A new
    # conversation wakes her waiting long-poll, so the page asks again at once.
    api.signed_up("carol").start("alice")
    expect(alice.page.get_by_test_id("auth-view")).to_be_visible()
    expect(alice.page.get_by_test_id("auth-notice")).to_contain_text("Please sign in again")
    assert alice.token() is None

    # A reload with a dead token also lands on sign-in.
    alice.page.evaluate(
        "token => localStorage.setItem('chatapi.session', JSON.stringify({token, username: 'alice'}))", token
    )
    alice.page.reload()
    expect(alice.page.get_by_test_id("auth-notice")).to_contain_text("Please sign in again")


def test_older_history_loads_when_scrolling_up(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api_alice = api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_alice.start("bob")["id"]
    total = 130
    for n in range(1, total + 1):
        (api_alice if n % 3 else api_bob).send(conversation_id, f"line {n}")

    bob = people("bob")
    sign_in(bob)
    bob.open_conversation("alice")
    texts = bob.page.get_by_test_id("message-text")
    expect(texts.last).to_have_text(f"line {total}")
    shown = texts.count()
    assert shown < total
    scroller = bob.page.get_by_test_id("message-scroller")
    while shown < total:
        scroller.evaluate("el => { el.scrollTop = 0; }")
        expect(texts).not_to_have_count(shown)
        shown = texts.count()
    expect(bob.page.get_by_text("This is the beginning of your conversation.")).to_be_visible()
    assert bob.message_texts() == [f"line {n}" for n in range(1, total + 1)]

    # Far up in the history, a button leads back to the newest message.
    jump = bob.page.get_by_test_id("jump-to-latest")
    expect(jump).to_be_visible()
    jump.click()
    expect(texts.last).to_be_in_viewport()
    expect(jump).to_be_hidden()


def alice_reads_bob(people, server: ServerProcess, texts: list[str]) -> tuple[Api, Api, int, Person]:
    """Bob has sent alice `texts`; her page shows them. Returns both APIs, the conversation and her page."""
    api = Api(server.base_url)
    api_alice = api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    for text in texts:
        api_bob.send(conversation_id, text)
    alice = people("alice")
    sign_in(alice)
    alice.open_conversation("bob")
    expect(alice.page.get_by_test_id("message-text")).to_have_count(len(texts))
    return api_alice, api_bob, conversation_id, alice


def test_history_stays_in_view_when_a_send_is_answered_before_the_stream_catches_up(
    people, server: ServerProcess
) -> None:
    """The answer to alice's send carries seq N+1 while bob's message N is still on its way
    (a lagging stream: a buffering proxy, a reconnect's backoff, another host)."""
    api_alice, api_bob, conversation_id, alice = alice_reads_bob(
        people, server, ["earlier 1", "earlier 2", "earlier 3"]
    )

    held: list[Route] = []
    holding = [True]
    alice.page.route("**/api/v1/events*", lambda route: held.append(route) if holding[0] else route.continue_())
    Api(server.base_url).signed_up("carol").start("alice")  # answers the poll in flight; the next one is held
    wait_for(alice.page, lambda: held, "the page's long-poll held here")
    api_bob.send(conversation_id, "from bob, still on its way")
    alice.send("my reply")
    assert alice.message_texts() == ["earlier 1", "earlier 2", "earlier 3", "my reply"]

    holding[0] = False
    for route in held:
        route.continue_()
    expect(alice.page.get_by_test_id("message-text")).to_have_count(5)
    assert alice.message_texts() == ["earlier 1", "earlier 2", "earlier 3", "from bob, still on its way", "my reply"]
    assert [m["text"] for m in api_alice.messages(conversation_id)["messages"]] == alice.message_texts()


def test_two_tabs_share_their_unsent_messages_and_closing_one_loses_nothing(
    browser: Browser, server: ServerProcess
) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    context = one_profile(browser)
    try:
        down = "**/api/v1/conversations/*/messages"
        context.route(
            down,
            lambda route: route.abort("connectionrefused") if route.request.method == "POST" else route.continue_(),
        )
        tab_a, tab_b = alice_in_two_tabs(context, server)
        tab_a.open_conversation("bob")
        tab_b.open_conversation("bob")

        tab_a.send("typed in tab A", acknowledged=False)
        tab_b.send("typed in tab B", acknowledged=False)
        # Each tab takes up the other's, and the shared storage keeps both.
        for tab in (tab_a, tab_b):
            expect(tab.message("typed in tab A")).to_have_attribute("data-state", "pending")
            expect(tab.message("typed in tab B")).to_have_attribute("data-state", "pending")
        stored = tab_b.page.evaluate("() => JSON.parse(localStorage.getItem('chatapi.outbox.alice')).map(i => i.text)")
        assert stored == ["typed in tab A", "typed in tab B"]

        assert_quiet(tab_a)
        tab_a.page.close()
        context.unroute(down)
        tab_b.page.reload()
        expect(tab_b.message("typed in tab A")).to_have_attribute("data-seq", re.compile(r"^[0-9]+$"))
        expect(tab_b.message("typed in tab B")).to_have_attribute("data-seq", re.compile(r"^[0-9]+$"))
        texts = [m["text"] for m in api_bob.messages(conversation_id)["messages"]]
        assert texts == ["typed in tab A", "typed in tab B"]  # each once, in the order typed
        assert_quiet(tab_b)
    finally:
        context.close()


def test_a_restored_server_is_shown_as_it_now_is(people, server: ServerProcess, tmp_path: Path) -> None:
    """The server's data was replaced (a backup restored): the page starts over, and shows
    neither the lost messages nor marks above the server's."""
    _, api_bob, conversation_id, alice = alice_reads_bob(people, server, ["kept 1", "kept 2", "kept 3"])
    database = Path(server.database_url.removeprefix("sqlite:///"))
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(database) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)  # alice's token is in it: she stays signed in
    for n in range(1, 4):
        api_bob.send(conversation_id, f"lost {n}")
    expect(alice.page.get_by_test_id("message-text")).to_have_count(6)

    server.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, database)
    server.start()
    expect(alice.page.get_by_test_id("connection-status")).to_be_hidden()
    expect(alice.page.get_by_test_id("message-text")).to_have_count(3)
    api_bob.send(conversation_id, "after the restore")
    expect(alice.page.get_by_test_id("message-text")).to_have_count(4)
    assert alice.message_texts() == ["kept 1", "kept 2", "kept 3", "after the restore"]
    # Read on the restored server too (alice's read mark there was below the new message).
    read = lambda: api_bob.get(f"/api/v1/conversations/{conversation_id}").json()["peer_read_seq"] == 4  # noqa: E731
    wait_for(alice.page, read, "alice's read mark at the new message")


def test_a_send_that_keeps_failing_says_so_and_a_passing_error_leaves_no_false_alarm(
    people, server: ServerProcess
) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api.signed_up("bob")
    alice = people("alice")
    sign_in(alice)
    start_chat(alice, "bob")
    sends = "**/api/v1/conversations/*/messages"
    alice.page.route(sends, posts_answered(503, "service_unavailable", "the database is unavailable"))
    alice.send("patience", acknowledged=False)
    note = alice.message("patience").get_by_test_id("message-retrying")
    expect(note).to_contain_text("the database is unavailable")
    expect(note).to_contain_text("trying again")
    alice.page.unroute(sends)
    expect(alice.message("patience")).to_have_attribute("data-state", "sent")
    expect(note).to_have_count(0)

    # One failed read while opening a conversation: retried, and no "Reconnecting…" left behind.
    first = {"failed": False}

    def fail_once(route: Route) -> None:
        if route.request.method == "GET" and not first["failed"]:
            first["failed"] = True
            return route.abort("connectionreset")
        route.continue_()

    api.signed_up("carol").start("alice")
    alice.page.route("**/api/v1/conversations/*/messages*", fail_once)
    alice.open_conversation("carol")
    expect(alice.page.get_by_test_id("connection-status")).to_be_hidden(timeout=5_000)
    assert first["failed"]


def test_keyboard_focus_stays_in_the_history_after_loading_it(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    for n in range(1, 61):  # a page and a bit
        api_bob.send(conversation_id, f"line {n}")
    alice = people("alice")
    sign_in(alice)
    alice.open_conversation("bob")
    load = alice.page.get_by_test_id("load-older")
    expect(load).to_be_visible()
    load.focus()
    alice.page.keyboard.press("Enter")
    expect(alice.page.get_by_test_id("message-text")).to_have_count(60)
    expect(load).to_be_hidden()
    expect(alice.page.locator("#history-start")).to_be_focused()
    # Each message says who wrote it to a screen reader.
    first = alice.message("line 1")
    assert first.locator(".visually-hidden").inner_text() == "bob:"


def test_pressing_sign_in_again_while_the_page_starts_runs_one_session(people, server: ServerProcess) -> None:
    """Between the sign-in's answer and the page's start (GET /me, slow on a slow network), the
    form must not take a second sign-in: the session started first would stay running in the page
    after signing out (its token never revoked, its view still listening), and what the next user
    then typed went out as the first user."""
    api = Api(server.base_url)
    api.signed_up("alice")
    api.signed_up("bob")
    tab = people("alice")
    held: list[Route] = []
    holding = [True]
    tab.page.route("**/api/v1/me", lambda route: held.append(route) if holding[0] else route.continue_())
    page = tab.page
    page.get_by_label("Username", exact=True).fill("alice")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_test_id("auth-submit").click()
    wait_for(page, lambda: held, "the page's GET /me held here")
    # An impatient user presses Enter again while nothing seems to happen.
    page.get_by_label("Password", exact=True).press("Enter")
    page.wait_for_timeout(1500)
    holding[0] = False
    for route in held:
        route.continue_()
    expect(page.get_by_test_id("me-name")).to_have_text("alice")

    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("auth-notice")).to_contain_text("signed out")
    page.get_by_label("Username", exact=True).fill("bob")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_test_id("auth-submit").click()
    expect(page.get_by_test_id("me-name")).to_have_text("bob")
    start_chat(tab, "alice")
    tab.send("from bob, once")
    page.wait_for_timeout(1000)
    expect(page.get_by_test_id("app-view")).to_be_visible()
    expect(page.get_by_test_id("me-name")).to_have_text("bob")
    stored = Api(server.base_url, tab.token(), "bob").get("/api/v1/conversations").json()["conversations"]
    assert [(c["last_message"]["sender"], c["last_message"]["text"]) for c in stored] == [("bob", "from bob, once")]


def test_a_stale_tab_ending_its_session_keeps_the_session_signed_in_since(
    browser: Browser, server: ServerProcess
) -> None:
    """Tab A signs out and signs in as bob; tab B, still on alice's revoked token, meets a 401. It
    goes back to sign-in, and leaves bob's session (shared storage) alone: a reload keeps bob in."""
    api = Api(server.base_url)
    api.signed_up("alice")
    api.signed_up("bob")
    context = one_profile(browser)
    try:
        tab_a, tab_b = alice_in_two_tabs(context, server)
        # Tab B's next poll is held on its way (a network gap, a sleeping laptop) past what follows.
        held: list[Route] = []
        holding = [True]
        tab_b.page.route("**/api/v1/events*", lambda route: held.append(route) if holding[0] else route.continue_())
        api.signed_up("carol").start("alice")  # answers tab B's waiting poll; the next one is held
        wait_for(tab_b.page, lambda: held, "tab B's next poll held here")

        tab_a.page.get_by_test_id("sign-out").click()
        expect(tab_a.page.get_by_test_id("auth-view")).to_be_visible()
        tab_a.name = "bob"
        sign_in(tab_a)
        bob_token = tab_a.token()
        assert bob_token

        holding[0] = False
        for route in held:
            route.continue_()  # with alice's revoked token: 401
        expect(tab_b.page.get_by_test_id("auth-notice")).to_contain_text("Please sign in again")
        assert tab_a.token() == bob_token
        tab_a.page.reload()
        expect(tab_a.page.get_by_test_id("me-name")).to_have_text("bob")
        assert_quiet(tab_a)
        assert_quiet(tab_b)
    finally:
        context.close()


def record_announcements(page: Page) -> None:
    """From now on, `announced(page)` lists every line the page puts in its live region (where each
    stays only a few seconds)."""
    page.evaluate(
        """() => {
            window.announced = [];
            new MutationObserver((records) => {
                for (const record of records)
                    for (const node of record.addedNodes) window.announced.push(node.textContent);
            }).observe(document.getElementById("announcements"), { childList: true });
        }"""
    )


def announced(page: Page) -> list[str]:
    return page.evaluate("window.announced")


def test_the_first_message_of_an_empty_conversation_is_announced(people, server: ServerProcess) -> None:
    """A whole page going in at once (opening, older history) is not read out: the first message to
    arrive in an open, empty conversation is news like any other."""
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    alice = people("alice")
    sign_in(alice)
    alice.open_conversation("bob")
    expect(alice.page.get_by_text("This is the beginning of your conversation.")).to_be_visible()  # its page is in
    record_announcements(alice.page)
    api_bob.send(conversation_id, "hello, anyone there?")
    expect(alice.message("hello, anyone there?")).to_be_visible()
    alice.send("yes, here")
    assert announced(alice.page) == ["bob: hello, anyone there?", "You: yes, here"]


def test_a_refused_message_retried_in_one_tab_is_settled_in_the_other_and_stored_once(
    browser: Browser, server: ServerProcess
) -> None:
    """Refused for good in both tabs of one user ("Not sent", Retry and Delete), then retried in tab A:
    tab B shows it once, as sent, and a Retry there could not store it a second time either."""
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    context = one_profile(browser)
    sends = "**/api/v1/conversations/*/messages"
    context.route(sends, posts_answered(404, "conversation_not_found", "no such conversation"))
    try:
        tab_a, tab_b = alice_in_two_tabs(context, server)
        tab_a.open_conversation("bob")
        tab_b.open_conversation("bob")
        tab_a.send("refused once", acknowledged=False)
        for tab in (tab_a, tab_b):
            expect(tab.message("refused once")).to_have_attribute("data-state", "failed")

        context.unroute(sends)
        tab_a.message("refused once").get_by_role("button", name="Retry").click()
        for tab in (tab_a, tab_b):
            expect(tab.message("refused once")).to_have_attribute("data-state", re.compile("^(sent|delivered|read)$"))
            expect(tab.message("refused once")).to_have_count(1)
        tab_b.page.wait_for_timeout(1000)
        assert tab_b.message_texts() == ["refused once"]
        assert [m["text"] for m in api_bob.messages(conversation_id)["messages"]] == ["refused once"]
        assert_quiet(tab_a)
        assert_quiet(tab_b)
    finally:
        context.close()


# Accessibility: what a screen reader and a keyboard meet. ------------------------------------

# A control in the accessibility tree without a name: `- button` rather than `- button "Send"`.
UNNAMED_CONTROL = re.compile(r'^\s*- (button|link|textbox|tab|checkbox|combobox)(?! ")\b.*$', re.MULTILINE)


def unnamed_controls(page: Page) -> list[str]:
    return [match.group(0).strip() for match in UNNAMED_CONTROL.finditer(page.locator("body").aria_snapshot())]


def test_each_screen_has_a_heading_and_each_field_says_its_hint_error_and_notice(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api.signed_up("bob")
    alice = people("alice")
    page = alice.page
    expect(page.get_by_role("heading", level=1)).to_have_text("chatapi")
    username = page.get_by_label("Username", exact=True)
    password = page.get_by_label("Password", exact=True)
    expect(username).to_have_accessible_description("")
    page.get_by_role("tab", name="Create account").click()
    expect(username).to_have_accessible_description("3–32 characters: a–z, 0–9, _ . -")
    expect(password).to_have_accessible_description("At least 8 characters.")
    assert unnamed_controls(page) == []
    page.get_by_role("tab", name="Sign in").click()
    expect(password).to_have_accessible_description("")
    username.fill("alice")
    password.fill("not the password")
    password.press("Enter")
    expect(password).to_have_accessible_description("Wrong username or password.")
    expect(password).to_be_focused()

    sign_in(alice)
    sidebar = page.get_by_role("complementary", name="Conversations")
    expect(sidebar.get_by_role("heading", level=1)).to_have_text("chatapi")
    expect(sidebar).to_contain_text("Signed in as")
    start_chat(alice, "bob")
    expect(page.get_by_role("main").get_by_role("heading", level=2)).to_have_text("bob")
    assert unnamed_controls(page) == []

    # Thrown out (signed out elsewhere): the focus is in the username field, which says why.
    Api(server.base_url, alice.token()).request("DELETE", "/api/v1/tokens/current")
    api.signed_up("carol").start("alice")
    expect(username).to_be_focused()
    expect(username).to_have_accessible_description(re.compile("^Your session has ended .* Please sign in again.$"))


FOCUS = """() => {
    const focused = document.activeElement;
    const style = getComputedStyle(focused);
    const ring = style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2;
    return { body: focused === document.body, ring, html: focused.outerHTML.slice(0, 120) };
}"""


def tab_to(page: Page, target, *, backwards: bool = False, most: int = 25) -> None:
    """Presses Tab (Shift+Tab) until `target` has the focus; each control on the way shows a focus ring."""
    for _ in range(most):
        page.keyboard.press("Shift+Tab" if backwards else "Tab")
        focus = page.evaluate(FOCUS)
        assert not focus["body"], f"{target} not reached by Tab"
        assert focus["ring"], f"no focus ring on {focus['html']}"
        if target.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"{target} not reached in {most} presses of Tab")


def test_keyboard_only_sign_up_chat_switch_and_sign_out(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("bob")
    alice = people("alice")
    page = alice.page
    keyboard = page.keyboard
    username = page.get_by_label("Username", exact=True)
    expect(username).to_be_focused()
    assert page.evaluate(FOCUS)["ring"]
    create = page.get_by_role("tab", name="Create account")
    tab_to(page, page.get_by_role("tab", name="Sign in"), backwards=True)
    keyboard.press("ArrowRight")
    expect(create).to_be_focused()
    expect(create).to_have_attribute("aria-selected", "true")
    tab_to(page, username)
    keyboard.type("alice")
    keyboard.press("Tab")
    assert page.evaluate(FOCUS)["ring"]
    keyboard.type(PASSWORD)
    keyboard.press("Enter")
    expect(page.get_by_test_id("me-name")).to_have_text("alice")

    # Signed in: the focus is in the field that starts a chat.
    peer = page.get_by_role("textbox", name="Start a chat with a username")
    expect(peer).to_be_focused()
    keyboard.type("nobody")
    tab_to(page, page.get_by_role("button", name="Start"))
    keyboard.press("Enter")
    expect(peer).to_be_focused()
    expect(peer).to_have_accessible_description("There is no user called “nobody”.")
    keyboard.press("ControlOrMeta+A")
    keyboard.type("bob")
    keyboard.press("Enter")
    expect(page.get_by_test_id("conversation-title")).to_have_text("bob")
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_be_focused()
    keyboard.type("sent with Enter")
    keyboard.press("Enter")
    expect(alice.message("sent with Enter")).to_have_attribute("data-seq", "1")
    expect(composer).to_be_focused()
    expect(composer).to_have_value("")

    # Another conversation comes in, above bob's. Shift+Tab reaches the list at the open conversation,
    # the arrow keys move to it, Enter opens it, and the focus is in its composer.
    carol = api.signed_up("carol")
    carol.send(carol.start("alice")["id"], "hello from carol")
    expect(alice.conversation_with("carol")).to_be_visible()
    tab_to(page, alice.conversation_with("bob"), backwards=True)
    keyboard.press("ArrowUp")
    expect(alice.conversation_with("carol")).to_be_focused()
    keyboard.press("Enter")
    expect(page.get_by_test_id("conversation-title")).to_have_text("carol")
    expect(composer).to_be_focused()
    expect(alice.message("hello from carol")).to_be_visible()

    tab_to(page, page.get_by_role("button", name="Sign out"), backwards=True)
    keyboard.press("Enter")
    expect(page.get_by_test_id("auth-notice")).to_contain_text("signed out")
    expect(username).to_be_focused()

    # On a phone the focus goes to the screen's heading, not into a field (and the on-screen keyboard).
    bob = people("bob", PHONE)
    sign_in(bob)
    expect(bob.page.get_by_role("heading", name="chatapi")).to_be_focused()


def test_the_conversation_list_is_one_tab_stop_moved_through_with_the_arrow_keys(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    alice = people("alice")
    sign_up(alice)
    peers = ["bob", "carol", "dave", "erin"]
    chats = {}
    for peer in peers:
        someone = api.signed_up(peer)
        chats[peer] = (someone, someone.start("alice")["id"])
        someone.send(chats[peer][1], f"hello from {peer}")
    newest_first = peers[::-1]
    for peer in peers:
        expect(alice.conversation_with(peer)).to_be_visible()
    page, keyboard = alice.page, alice.page.keyboard
    start = page.get_by_role("button", name="Start")
    tab_to(page, start)
    # One Tab stop: the first conversation, and the next Tab leaves the list.
    tab_to(page, alice.conversation_with(newest_first[0]))
    keyboard.press("Tab")
    assert page.evaluate("() => !document.activeElement.closest('#conversation-list')")
    keyboard.press("Shift+Tab")
    expect(alice.conversation_with(newest_first[0])).to_be_focused()
    for key, at in [("ArrowDown", 1), ("ArrowDown", 2), ("ArrowUp", 1), ("End", 3), ("ArrowDown", 3), ("Home", 0)]:
        keyboard.press(key)
        expect(alice.conversation_with(newest_first[at])).to_be_focused()
    keyboard.press("ArrowUp")
    expect(alice.conversation_with(newest_first[0])).to_be_focused()

    # The stop stays where the focus left the list: Shift+Tab from after the list comes back to it.
    keyboard.press("ArrowDown")
    keyboard.press("ArrowDown")
    tab_to(page, start, backwards=True)
    keyboard.press("Tab")
    expect(alice.conversation_with(newest_first[2])).to_be_focused()
    stops = page.evaluate("() => [...document.querySelectorAll('.conversation-item')].map((a) => a.tabIndex)")
    assert sorted(stops) == [-1, -1, -1, 0]

    # A new message moves the focused conversation to the top: it keeps the focus.
    moving = newest_first[2]
    someone, conversation_id = chats[moving]
    someone.send(conversation_id, "me again")
    expect(page.locator("[data-testid=conversation-item]").first).to_have_attribute("data-peer", moving)
    expect(alice.conversation_with(moving)).to_be_focused()
    keyboard.press("Enter")
    expect(page.get_by_test_id("conversation-title")).to_have_text(moving)


def test_new_messages_notes_and_the_connection_are_announced_and_the_history_is_not(
    people, server: ServerProcess
) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    api_carol = api.signed_up("carol")
    with_bob = api_bob.start("alice")["id"]
    with_carol = api_carol.start("alice")["id"]
    for n in range(1, 61):  # a page and a bit
        api_bob.send(with_bob, f"line {n}")
    alice = people("alice")
    page = alice.page
    sign_in(alice)
    record_announcements(page)

    # The messages are a list (in a region named after the peer); opening it and loading its
    # history reads none of it out.
    alice.open_conversation("bob")
    history = page.get_by_role("region", name="Messages with bob").get_by_role("list")
    expect(history.get_by_role("listitem").filter(has_text="line 60")).to_be_visible()
    page.get_by_role("button", name="Load earlier messages").click()
    expect(page.get_by_test_id("message-text")).to_have_count(60)
    assert announced(page) == []

    # What comes in is read out, once, with who wrote it; the ticks say in words where a message is.
    api_bob.send(with_bob, "are you there?")
    wait_for(page, lambda: announced(page) == ["bob: are you there?"], "bob's message announced")
    alice.send("yes")
    expect(alice.message("yes").get_by_role("img", name="Sent")).to_be_visible()
    api_bob.post(f"/api/v1/conversations/{with_bob}/read", {"seq": 62})
    expect(alice.message("yes").get_by_role("img", name="Read")).to_be_visible()

    # A message in another conversation, then the connection lost and found.
    page.route("**/api/v1/events*", lambda route: route.abort("connectionrefused"))
    api_carol.send(with_carol, "psst")  # answers the poll in flight; the next one fails
    wait_for(page, lambda: "Reconnecting…" in announced(page), "the lost connection announced")
    page.unroute("**/api/v1/events*")
    wait_for(page, lambda: "Connected again." in announced(page), "the connection back announced")

    # The composer says how to send and how much there is room for; too long, Enter says why it does nothing.
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_have_accessible_description("Enter to send, Shift+Enter for a new line 0 / 4000")
    composer.fill("x" * 4001)
    composer.press("Enter")
    expect(composer).to_have_value("x" * 4001)
    composer.fill("")

    # A message the server refuses for good.
    page.route(
        "**/api/v1/conversations/*/messages", posts_answered(404, "conversation_not_found", "no such conversation")
    )
    alice.send("refused", acknowledged=False)
    expect(alice.message("refused")).to_have_attribute("data-state", "failed")
    assert announced(page) == [
        "bob: are you there?",
        "You: yes",
        "New message from carol",
        "Reconnecting…",
        "Connected again.",
        "Too long to send: 4001 / 4000: 1 too many",
        "You: refused",
        "Not sent: no such conversation",
    ]


# Each shown text's colour against what is behind it (backgrounds and opacity composed up the tree),
# as WCAG computes contrast: 4.5:1, or 3:1 for large text. Left out: text that is not shown (hidden,
# visually hidden for screen readers), disabled controls, and the avatars' initials, which are
# decoration (aria-hidden, beside the name they repeat).
LOW_CONTRAST = """() => {
    const parse = (colour) => {
        const [r, g, b, a = 1] = colour.match(/[0-9.]+/g).map(Number);
        return [r, g, b, a];
    };
    const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat(1);
    const mix = (colour, under, alpha) => over([...colour.slice(0, 3), alpha], under);
    const luminance = (colour) => {
        const [r, g, b] = colour.slice(0, 3).map((v) => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    const ratio = (a, b) => {
        const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
        return (light + 0.05) / (dark + 0.05);
    };
    // The text colour and the background behind it, as they reach the screen.
    const seen = (element, colour) => {
        const chain = [];
        for (let node = element; node; node = node.parentElement) chain.unshift(node);
        let background = [255, 255, 255, 1];
        let behindGroup = null;
        let opacity = 1;
        for (const node of chain) {
            const style = getComputedStyle(node);
            if (Number(style.opacity) < 1) {
                behindGroup ??= background;
                opacity *= Number(style.opacity);
            }
            background = over(parse(style.backgroundColor), background);
        }
        let text = over(parse(colour), background);
        if (behindGroup) {
            text = mix(text, behindGroup, opacity);
            background = mix(background, behindGroup, opacity);
        }
        return [text, background];
    };
    const failures = [];
    const check = (element, colour, what) => {
        const style = getComputedStyle(element);
        const size = parseFloat(style.fontSize);
        const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
        const [text, background] = seen(element, colour);
        const contrast = ratio(text, background);
        if (contrast < (large ? 3 : 4.5)) {
            const rgb = (c) => `rgb(${c.slice(0, 3).map(Math.round).join(", ")})`;
            const where = `${what} (${element.className})`;
            failures.push(`${contrast.toFixed(2)}:1 ${where}: ${rgb(text)} on ${rgb(background)}`);
        }
    };
    for (const element of document.body.querySelectorAll("*")) {
        if (!element.checkVisibility() || element.closest(".visually-hidden, [aria-hidden=true], :disabled")) continue;
        const own = [...element.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE && n.data.trim());
        const text = own.length ? JSON.stringify(own[0].data.trim().slice(0, 30)) : null;
        if (text) check(element, getComputedStyle(element).color, text);
        if (element.placeholder && !element.value) {
            check(element, getComputedStyle(element, "::placeholder").color, `placeholder "${element.placeholder}"`);
        }
    }
    return failures;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_text_shown_has_enough_contrast(people, server: ServerProcess, scheme: str) -> None:
    api = Api(server.base_url)
    api_bob = api.signed_up("bob")
    alice = people("alice")
    page = alice.page
    page.emulate_media(color_scheme=scheme)
    low: list[str] = []

    # Signed out: creating an account (its hints), with an error.
    page.get_by_role("tab", name="Create account").click()
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_test_id("auth-error")).to_be_visible()
    low += page.evaluate(LOW_CONTRAST)

    # Signed in, nothing yet; then a conversation of each kind: read, unread, empty.
    sign_up(alice)
    expect(page.get_by_text("No conversations yet.", exact=False)).to_be_visible()
    low += page.evaluate(LOW_CONTRAST)
    with_bob = api_bob.start("alice")["id"]
    api_bob.send(with_bob, "hi alice")
    api_carol = api.signed_up("carol")
    api_carol.send(api_carol.start("alice")["id"], "unread, from carol")
    api.signed_up("dave").start("alice")
    alice.open_conversation("bob")
    alice.send("hi bob")
    expect(alice.conversation_with("carol").get_by_test_id("unread-badge")).to_have_text("1")
    low += page.evaluate(LOW_CONTRAST)

    # My messages in each state: refused for good, waiting for the server, sent.
    sends = "**/api/v1/conversations/*/messages"
    page.route(sends, posts_answered(404, "conversation_not_found", "no such conversation"))
    alice.send("refused", acknowledged=False)
    expect(alice.message("refused")).to_have_attribute("data-state", "failed")
    page.unroute(sends)
    page.route(sends, posts_answered(503, "service_unavailable", "try again"))
    alice.send("waiting", acknowledged=False)
    expect(alice.message("waiting").get_by_test_id("message-retrying")).to_be_visible()
    page.get_by_test_id("composer").fill("x" * 3900)  # the counter warns
    page.route("**/api/v1/events*", lambda route: route.abort("connectionrefused"))
    api_bob.send(with_bob, "the last word")  # answers the poll in flight; the next one fails
    expect(page.get_by_test_id("connection-status")).to_contain_text("Reconnecting")
    low += page.evaluate(LOW_CONTRAST)

    assert low == [], "\n".join(low)
    page.unroute(sends)  # the outbox empties, and no dialog asks about unsent messages


def test_jumping_to_the_latest_message_does_not_glide_when_motion_is_reduced(people, server: ServerProcess) -> None:
    api = Api(server.base_url)
    api.signed_up("alice")
    api_bob = api.signed_up("bob")
    conversation_id = api_bob.start("alice")["id"]
    for n in range(1, 61):
        api_bob.send(conversation_id, f"line {n}")
    alice = people("alice")
    page = alice.page
    page.emulate_media(reduced_motion="reduce")
    sign_in(alice)
    alice.open_conversation("bob")
    expect(page.get_by_test_id("message-text")).to_have_count(50)
    scroller = page.get_by_test_id("message-scroller")
    scroller.evaluate("el => { el.scrollTop = 0; }")  # the rest of the history comes in above
    expect(page.get_by_text("This is the beginning of your conversation.")).to_be_visible()
    jump = page.get_by_role("button", name="Jump to the latest message")
    expect(jump).to_be_visible()
    left = jump.evaluate(
        """button => {
            button.click();
            const scroller = document.getElementById("messages");
            return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
        }"""
    )
    assert left < 1, f"{left} px still to scroll right after the click: it glides"

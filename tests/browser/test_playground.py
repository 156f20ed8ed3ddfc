"""The playground at / in a real browser: chat over the Responses API with streaming, each turn
continuing the last by previous_response_id; reload and a shared link resume from the server;
regenerate and edit branch, stop cancels; a long document with its progress bar, the memory panel,
a phone-sized screen, the keyboard alone, and no console errors anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import SENTENCES, Server

KEY = "browser-key"  # the server's key (conftest.playground_server)

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 60_000

# records the growing text of the reply being streamed, and the document's progress values
WATCH = """() => {
  window.lengths = []; window.progress = [];
  new MutationObserver(() => {
    const text = document.querySelector('#messages .message.assistant.streaming .text');
    if (text) window.lengths.push(text.textContent.length);
    window.progress.push(document.getElementById('doc-progress').value);
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


class Playground:
    """One browser page on the playground, with the console watched for errors."""

    def __init__(self, page: Any, server: Server, shots: Path) -> None:
        self.page, self.server, self.shots = page, server, shots
        self.errors: list[str] = []
        self.marked: int | None = None  # requests the page had finished before the one awaited
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_default_timeout(TIMEOUT_MS)

    def open(self, key: bool = True, path: str = "/") -> Playground:
        self.page.goto(self.server.url + path)
        # the page's own start-up connect() sets the hint first; a key entered before it runs makes two
        # connects race, and the later one folds away a panel the test has opened since (seen on a loaded CI)
        self.page.wait_for_function("() => document.getElementById('key-hint').textContent !== ''", polling=100)
        if key:
            self.page.fill("#api-key", KEY)
            self.page.press("#api-key", "Enter")
            self.wait_connected()
        self.page.evaluate(WATCH)
        return self

    # Every wait_for_function polls each 100 ms: its default, requestAnimationFrame, stalls while the
    # headless page is not the one in front (seen in CI: a list already right, never noticed).
    def wait_connected(self) -> None:
        self.page.wait_for_function("() => document.getElementById('model-name').textContent !== ''", polling=100)

    def settings(self, temperature: str = "0", max_tokens: str = "48") -> None:
        self.page.fill("#temperature", temperature)  # greedy: the tiny model never stops early
        self.page.fill("#max-tokens", max_tokens)

    def new_conversation(self) -> None:
        self.page.click("#new-session")
        self.page.locator("#session-id").filter(has_text="new").wait_for()
        assert self.texts() == []

    @property
    def head(self) -> str:
        """The conversation's newest response (what the next turn continues)."""
        return str(self.page.inner_text("#session-id"))

    def mark(self) -> None:
        """Before an action that makes a request: wait_idle then waits for that request to finish."""
        self.marked = int(self.page.evaluate("Number(document.body.dataset.done || 0)"))

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.mark()
        self.page.press("#prompt", "Enter")

    def wait_idle(self, messages: int) -> None:
        """The request is over and the page shows the server's transcript of `messages` messages."""
        if self.marked is not None:
            self.page.wait_for_function(f"() => Number(document.body.dataset.done || 0) > {self.marked}", polling=100)
            self.marked = None
        self.page.locator("#send:enabled").wait_for()
        self.page.wait_for_function(f"() => document.querySelectorAll('#messages .message').length === {messages}",
                                    polling=100)

    def texts(self) -> list[tuple[str, str]]:
        rows = self.page.eval_on_selector_all(
            "#messages .message", "items => items.map(i => [i.classList.contains('user') ? 'user' : 'assistant', "
                                  "i.querySelector('.text').textContent])")
        return [(role, text) for role, text in rows]

    def transcript(self) -> list[tuple[str, str]]:
        """The conversation as the server stores it: back from the head along previous_response_id."""
        return transcript(self.server, self.head)

    def screenshot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / name), full_page=False)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors


def transcript(server: Server, head: str) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    with server.client(KEY) as client:
        response_id: str | None = head
        while response_id:
            response = client.get(f"/v1/responses/{response_id}")
            assert response.status_code == 200, response.text
            items = client.get(f"/v1/responses/{response_id}/input_items", params={"order": "desc"}).json()["data"]
            body = response.json()
            reply = "".join(p["text"] for item in body["output"] for p in item["content"])
            asked = "\n\n".join("".join(p["text"] for p in item["content"]) for item in items[::-1])
            turns[:0] = [("user", asked), ("assistant", reply)]
            response_id = body["previous_response_id"]
    return turns


def requested(request: Any) -> dict[str, Any]:
    """The JSON body the page sent."""
    body = request.post_data_json
    assert isinstance(body, dict)
    return body


@pytest.fixture
def playground(browser: Any, playground_server: Server, screenshot_dir: Path) -> Iterator[Any]:
    """A factory: a fresh browser context (no stored key or session) per page."""
    contexts = []

    def make(viewport: dict[str, int] = DESKTOP) -> Playground:
        context = browser.new_context(viewport=viewport, device_scale_factor=1)
        contexts.append(context)
        return Playground(context.new_page(), playground_server, screenshot_dir)

    yield make
    for context in contexts:
        context.close()


def test_a_reply_streams_in_and_a_reload_or_a_link_resumes_it_from_the_server(playground: Any) -> None:
    pg = playground().open()
    pg.settings(max_tokens="120")
    pg.new_conversation()
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as first:
        pg.send("hello world, this is the first message.")
    body = requested(first.value)
    assert body["input"] == "hello world, this is the first message." and body["stream"] is True
    assert body["max_output_tokens"] == 120 and "previous_response_id" not in body  # a new conversation
    pg.wait_idle(2)
    lengths = pg.page.evaluate("window.lengths")
    assert len(set(lengths)) >= 3, lengths  # the text grew in several steps: streamed, not in one piece
    assert lengths == sorted(lengths)
    shown = pg.texts()
    assert shown[0] == ("user", "hello world, this is the first message.") and shown[1][1]
    assert pg.transcript() == shown
    one = pg.head
    assert one.startswith("resp_") and pg.page.evaluate("location.hash") == f"#response={one}"
    assert "new tokens" in pg.page.inner_text("#status")  # what the turn read, its latency
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as second:
        pg.send("and a second one.")
    assert requested(second.value)["previous_response_id"] == one  # only the new message is sent
    assert requested(second.value)["input"] == "and a second one."
    pg.wait_idle(4)
    shown = pg.texts()
    two = pg.head
    assert two != one and pg.transcript() == shown
    with pg.server.client(KEY) as client:
        usage = client.get(f"/v1/responses/{two}").json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0  # the first turn was in the memory, not read again
    pg.page.reload()  # the page remembers the conversation; its turns come from the server
    pg.page.locator("#session-id").filter(has_text=two).wait_for()
    pg.wait_idle(4)
    assert pg.texts() == shown == pg.transcript()
    pg.screenshot("playground-chat.png")
    pg.assert_clean()
    # a link with the response id, in another browser (no stored key or conversation)
    other = playground().open(path=f"/#response={two}")
    other.page.locator("#session-id").filter(has_text=two).wait_for()
    other.wait_idle(4)
    assert other.texts() == shown
    other.assert_clean()


def test_regenerate_and_edit_branch_from_the_previous_response(playground: Any) -> None:
    pg = playground().open()
    pg.settings(temperature="1", max_tokens="16")
    pg.new_conversation()
    pg.send("the quick brown fox")
    pg.wait_idle(2)
    one = pg.head
    pg.send("jumps over the lazy dog")
    pg.wait_idle(4)
    two = pg.head
    before = pg.texts()
    pg.mark()
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as regenerated:
        pg.page.click("#messages .message.assistant >> nth=-1 >> button.regenerate")
    assert requested(regenerated.value)["previous_response_id"] == one  # the same question, from the same state
    assert requested(regenerated.value)["input"] == "jumps over the lazy dog"
    pg.wait_idle(4)
    after = pg.texts()
    assert pg.head not in (one, two) and after[:3] == before[:3] and after == pg.transcript()
    assert transcript(pg.server, two) == before  # the other branch is still there
    # edit the first message: a new conversation (there is no response before it)
    pg.page.click("#messages .message.user >> nth=0 >> button.edit")
    pg.page.fill("#messages .message.user >> nth=0 >> textarea", "hierarchical memory")
    pg.mark()
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as edited:
        pg.page.press("#messages .message.user >> nth=0 >> textarea", "Enter")
    assert "previous_response_id" not in requested(edited.value)
    pg.wait_idle(2)
    assert pg.texts()[0] == ("user", "hierarchical memory") and pg.texts() == pg.transcript()
    # edit the second message of the first branch: it continues the first response
    pg.page.fill("#resume-id", two)
    pg.page.press("#resume-id", "Enter")
    pg.page.locator("#session-id").filter(has_text=two).wait_for()
    pg.wait_idle(4)
    pg.page.click("#messages .message.user >> nth=1 >> button.edit")
    pg.page.fill("#messages .message.user >> nth=1 >> textarea", "sleeps all day")
    pg.mark()
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as edited:
        pg.page.press("#messages .message.user >> nth=1 >> textarea", "Enter")
    assert requested(edited.value)["previous_response_id"] == one
    pg.wait_idle(4)
    assert pg.texts()[:2] == before[:2] and pg.texts()[2] == ("user", "sleeps all day")
    pg.assert_clean()


def test_stop_cancels_a_reply_and_keeps_what_was_said(playground: Any) -> None:
    pg = playground().open()
    pg.settings(max_tokens="4000")
    pg.new_conversation()
    pg.send("tell me everything")
    pg.page.wait_for_function("() => (document.querySelector('.message.streaming .text') || {textContent: ''})"
                              ".textContent.length > 40", polling=100)
    with pg.page.expect_response(lambda r: r.url.endswith("/cancel")) as cancelled:
        pg.page.click("#stop")
    assert cancelled.value.status == 200
    pg.page.locator("#messages .message.assistant.stopped").wait_for()
    pg.wait_idle(2)
    assert "Stopped" in pg.page.inner_text("#status")
    (_, reply) = pg.texts()[1]
    assert len(reply) > 40 and pg.texts() == pg.transcript()  # the server kept the reply so far
    with pg.server.client(KEY) as client:
        stored = client.get(f"/v1/responses/{pg.head}").json()
    assert stored["status"] == "cancelled" and stored["usage"]["output_tokens"] < 1000  # far from 4000 tokens
    pg.settings(max_tokens="8")
    pg.send("go on")  # the next turn continues the cancelled one
    pg.wait_idle(4)
    assert pg.transcript()[:2] == pg.texts()[:2]
    pg.assert_clean()


def test_a_long_document_fills_the_progress_bar_and_the_memory_panel(playground: Any) -> None:
    pg = playground().open()
    pg.settings(max_tokens="24")
    pg.new_conversation()
    document = " ".join(SENTENCES * 120)  # about 5,000 tokens: hundreds of the tiny model's segments
    pg.page.click("#document summary")
    pg.page.fill("#doc-text", document)
    pg.mark()
    with pg.page.expect_request(lambda r: r.url.endswith("/v1/responses")) as read:
        pg.page.click("#doc-append")
    assert requested(read.value)["input"] == document and read.value.headers["x-hmt-progress"] == "segments"
    pg.wait_idle(2)  # the document, and the model's answer to it
    assert "Read" in pg.page.inner_text("#doc-status")
    progress = pg.page.evaluate("window.progress")
    assert progress[-1] == 1 and any(0 < value < 1 for value in progress), progress[-20:]
    assert progress == sorted(progress)
    assert pg.page.inner_text("#messages .message.user .who").startswith("Document")
    pg.page.click("#toggle-memory")
    assert pg.page.get_attribute("#toggle-memory", "aria-expanded") == "true"
    entries = pg.page.locator("#recall-list .recall-entry")
    entries.first.wait_for()
    with pg.server.client(KEY) as client:
        memory = client.get(f"/v1/responses/{pg.head}/memory").json()
    assert entries.count() == len(memory["recalls"]) == min(64, memory["segments_total"])
    newest = memory["recalls"][-1]
    assert entries.first.inner_text().startswith(f"segment {newest['segment']} recalled {newest['slots'][0]} (")
    assert pg.page.inner_text("#m-segments") == f"{memory['segments_total']:,}"
    assert pg.page.inner_text("#m-tokens") == f"{memory['tokens_seen']:,}"
    assert "x the conversation's state" in pg.page.inner_text("#m-ratio")
    pg.send("what did the fox do?")
    pg.wait_idle(4)
    with pg.server.client(KEY) as client:
        after = client.get(f"/v1/responses/{pg.head}/memory").json()
    assert after["tokens_seen"] > memory["tokens_seen"]  # the question continued the document's state
    assert [r["segment"] for r in after["recalls"]] == list(range(after["segments_total"]))[-64:]
    pg.screenshot("playground-memory.png")
    pg.assert_clean()


def test_a_text_file_is_read_into_the_conversation(playground: Any, tmp_path: Path) -> None:
    pg = playground().open()
    pg.settings(max_tokens="8")
    pg.new_conversation()
    book = tmp_path / "book.txt"
    book.write_text(" ".join(SENTENCES * 20))
    pg.page.click("#document summary")
    pg.page.set_input_files("#doc-file", str(book))
    pg.page.locator("#doc-status").filter(has_text="book.txt").wait_for()
    assert pg.page.input_value("#doc-text") == book.read_text()
    pg.mark()
    pg.page.click("#doc-append")
    pg.wait_idle(2)
    assert "Read" in pg.page.inner_text("#doc-status")
    assert pg.page.evaluate("document.getElementById('doc-progress').value") == 1
    with pg.server.client(KEY) as client:
        assert client.get(f"/v1/responses/{pg.head}").json()["usage"]["input_tokens"] > 500
    pg.assert_clean()


def test_conversations_are_listed_and_resumed(playground: Any) -> None:
    pg = playground().open()
    pg.settings(max_tokens="8")
    pg.new_conversation()
    pg.send("first conversation")
    pg.wait_idle(2)
    first = pg.head
    pg.new_conversation()
    pg.send("second conversation")
    pg.wait_idle(2)
    second = pg.head
    # most recently used first
    pg.page.wait_for_function(f"() => document.querySelector('#session-list button')?.dataset.id === '{second}'",
                              polling=100)
    listed = pg.page.locator("#session-list button")
    listed.filter(has_text="first conversation").click()
    pg.page.locator("#session-id").filter(has_text=first).wait_for()
    pg.wait_idle(2)
    assert pg.texts()[0] == ("user", "first conversation")
    pg.page.fill("#resume-id", second)
    pg.page.press("#resume-id", "Enter")
    pg.page.locator("#session-id").filter(has_text=second).wait_for()
    pg.wait_idle(2)
    assert pg.texts()[0] == ("user", "second conversation")
    pg.assert_clean()


def test_a_phone_sized_screen(playground: Any) -> None:
    pg = playground(PHONE).open()
    assert pg.page.is_hidden("#sessions")  # folded away on a phone: the chat comes first
    pg.page.click("#toggle-sessions")
    pg.settings(max_tokens="24")
    pg.page.click("#toggle-sessions")
    assert pg.page.is_hidden("#sessions")
    pg.send("hello from a phone")  # a new conversation: its first response
    pg.wait_idle(2)
    width = pg.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width  # nothing wider than the screen: no sideways scrolling
    for selector in ("#prompt", "#send", "#toggle-memory", "#toggle-sessions"):
        box = pg.page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    pg.page.click("#toggle-memory")
    pg.page.locator("#recall-map").wait_for()
    pg.page.locator("#messages").scroll_into_view_if_needed()
    pg.screenshot("playground-phone.png")
    pg.assert_clean()


def test_the_keyboard_alone(playground: Any) -> None:
    pg = playground()
    pg.page.goto(pg.server.url + "/")
    page = pg.page

    def tab_to(element_id: str) -> None:
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("api-key")
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    pg.wait_connected()
    tab_to("new-session")
    page.keyboard.press("Enter")
    page.locator("#status").filter(has_text="New conversation").wait_for()
    tab_to("temperature")
    page.keyboard.press("Control+A")
    page.keyboard.type("0")
    tab_to("prompt")
    page.keyboard.type("typed without a mouse")
    pg.mark()
    page.keyboard.press("Enter")
    pg.wait_idle(2)
    assert pg.texts()[0] == ("user", "typed without a mouse")
    tab_to("toggle-memory")
    page.keyboard.press("Enter")
    assert page.get_attribute("#toggle-memory", "aria-expanded") == "true"
    tab_to("max-tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("4000")
    tab_to("prompt")
    page.keyboard.type("a long one, stopped with Esc")
    page.keyboard.press("Enter")
    page.wait_for_function("() => (document.querySelector('.message.streaming .text') || {textContent: ''})"
                           ".textContent.length > 20", polling=100)
    pg.mark()
    page.keyboard.press("Escape")
    page.locator("#messages .message.assistant.stopped").wait_for()
    pg.wait_idle(4)
    pg.assert_clean()


def test_without_a_key_the_page_asks_for_one(playground: Any, playground_server: Server) -> None:
    pg = playground().open(key=False)
    pg.page.locator("#status").filter(has_text="API key").wait_for()
    assert pg.page.is_visible("#api-key")
    pg.assert_clean()  # it asked: no request went out without the key
    assert httpx.get(playground_server.url + "/").headers["content-security-policy"].startswith("default-src 'self'")

"""The real page in a real browser: streaming chat, thumbs with reasons, compare mode and rewrites.

The app runs in this process with the tiny model on a free loopback port; headless Debian chromium is
driven through selenium, and every click is checked against the rows it must leave in the SQLite file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.skipif(not CHROMEDRIVER.exists(),
                       reason=f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException, TimeoutException, WebDriverException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.config import ServeConfig  # noqa: E402
from app.engine import SamplingConfig  # noqa: E402
from app.server import create_app  # noqa: E402
from core.moderation import ModerationConfig, Moderator  # noqa: E402
from core.net import free_port  # noqa: E402

CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--window-size=1400,1000")
TIMEOUT = 30  # seconds for any single UI step; the tiny model answers in about a second

# Selectors of the Gradio 6 DOM, read from the rendered page.
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"
CHAT_STATUS = "#chatbot [data-testid='status-tracker']"
LIKE = "button[aria-label='Like']"
CANDIDATES = "#compare-panel .candidate[data-testid='markdown']"
TOAST = "[data-testid='toast-body']"

# Records every distinct text of the latest assistant bubble, as the browser renders it, so that a stream
# is seen even between two polls from the test.
RECORD_STREAM = """
window.__streamed = [];
const root = document.querySelector('#chatbot');
const record = () => {
  const bubbles = root.querySelectorAll("[data-testid='bot']");
  if (!bubbles.length) return;
  const text = bubbles[bubbles.length - 1].innerText;
  const seen = window.__streamed;
  if (!seen.length || seen[seen.length - 1] !== text) seen.push(text);
};
window.__streamObserver && window.__streamObserver.disconnect();
window.__streamObserver = new MutationObserver(record);
window.__streamObserver.observe(root, {subtree: true, childList: true, characterData: true});
"""


def wait(driver) -> WebDriverWait:
    """Svelte replaces nodes while it updates: a node gone stale between two calls is simply asked again."""
    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))


def squash(text: str) -> str:
    """Rendered text with whitespace runs folded: markdown and the chat bubble break lines differently."""
    return re.sub(r"\s+", " ", text or "").strip()


def extended(text: str, later: list[str]) -> bool:
    """Whether some other text seen goes on from `text`: it was seen part-way. Not judged against the final
    text alone, which moderation may have replaced by its refusal of the random model's answer."""
    return any(other != text and other.startswith(text) for other in later)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-app")
    config = ServeConfig(host="127.0.0.1", port=free_port(), db=tmp / "c.db", models_dir=tmp / "models",
                         model=tiny_model_dir, sampling=SamplingConfig(max_new_tokens=80, seed=0))
    tutor = create_app(config, say=lambda *_: None)
    try:
        url = tutor.launch(block=False)
        yield {"url": url, "db": config.db, "tutor": tutor}
    finally:
        tutor.close()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium does not start here: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(served, browser, tmp_path):
    """A freshly loaded page, so each test has its own conversation. The page as it was at the end of the
    test is left in the test's tmp_path (page.png, page.html) to look at when something fails."""
    browser.get(served["url"])
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"))
    print(f"page at the end of the test: {tmp_path / 'page.png'} and page.html")
    yield browser
    browser.save_screenshot(str(tmp_path / "page.png"))
    (tmp_path / "page.html").write_text(browser.page_source)


# -- helpers --


def query(db: Path, sql: str, args=()) -> list[dict]:
    with sqlite3.connect(db, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, args)]


def eventually(check, what: str, timeout: float = TIMEOUT):
    """Polls `check` until it returns something truthy; fails with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def toasts(driver, kind: str) -> list[str]:
    """Texts of the notices on screen; kind is "info", "warning" or "error"."""
    return fresh(lambda: [" ".join(e.text.split())
                          for e in driver.find_elements(By.CSS_SELECTOR, f"{TOAST}.{kind}")])


def wait_toast(driver, kind: str, text: str) -> None:
    wait(driver).until(lambda d: any(text in t for t in toasts(d, kind)), f"no {kind} notice saying {text!r}")


def no_error_toast(driver) -> None:
    shown = toasts(driver, "error")
    assert not shown, f"the page shows an error: {shown}"


def fresh(read, tries: int = 20):
    """Runs `read` again when Svelte replaced a node while it was being read."""
    for _ in range(tries - 1):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.02)
    return read()


def texts(driver, selector: str) -> list[str]:
    return fresh(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)])


def visible(driver, elem_id: str) -> bool:
    """Gradio 6 takes hidden components out of the DOM; either way they are not visible."""
    return fresh(lambda: any(e.is_displayed() for e in driver.find_elements(By.ID, elem_id)))


def chat_idle(driver) -> bool:
    return fresh(lambda: "hide" in (driver.find_element(By.CSS_SELECTOR, CHAT_STATUS).get_attribute("class")
                                    or "").split())


def type_message(driver, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    box.click()
    box.send_keys(text)


def ask(driver, text: str) -> tuple[str, list[str]]:
    """Sends `text` with the Send button; returns the final answer and the texts seen while it streamed."""
    before = len(texts(driver, BOT))
    driver.execute_script(RECORD_STREAM)
    type_message(driver, text)
    driver.find_element(By.ID, "send").click()
    polled = []
    deadline = time.monotonic() + TIMEOUT
    while True:  # poll as fast as the driver allows while the answer streams in
        bubbles = texts(driver, BOT)
        if len(bubbles) > before:
            polled.append(bubbles[-1])
            if bubbles[-1] and chat_idle(driver):
                break
        if time.monotonic() > deadline:
            pytest.fail(f"no complete answer within {TIMEOUT}s; bubbles: {bubbles}")
        time.sleep(0.01)
    final = texts(driver, BOT)[-1]
    assert final.strip(), "the assistant bubble is empty"
    assert texts(driver, USER)[-1].strip() == text
    assert fresh(lambda: driver.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value")) \
        == "", "the textbox is not cleared after sending"
    no_error_toast(driver)
    return final, polled + driver.execute_script("return window.__streamed || []")


def paced(chat, delay: float, finished: list):
    """Wraps TutorService.chat: each chunk comes `delay` seconds after the one before, as with the embedded
    model (~17 tokens/s here) rather than the tiny one (80 tokens in ~0.2 s); the time the final chunk was
    produced goes into `finished`."""
    def chat_at_model_speed(*args, **kwargs):
        for chunk in chat(*args, **kwargs):
            if chunk["done"]:
                finished.append(time.monotonic())
            else:
                time.sleep(delay)
            yield chunk
    return chat_at_model_speed


def conversation_of(db: Path, user_text: str) -> list[dict]:
    """The messages of the conversation whose user turn is `user_text` (made unique by each test)."""
    rows = query(db, "select conversation_id from messages where role = 'user' and content = ?", [user_text])
    assert len(rows) == 1, f"expected one stored user message {user_text!r}, found {len(rows)}"
    return query(db, "select * from messages where conversation_id = ? order by position, created_at",
                 [rows[0]["conversation_id"]])


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def click_label(driver, radio_id: str, label: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{radio_id} label[data-testid='{label}-radio-label']").click()


def answer_message(db: Path, user_text: str) -> dict:
    rows = [m for m in conversation_of(db, user_text) if m["role"] == "assistant"]
    assert len(rows) == 1, rows
    return rows[0]


def start_comparison(driver, question: str) -> None:
    """Asks for two answers and waits until both are complete (the choice is offered)."""
    type_message(driver, question)
    driver.find_element(By.ID, "compare").click()
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#choice input[type=radio]")) == 4)


def compare_and_pick(driver, question: str, label: str) -> None:
    start_comparison(driver, question)
    click_label(driver, "choice", label)
    driver.find_element(By.ID, "pick").click()
    wait(driver).until(lambda d: not visible(d, "compare-panel"))


# -- tests --


def without_moderation(service, monkeypatch) -> None:
    """The tiny random model writes random bytes, which the word list may stop at any chunk, ending a stream
    before it was seen growing; what moderation does to a streamed answer is tested in test_safety.py."""
    monkeypatch.setattr(service, "moderator", Moderator(ModerationConfig(enabled=False)))


def test_send_streams_the_answer_and_stores_the_turns(page, served, monkeypatch):
    without_moderation(served["tutor"].service, monkeypatch)
    question = unique("What is a fraction?")
    final, seen = ask(page, question)

    partial = [t for t in seen if t.strip() and extended(squash(t), [squash(u) for u in [*seen, final]])]
    print(f"{len(seen)} streamed states, {len(partial)} strict prefixes")
    assert partial, ("the answer was never seen part-way through: no streamed state was a strict prefix of "
                     f"a later one; seen {len(seen)} states")

    db = served["db"]
    messages = eventually(lambda: (m := conversation_of(db, question)) and m[-1]["role"] == "assistant" and m,
                          "the stored answer")
    conversation = query(db, "select * from conversations where id = ?", [messages[0]["conversation_id"]])
    assert conversation and conversation[0]["purpose"] == "chat"
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"], roles
    answer = messages[-1]
    assert answer["content"].strip() and answer["model_version"] == "v0000"
    assert json.loads(answer["context"]), "the stored answer does not record the context it saw"


def test_answer_is_shown_while_it_is_generated(page, served, monkeypatch):
    """Streaming must reach the learner live: part of the answer is on screen before the model is done."""
    service = served["tutor"].service
    finished = []
    monkeypatch.setattr(service, "chat", paced(service.chat, 0.03, finished))
    before = len(texts(page, BOT))
    type_message(page, unique("What is a fraction?"))
    page.find_element(By.ID, "send").click()
    first_partial = None
    deadline = time.monotonic() + TIMEOUT
    while not finished or first_partial is None:
        bubbles = texts(page, BOT)
        if first_partial is None and len(bubbles) > before and bubbles[-1].strip():
            first_partial = time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"no answer within {TIMEOUT}s")
        time.sleep(0.01)
    wait(page).until(lambda d: chat_idle(d))
    assert first_partial < finished[0], (
        f"nothing of the answer was shown while it was generated: the first text appeared "
        f"{first_partial - finished[0]:.2f}s after the model had finished")


def test_thumbs_up_then_reason(page, served):
    db = served["db"]
    question = unique("Why is the sky blue?")
    ask(page, question)
    answer = answer_message(db, question)

    # The thumbs sit in the button bar right after the answer's row.
    fresh(lambda: page.find_elements(By.CSS_SELECTOR, "#chatbot .message-row.bot-row")[-1]
          .find_element(By.XPATH, "following-sibling::div[contains(@class,'message-buttons')][1]")
          .find_element(By.CSS_SELECTOR, LIKE).click())
    first = eventually(lambda: query(db, "select * from ratings where message_id = ?", [answer["id"]]),
                       "a rating row after clicking thumbs up")
    assert [(r["rating"], r["reason"]) for r in first] == [("up", "")]
    no_error_toast(page)

    wait(page).until(lambda d: visible(d, "reason"))
    assert "What was good" in texts(page, "#reason")[0]
    options = fresh(lambda: [i.get_attribute("value")
                             for i in page.find_elements(By.CSS_SELECTOR, "#reason input[type=radio]")])
    assert "clear" in options, options
    click_label(page, "reason", "clear")
    rows = eventually(lambda: (r := query(db, "select * from ratings where message_id = ? order by id",
                                          [answer["id"]])) and len(r) == 2 and r,
                      "a second rating row with the reason")
    assert [(r["rating"], r["reason"]) for r in rows] == [("up", ""), ("up", "clear")]
    wait(page).until(lambda d: not visible(d, "reason"))
    wait_toast(page, "info", "Thanks for telling us why")
    no_error_toast(page)


def test_compare_and_pick(page, served):
    db = served["db"]
    question = unique("Tell me about plants")
    assert not visible(page, "compare-panel")
    type_message(page, question)
    page.find_element(By.ID, "compare").click()

    def candidates(d):
        return fresh(lambda: [e.text for e in d.find_elements(By.CSS_SELECTOR, CANDIDATES) if e.is_displayed()])

    # the choice is offered once both answers are complete
    wait(page).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#choice input[type=radio]")) == 4)
    shown = candidates(page)
    assert len(shown) == 2 and shown[0].startswith("Answer A") and shown[1].startswith("Answer B"), shown
    assert texts(page, USER)[-1].strip() == question
    assert fresh(lambda: page.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value")) == ""

    comparison = eventually(lambda: query(
        db, "select c.* from comparisons c join messages m on m.id = c.user_message_id where m.content = ?",
        [question]), "the stored comparison")[0]
    assert comparison["k"] == 2 and comparison["decided_at"] is None
    labels = {c["label"]: c["message_id"] for c in query(
        db, "select * from comparison_candidates where comparison_id = ?", [comparison["id"]])}
    assert sorted(labels) == ["A", "B"]

    click_label(page, "choice", "A is best")
    page.find_element(By.ID, "pick").click()
    picks = eventually(lambda: query(db, "select * from comparison_picks where comparison_id = ?",
                                     [comparison["id"]]), "the comparison_picks row")
    assert len(picks) == 1 and picks[0]["choice"] == "A"
    winner = query(db, "select * from messages where id = ?", [labels["A"]])[0]
    assert winner["active"] == 1

    wait(page).until(lambda d: not visible(d, "compare-panel"))
    bubble = squash(texts(page, BOT)[-1])
    expected = squash(shown[0].removeprefix("Answer A"))
    assert bubble == expected, "the chat does not continue with the chosen answer"
    wait_toast(page, "info", "goes on from the answer you chose")
    no_error_toast(page)


# Records every distinct pair of candidate texts the panel shows.
RECORD_CANDIDATES = """
window.__candidates = [];
const record = () => {  // the panel is not in the page until it is first shown: watch the whole body
  const texts = [...document.querySelectorAll("#compare-panel .candidate[data-testid='markdown']")]
    .filter(e => e.offsetParent)
    .map(e => e.innerText);
  const seen = window.__candidates;
  if (!seen.length || JSON.stringify(seen[seen.length - 1]) !== JSON.stringify(texts)) seen.push(texts);
};
window.__candidateObserver && window.__candidateObserver.disconnect();
window.__candidateObserver = new MutationObserver(record);
window.__candidateObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def test_compared_answers_stream_in_side_by_side(page, served, monkeypatch, tmp_path):
    service = served["tutor"].service
    without_moderation(service, monkeypatch)
    finished = []
    monkeypatch.setattr(service, "compare_stream", paced(service.compare_stream, 0.04, finished))
    question = unique("Compare two ways to add fractions")
    type_message(page, question)
    page.execute_script(RECORD_CANDIDATES)
    page.find_element(By.ID, "compare").click()
    wait(page).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#choice input[type=radio]")) == 4)
    page.save_screenshot(str(tmp_path / "compared.png"))
    seen = [[squash(t.removeprefix("Answer A").removeprefix("Answer B")) for t in pair]
            for pair in page.execute_script("return window.__candidates") if len(pair) == 2]
    both_partial = [pair for i, pair in enumerate(seen)
                    if all(p and p != "…" and extended(p, [q[side] for q in seen[i + 1:]])
                           for side, p in enumerate(pair))]
    assert both_partial, f"the two answers were never seen growing together: {seen[:5]} ... {seen[-1]}"
    assert len({tuple(p) for p in seen}) >= 5, "the answers arrived in a few jumps, not streamed"
    click_label(page, "choice", "B is best")
    page.find_element(By.ID, "pick").click()
    wait(page).until(lambda d: not visible(d, "compare-panel"))
    no_error_toast(page)


def test_skipping_a_comparison_frees_the_conversation(page, served):
    db = served["db"]
    question = unique("Which is bigger, 2/3 or 3/4?")
    start_comparison(page, question)
    page.find_element(By.ID, "skip").click()
    wait(page).until(lambda d: not visible(d, "compare-panel"))
    comparison = eventually(lambda: (r := query(
        db, "select c.* from comparisons c join messages m on m.id = c.user_message_id where m.content = ?",
        [question])) and r[0]["abandoned_at"] and r, "the comparison marked skipped")[0]
    assert comparison["decided_at"] is None
    assert question not in [squash(t) for t in texts(page, USER)]
    follow_up = unique("What is 1/2 + 1/4?")
    ask(page, follow_up)  # not refused for an open comparison
    (reply,) = [m for m in conversation_of(db, follow_up) if m["role"] == "assistant" and m["comparison_id"] is None]
    assert reply["active"] == 1 and json.loads(reply["context"])[-1]["content"] == follow_up
    assert question not in reply["context"], "the skipped question is still in the conversation"
    no_error_toast(page)


def test_the_app_itself_asks_for_a_comparison_now_and_then_and_a_skip_gives_the_question_back(
        page, served, monkeypatch, tmp_path):
    from core.active import AskingConfig

    tutor, db = served["tutor"], served["db"]
    monkeypatch.setattr(tutor.service, "asking", AskingConfig(offer_share=1.0, offer_gap=1))
    tutor.store.set_consent("", "given")  # the local user lets her feedback be used
    try:
        first = unique("What is a fraction?")
        ask(page, first)  # a conversation's first message gets one answer
        assert not visible(page, "compare-panel")
        second = unique("And what is a half?")
        type_message(page, second)
        page.find_element(By.ID, "send").click()  # Send, not "Compare answers"
        wait(page).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#choice input[type=radio]")) == 4,
                         "the app did not turn the message into a comparison")
        wait_toast(page, "info", "Two answers this time")
        page.save_screenshot(str(tmp_path / "offered.png"))
        comparison = eventually(lambda: query(
            db, "select c.* from comparisons c join messages m on m.id = c.user_message_id "
            "where m.content = ?", [second]), "the stored comparison")[0]
        assert json.loads(comparison["asked"])["offered"] is True and comparison["k"] == 2
        page.find_element(By.ID, "skip").click()
        wait(page).until(lambda d: not visible(d, "compare-panel"))
        box = lambda: fresh(lambda: page.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value"))
        eventually(lambda: box() == second, "the skipped question back in the box")
        assert query(db, "select abandoned_at from comparisons where id = ?", [comparison["id"]])[0]["abandoned_at"]
        page.find_element(By.ID, "send").click()  # just skipped: this time one answer
        eventually(lambda: len([m for m in conversation_of(db, second) if m["role"] == "assistant"
                                and m["comparison_id"] is None]) == 1, "one answer to the question sent again")
        assert not visible(page, "compare-panel")
        no_error_toast(page)
    finally:
        with sqlite3.connect(served["db"], timeout=10) as conn:
            conn.execute("delete from consents where user = ''")


def test_an_offer_the_busy_tutor_cannot_take_becomes_one_answer_without_announcing_two(page, served, monkeypatch):
    from app.engine import EngineBusy
    from core.active import AskingConfig

    tutor, db = served["tutor"], served["db"]
    monkeypatch.setattr(tutor.service, "asking", AskingConfig(offer_share=1.0, offer_gap=1))

    def busy(self, messages, n):  # room for one answer, not for two
        raise EngineBusy("the tutor is busy (8 requests waiting); try again in a moment")
    monkeypatch.setattr(type(tutor.service.engine), "submit_group", busy)
    tutor.store.set_consent("", "given")
    try:
        ask(page, unique("What is a whole number?"))
        second = unique("And what is a negative number?")
        type_message(page, second)
        page.find_element(By.ID, "send").click()
        notices = set()

        def answered() -> bool:  # the notices are gathered while the answer streams: they fade
            notices.update(toasts(page, "info"))
            if not query(db, "select id from messages where content = ?", [second]):
                return False  # not stored yet
            rows = conversation_of(db, second)
            after = rows[next(i for i, m in enumerate(rows) if m["content"] == second) + 1:]
            return chat_idle(page) and [(m["role"], m["comparison_id"]) for m in after] == [("assistant", None)]
        eventually(answered, "one answer to the offered question")
        assert not [n for n in notices if "Two answers" in n], f"two answers were announced: {notices}"
        assert not visible(page, "compare-panel")
        assert not query(db, "select c.id from comparisons c join messages m on m.id = c.user_message_id "
                             "where m.content = ?", [second])
        no_error_toast(page)
    finally:
        with sqlite3.connect(served["db"], timeout=10) as conn:
            conn.execute("delete from consents where user = ''")


def test_an_earlier_pick_is_asked_again_in_flipped_order(page, served, monkeypatch, tmp_path):
    db, service = served["db"], served["tutor"].service
    monkeypatch.setattr(service.limits, "recheck_every", 1)  # every pick, not every 5th
    compare_and_pick(page, unique("Is 0.5 the same as 1/2?"), "A is best")
    compare_and_pick(page, unique("Is 0.25 the same as 1/4?"), "B is best")
    wait(page).until(lambda d: visible(d, "recheck-panel"))
    page.save_screenshot(str(tmp_path / "recheck.png"))
    shown = fresh(lambda: [e.text for e in page.find_elements(By.CSS_SELECTOR, "#recheck-panel .candidate") if e.is_displayed()])
    asked = query(db, "select count(*) as n from repeat_checks")[0]["n"]
    page.find_element(By.ID, "recheck-a").click()
    wait(page).until(lambda d: not visible(d, "recheck-panel"))
    (check,) = eventually(lambda: (r := query(db, "select * from repeat_checks order by id desc limit 1"))
                          and len(query(db, "select id from repeat_checks")) == asked + 1 and r, "the repeat_checks row")
    first = query(db, """select m.content from comparison_candidates cc join messages m on m.id = cc.message_id
                         where cc.comparison_id = ? and cc.label = ?""", [check["comparison_id"], check["choice"]])
    # "A" on the page was the earlier comparison's B: stored as the label it has in that comparison
    assert letters(first[0]["content"]) == letters(shown[0].removeprefix("Answer A")), (check, shown)
    assert check["choice"] == "B"
    no_error_toast(page)


def test_a_comparison_left_open_is_shown_again_when_its_conversation_is_opened(page, served):
    db = served["db"]
    question = unique("Is 1/2 bigger than 1/3?")
    start_comparison(page, question)
    (comparison,) = query(db, "select c.* from comparisons c join messages m on m.id = c.user_message_id "
                              "where m.content = ?", [question])
    page.get(f"{served['url']}?conversation={comparison['conversation_id']}")  # the learner comes back
    wait(page).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#choice input[type=radio]")) == 4)
    assert texts(page, USER)[-1].strip() == question
    click_label(page, "choice", "B is best")
    page.find_element(By.ID, "pick").click()
    picks = eventually(lambda: query(db, "select * from comparison_picks where comparison_id = ?", [comparison["id"]]),
                       "the pick of the reopened comparison")
    assert picks[0]["choice"] == "B"
    no_error_toast(page)


def test_rewrite_the_latest_answer(page, served):
    db = served["db"]
    question = unique("How do I add fractions?")
    ask(page, question)
    answer = answer_message(db, question)

    page.find_element(By.XPATH, "//button[contains(@class,'label-wrap')][contains(., 'Write a better answer')]") \
        .click()
    area = wait(page).until(
        lambda d: (a := d.find_elements(By.CSS_SELECTOR, "#better textarea")) and a[0].is_displayed() and a[0])
    time.sleep(0.3)  # let the accordion finish opening before typing into it
    area = page.find_element(By.CSS_SELECTOR, "#better textarea")
    # A textarea's value has its line breaks normalised to LF (HTML spec); the tiny model's text can hold a CR.
    shown_text = answer["content"].replace("\r\n", "\n").replace("\r", "\n")
    assert area.get_attribute("value") == shown_text, "the box is not filled with the latest answer"
    better = "Add fractions with the same bottom number by adding the tops: 1/4 + 2/4 = 3/4."
    area.click()
    area.send_keys(Keys.CONTROL, "a")
    area.send_keys(Keys.DELETE)
    area.send_keys(better)
    page.find_element(By.ID, "rewrite").click()

    rows = eventually(lambda: query(db, "select * from rewrites where message_id = ?", [answer["id"]]),
                      "the rewrites row")
    assert [r["text"] for r in rows] == [better]
    wait(page).until(lambda d: squash(texts(d, BOT)[-1]) == squash(better))
    wait_toast(page, "info", "Saved")
    no_error_toast(page)


def test_empty_message_is_refused_and_nothing_is_stored(page, served):
    db = served["db"]
    before = query(db, "select count(*) as n from messages")[0]["n"]
    page.find_element(By.ID, "send").click()
    wait_toast(page, "error", "empty")
    assert texts(page, USER) == [] and texts(page, BOT) == []
    assert query(db, "select count(*) as n from messages")[0]["n"] == before


# -- with accounts: Gradio's login page, and who may open which conversation --

SHOTS = Path("/tmp/shots")  # screenshots to look at: the login page, a learner's chat, a refused open
PASSWORD = "correct horse battery"
LOGIN_FORM = "input[data-testid='password']"


@pytest.fixture(scope="module")
def school(serve_tutor, tiny_model_dir, tmp_path_factory):
    """A served app with accounts: learners ada (whose teacher is tess) and ben, and the teacher tess."""
    from app.accounts import Accounts
    from app.quotas import QuotaConfig
    from app.store import Store

    root = tmp_path_factory.mktemp("browser-school")
    with Store(root / "c.db") as store:
        accounts = Accounts(store)
        accounts.add("tess", "teacher", PASSWORD)
        accounts.add("ada", "learner", PASSWORD, teacher="tess")
        accounts.add("ben", "learner", PASSWORD)
        for name in ("tess", "ben"):  # ada answers the consent notice in her test; it shifts the page
            store.set_consent(name, "declined")
    with serve_tutor(root, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=40),
                     quotas=QuotaConfig(enabled=False)) as (tutor, url):
        yield {"url": url, "db": root / "c.db", "tutor": tutor}


@pytest.fixture
def school_page(school, browser, tmp_path):
    """The browser, logged out of the school; the page at the end of the test goes to tmp_path."""
    browser.get(school["url"])
    browser.delete_all_cookies()
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"page at the end of the test: {tmp_path / 'page.png'} and page.html")
    yield browser
    browser.save_screenshot(str(tmp_path / "page.png"))
    (tmp_path / "page.html").write_text(browser.page_source)


def log_in(driver, url: str, name: str, shot: str | None = None) -> None:
    """Through Gradio's own login form, as a person would."""
    driver.get(url)
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, LOGIN_FORM))
    if shot:
        driver.save_screenshot(str(SHOTS / shot))
    driver.find_element(By.CSS_SELECTOR, "input[data-testid='textbox']").send_keys(name)
    driver.find_element(By.CSS_SELECTOR, LOGIN_FORM).send_keys(PASSWORD)
    driver.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"))


def options(driver) -> list:
    """The options of the "Your conversations" dropdown, opened first if it is closed (then there are
    none yet: the list renders a moment later, outside the component)."""
    box = driver.find_element(By.CSS_SELECTOR, "#conversations input")
    if box.get_attribute("aria-expanded") != "true":
        box.click()
        return []
    return driver.find_elements(By.CSS_SELECTOR, f"#{box.get_attribute('aria-controls')} li")


def listed(driver, until, what: str) -> list[str]:
    """The labels in the "Your conversations" dropdown once `until(labels)` holds. An open list is not
    refilled when the choices come (an event after the page loads), so it is closed and opened again."""
    seen, opened = [], []

    def ready(d):
        seen[:] = fresh(lambda: [squash(e.text) for e in options(d)])
        opened.append(time.monotonic())
        if until(seen):
            return True
        if time.monotonic() - opened[0] > 1:  # open a while, and still not there: close, to open afresh
            close_dropdown(d)
            opened.clear()
        return False

    try:
        wait(driver).until(ready)
    except TimeoutException:
        pytest.fail(f"the dropdown never listed {what}; it lists {seen}")
    close_dropdown(driver)
    return list(seen)


def close_dropdown(driver) -> None:
    """It opens when it gets the focus (a click on a focused one does nothing), so it is closed by a blur."""
    driver.execute_script("arguments[0].blur()", driver.find_element(By.CSS_SELECTOR, "#conversations input"))


def close_toasts(driver) -> None:
    """Notices sit over the top right corner, where the Log out button is; a person closes them first."""
    for button in fresh(lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-close']")):
        fresh(button.click)
    wait(driver).until(lambda d: not d.find_elements(By.CSS_SELECTOR, TOAST))


def letters(text: str) -> str:
    """Only the letters and digits: the browser drops or spaces out the tiny model's control characters."""
    return "".join(c for c in text or "" if c.isalnum())


def a_conversation_of(tutor, name: str, question: str) -> tuple[str, str]:
    """A conversation of `name` with one turn, made through the service; its id and the answer."""
    service = tutor.service
    owner = service.accounts.get(name)
    conversation_id = service.new_conversation(owner, "", "chat")["conversation_id"]
    answer = list(service.chat(owner, conversation_id, question))[-1]["text"]
    return conversation_id, answer


def test_log_in_chat_and_log_out(school_page, school):
    page = school_page
    log_in(page, school["url"], "ada", shot="login.png")
    wait(page).until(lambda d: visible(d, "consent-panel"), "no consent notice for a new learner")
    page.find_element(By.ID, "consent-no").click()
    wait(page).until(lambda d: not visible(d, "consent-panel"))
    question = unique("What is a prime number?")
    final, _ = ask(page, question)
    assert squash(final)
    stored = eventually(lambda: (m := conversation_of(school["db"], question)) and len(m) == 2 and m,
                        "ada's stored turn")
    assert query(school["db"], "select user from conversations where id = ?",
                 [stored[0]["conversation_id"]])[0]["user"] == "ada"
    # The new conversation is listed, labelled by its first question.
    listed(page, lambda labels: any(question[:30] in label for label in labels), "the new conversation")
    close_toasts(page)
    wait(page).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='dropdown-option']"))
    page.save_screenshot(str(SHOTS / "ada_chat.png"))

    # Her own conversation, opened by its address after a reload, is back as it was.
    page.get(f"{school['url']}?conversation={stored[0]['conversation_id']}")
    wait(page).until(lambda d: [squash(t) for t in texts(d, USER)] == [squash(question)])
    assert [letters(t) for t in texts(page, BOT)] == [letters(final)]
    no_error_toast(page)

    page.find_element(By.ID, "logout").click()
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, LOGIN_FORM), "no login form after logging out")
    assert not page.find_elements(By.CSS_SELECTOR, "#message textarea")
    page.get(school["url"])  # the session is gone: a reload shows the login form again, not the chat
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, LOGIN_FORM))


def test_another_learner_cannot_open_a_conversation_by_its_address(school_page, school):
    page, tutor = school_page, school["tutor"]
    ada_question = unique("Ada asks about atoms")
    ada_id, ada_answer = a_conversation_of(tutor, "ada", ada_question)
    ben_question = unique("Ben asks about bees")
    a_conversation_of(tutor, "ben", ben_question)

    log_in(page, school["url"], "ben")
    page.get(f"{school['url']}?conversation={ada_id}")
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"))
    wait_toast(page, "warning", f"no conversation with id {ada_id!r}")
    no_error_toast(page)
    page.save_screenshot(str(SHOTS / "ben_refused.png"))
    shown = page.find_element(By.TAG_NAME, "body").text
    assert squash(ada_question) not in squash(shown)
    assert len(letters(ada_answer)) < 8 or letters(ada_answer) not in letters(shown)  # too short to tell
    assert texts(page, USER) == [] and texts(page, BOT) == []

    labels = listed(page, lambda labels: any(ben_question[:30] in label for label in labels),
                    "ben's own conversation")
    assert not any(ada_question[:30] in label or "ada:" in label for label in labels), labels


def test_a_teacher_lists_and_opens_her_learners_conversation(school_page, school):
    page, tutor = school_page, school["tutor"]
    question = unique("Ada asks about cells")
    _, answer = a_conversation_of(tutor, "ada", question)

    log_in(page, school["url"], "tess")
    labels = listed(page, lambda labels: any(question[:30] in label for label in labels),
                    "the conversation of her learner ada")
    mine = [label for label in labels if question[:30] in label]
    assert len(mine) == 1 and "ada:" in mine[0], labels

    wait(page).until(lambda d: (e := next((e for e in options(d) if question[:30] in squash(e.text)), None))
                     and (e.click() or True), "ada's conversation is not there to choose")
    wait(page).until(lambda d: [squash(t) for t in texts(d, USER)] == [squash(question)])
    assert [letters(t) for t in texts(page, BOT)] == [letters(answer)]
    no_error_toast(page)

    # She may read it, not write into it: the service refuses, and the page says so.
    type_message(page, "Well done, Ada!")
    page.find_element(By.ID, "send").click()
    wait_toast(page, "error", "no conversation with id")
    assert len(texts(page, USER)) == 1


# -- the teachers' tab ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def looped(serve_tutor, tmp_path_factory):
    """A school whose tutor went through one real (tiny) cycle: v0001 promoted from 120 comparisons."""
    import random as _random

    from app.accounts import Accounts
    from app.embedded import ensure_base
    from app.quotas import QuotaConfig
    from app.store import Store
    from app.versions import ModelRegistry
    from rlhf.cycle import run_cycle
    from test_canary import vote
    from test_cycle import TINY_CYCLE, give_feedback, prefers_examples
    from tiny import learnable_policy

    root = tmp_path_factory.mktemp("browser-loop")
    registry = ModelRegistry(root / "models")
    ensure_base(registry, learnable_policy(root / "tiny"), say=lambda *_: None)
    ids = _random.Random(0)  # seeded ids: the same held-out split, so the same verdict, every run
    with pytest.MonkeyPatch.context() as patch, Store(root / "c.db") as store:
        patch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=ids.getrandbits(128), version=4))
        give_feedback(store, 120, prefers_examples)
        arena_rng = _random.Random(0)
        for i in range(16):  # blind arena votes between v0001 (to come) and v0000: the leaderboard rates them
            vote(store, i % 4 != 0, arena_rng, canary="v0001", baseline="v0000")
        outcome = run_cycle(store, registry, TINY_CYCLE, say=lambda *_: None)
        accounts = Accounts(store)
        accounts.add("tess", "teacher", PASSWORD)
        accounts.add("ada", "learner", PASSWORD, teacher="tess")
        for name in ("tess", "ada"):
            store.set_consent(name, "declined")
    assert outcome.status == "promoted", outcome.message
    with serve_tutor(root, None, sampling=SamplingConfig(max_new_tokens=8), quotas=QuotaConfig(enabled=False)) as (
            tutor, url):
        yield {"url": url, "registry": registry, "version": outcome.version}


def teacher_tab(driver):
    return [e for e in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if e.text.strip() == "Teacher"]


def test_a_teacher_sees_the_loop_and_rolls_back_and_a_learner_does_not_see_it(looped, browser, tmp_path):
    browser.get(looped["url"])
    browser.delete_all_cookies()
    log_in(browser, looped["url"], "tess")
    wait(browser).until(lambda d: teacher_tab(d))
    teacher_tab(browser)[0].click()
    table = wait(browser).until(lambda d: (t := d.find_elements(By.CSS_SELECTOR, "#cycles-table"))
                                and "promoted" in t[0].text and t[0])
    assert looped["version"] in table.text
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ppo-plot canvas, #ppo-plot svg"))
    answers = browser.find_element(By.CSS_SELECTOR, "#answers-table").text
    assert "Question" in answers, "the two versions' answers are not shown side by side"
    learners = browser.find_element(By.CSS_SELECTOR, "#learners-table").text
    assert "ada" in learners, learners
    versions = browser.find_element(By.CSS_SELECTOR, "#versions-table").text
    assert "v0000" in versions and "served" in versions
    board = browser.find_element(By.CSS_SELECTOR, "#leaderboard").text
    assert "v0001" in board and "v0000" in board and "16" in board, board
    assert board.index("v0001") < board.index("v0000"), "the version with 75% of the votes is not rated first"
    assert "No canary is running" in browser.find_element(By.CSS_SELECTOR, "#canary-summary").text
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#learner-plot canvas, #learner-plot svg"))
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.find_element(By.ID, "cycle-report").click()  # the cycle's figures as one HTML file
    downloaded = WebDriverWait(browser, 30, poll_frequency=0.3).until(
        lambda d: (path := tmp_path / "cycle-0001.html").exists() and path.read_text())
    assert "Training cycle 1" in downloaded and "data:image/png;base64," in downloaded
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "dashboard.png"))
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    box = browser.find_element(By.CSS_SELECTOR, "#rollback-version input")
    box.click()
    wait(browser).until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, f"#{box.get_attribute('aria-controls')} li")
                                   if o.text.strip() == "v0000"])[0].click()
    browser.find_element(By.ID, "rollback").click()
    wait_toast(browser, "info", "v0000 is current again")
    assert looped["registry"].current_version() == "v0000"

    # Retrain now: its own process, its output followed on the page until it ends (here quickly: the
    # feedback is what cycle 1 learned from already).
    browser.find_element(By.ID, "retrain-now").click()
    ended = WebDriverWait(browser, 120, poll_frequency=0.5).until(
        lambda d: (box := d.find_elements(By.CSS_SELECTOR, "#retrain-progress textarea"))
        and "the retrain ended" in (text := box[0].get_attribute("value")) and text)
    assert "exit code 0" in ended and "nothing new to learn" in ended, ended

    browser.delete_all_cookies()
    log_in(browser, looped["url"], "ada")
    time.sleep(1)  # the tab would show on load
    assert not [t for t in teacher_tab(browser) if t.is_displayed()], "a learner sees the teachers' tab"

"""The learner-facing page: chat with streaming, thumbs with reasons, compare mode, rewrites.

`build_demo(service)` returns a gr.Blocks; all per-user state lives in gr.State, nothing global.
`_layout` builds the components into a `Page` first; `_connect` then defines the handlers as closures over
it. Every handler returns (or yields) a dict keyed by the components it updates, so a handler and the
`outputs=` of its event cannot drift apart by position: a component left out of the dict is left as it is.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import gradio as gr

from app.api import register_api
from app.service import REASONS_DOWN, REASONS_UP, TutorService, UserError
from app.store import LABELS

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="teal", neutral_hue="slate",
                       font=["Inter", "Segoe UI", "Helvetica Neue", "Arial", "sans-serif"])
CSS = """
#header {align-items:center; padding: 4px 4px 0 4px;}
#header > div:last-child {display:flex; justify-content:flex-end;}
#header h1 {margin:0; font-size:1.6rem;}
#header p {margin:2px 0 0 0; color: var(--body-text-color-subdued);}
.version-badge {font-size:0.85rem; padding:4px 10px; border-radius:999px; background: var(--color-accent-soft);}
.candidate {border:1px solid var(--border-color-primary); border-radius:12px; padding:10px 14px; min-height:120px;
           font-size: var(--text-lg);}
.compare-panel {border:1px solid var(--color-accent); border-radius:14px; padding:12px 16px;
                background: var(--background-fill-secondary);}
footer {display:none !important;}
"""
INTRO = ("Ask about maths, science, languages, programming or history. Your tutor explains step by step. "
         "Rate answers with 👍/👎, compare two answers, or write a better one: every piece of feedback "
         "helps the tutor improve.")


def _empty_state() -> dict:
    return {"conversation_id": None, "ids": [], "comparison": None, "rated": None}


def _fail(exc: UserError):
    raise gr.Error(str(exc), print_exception=False)


def _badge_html(service: TutorService) -> str:
    return f"<span class='version-badge'>Tutor model <b>{service.engine.version}</b></span>"


@dataclass
class Page:
    """The components of the page, the keys of the handlers' update dicts."""
    state: gr.State
    badge: gr.HTML
    chatbot: gr.Chatbot
    panel: gr.Column
    boxes: list[gr.Markdown]  # one per candidate, in LABELS order
    choice: gr.Radio
    order: gr.Textbox
    pick_btn: gr.Button
    message: gr.Textbox
    send_btn: gr.Button
    k: gr.Dropdown
    compare_btn: gr.Button
    new_btn: gr.Button
    reason: gr.Radio
    better: gr.Textbox
    rewrite_btn: gr.Button


def build_demo(service: TutorService) -> gr.Blocks:
    with gr.Blocks(title="Tutor") as demo:
        register_api(service)  # first, so the contract's endpoint names are not taken by UI events
        page = _layout(_badge_html(service))
        _connect(service, page)
    return demo


def _layout(badge_html: str) -> Page:
    state = gr.State(_empty_state())
    with gr.Row(elem_id="header"):
        gr.HTML("<div><h1>📚 Tutor</h1><p>Learn step by step, with a tutor that learns from you.</p></div>")
        badge = gr.HTML(badge_html)
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(elem_id="chatbot", height="60vh", show_label=False, layout="bubble",
                                 placeholder=f"**Welcome!** {INTRO}", buttons=["copy"],
                                 feedback_options=("Like", "Dislike"))
            # Right under the chat, where the learner is looking, not below the input.
            with gr.Column(visible=False, elem_id="compare-panel", elem_classes="compare-panel") as panel:
                gr.Markdown("### Which answer helps you learn best?")
                with gr.Row():
                    boxes = [gr.Markdown(elem_classes="candidate", visible=False) for _ in LABELS]
                choice = gr.Radio([], label="Your choice", elem_id="choice")
                order = gr.Textbox(label="Or rank them all, best first (e.g. C,A,B)", visible=False)
                pick_btn = gr.Button("Submit my choice", variant="primary", elem_id="pick")
            with gr.Row():
                message = gr.Textbox(placeholder="Ask your tutor a question…", show_label=False, scale=6,
                                     elem_id="message", autofocus=True, max_lines=6)
                send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                k = gr.Dropdown(["2", "3", "4"], value="2", label="Answers", scale=1, min_width=90,
                                container=False, elem_id="k")
                compare_btn = gr.Button("Compare answers", scale=2, elem_id="compare")
                new_btn = gr.Button("New conversation", scale=2, elem_id="new")
        with gr.Column(scale=1, min_width=260):
            gr.Markdown("#### Your feedback\nClick 👍 or 👎 under an answer. You can say why, too.")
            reason = gr.Radio([], label="Why?", visible=False, elem_id="reason")
            with gr.Accordion("✏️ Write a better answer", open=False):
                gr.Markdown("Improve the tutor's latest answer. It becomes an example the tutor learns from.")
                better = gr.Textbox(lines=6, show_label=False, elem_id="better")
                rewrite_btn = gr.Button("Save my better answer", elem_id="rewrite")
            gr.Markdown("<small>Conversations and feedback are stored to improve the tutor.</small>")
    return Page(state=state, badge=badge, chatbot=chatbot, panel=panel, boxes=boxes, choice=choice, order=order,
                pick_btn=pick_btn, message=message, send_btn=send_btn, k=k, compare_btn=compare_btn,
                new_btn=new_btn, reason=reason, better=better, rewrite_btn=rewrite_btn)


def _connect(service: TutorService, page: Page) -> None:
    """The handlers, closures over `page`, and the events that call them."""

    def ensure_conversation(state: dict) -> dict:
        if not state["conversation_id"]:
            state = {**state, "conversation_id": service.new_conversation("", "chat")["conversation_id"]}
        return state

    def send(message: str, history: list, state: dict):
        try:
            service.check_message(message)  # before a conversation row is created for nothing
        except UserError as exc:
            _fail(exc)
        state = ensure_conversation(state)
        stream = service.chat(state["conversation_id"], message)
        try:
            chunk = next(stream)  # validation happens here, before the page changes
        except UserError as exc:
            _fail(exc)
        history = history + [{"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
        ids = state["ids"] + [None, None]
        for chunk in itertools.chain([chunk], stream):  # lazily: each chunk reaches the page as it comes
            history[-1] = {"role": "assistant", "content": chunk["text"]}
            if chunk["done"]:
                ids[-1] = chunk["message_id"]
            yield {page.chatbot: history, page.state: {**state, "ids": ids}, page.message: "",
                   page.badge: _badge_html(service)}
        yield {page.chatbot: history, page.state: {**state, "ids": ids}, page.message: "",
               page.badge: _badge_html(service), page.better: gr.update(value=history[-1]["content"])}

    def compare(message: str, k: str, history: list, state: dict):
        try:
            service.check_message(message)
        except UserError as exc:
            _fail(exc)
        state = ensure_conversation(state)
        waiting = history + [{"role": "user", "content": message.strip()}]
        first, *others = page.boxes  # the first box holds the waiting note
        yield {page.chatbot: waiting, page.state: state, page.message: "", page.panel: gr.update(visible=True),
               first: gr.update(visible=True, value=f"*Writing {k} answers for you to compare…*"),
               **{box: gr.update(visible=False) for box in others},
               page.choice: gr.update(choices=[], value=None), page.order: gr.update(visible=False)}
        try:
            result = service.compare(state["conversation_id"], message, int(k))
        except UserError as exc:  # e.g. the tutor is busy: put the page back as it was, message included
            yield {page.chatbot: history, page.state: state, page.message: message,
                   page.panel: gr.update(visible=False)}
            _fail(exc)
        candidates = result["candidates"]
        state = {**state, "ids": state["ids"] + [None], "comparison": result}
        boxes = {box: gr.update(visible=False, value="") for box in page.boxes[len(candidates):]}
        boxes |= {box: gr.update(visible=True, value=f"**Answer {label}**\n\n{candidate['text']}")
                  for box, label, candidate in zip(page.boxes, LABELS, candidates)}
        choices = [(f"{LABELS[i]} is best", LABELS[i]) for i in range(len(candidates))]
        choices += [("They are equally good", "tie"), ("Both are bad", "both_bad")]
        yield {page.chatbot: waiting, page.state: state, page.message: "", page.panel: gr.update(visible=True),
               **boxes, page.choice: gr.update(choices=choices, value=None),
               page.order: gr.update(visible=len(candidates) > 2, value="")}

    def pick(choice: str | None, order: str, history: list, state: dict):
        comparison = state["comparison"]
        if not comparison:
            raise gr.Error("there is no open comparison")
        decision = (order or "").strip() or choice
        if not decision:
            raise gr.Error("choose the best answer first")
        try:
            winner = service.pick(comparison["comparison_id"], decision)["winner"]
        except UserError as exc:
            _fail(exc)
        text = next(c["text"] for c in comparison["candidates"] if c["message_id"] == winner)
        history = history + [{"role": "assistant", "content": text}]
        state = {**state, "ids": state["ids"] + [winner], "comparison": None}
        gr.Info("Thanks! The conversation goes on from the answer you chose.")
        return {page.chatbot: history, page.state: state, page.panel: gr.update(visible=False),
                page.better: gr.update(value=text)}

    def like(data: gr.LikeData, state: dict):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        message_id = state["ids"][index] if 0 <= index < len(state["ids"]) else None
        if not message_id:
            raise gr.Error("this answer is not saved yet; wait until it is complete")
        rating = "up" if data.liked in (True, "Like", "like") else "down"
        try:
            service.rate(message_id, rating, "")
        except UserError as exc:
            _fail(exc)
        reasons = REASONS_UP if rating == "up" else REASONS_DOWN
        label = "What was good about it? (optional)" if rating == "up" else "What went wrong? (optional)"
        return {page.state: {**state, "rated": {"message_id": message_id, "rating": rating}},
                page.reason: gr.update(visible=True, choices=list(reasons), value=None, label=label)}

    def give_reason(reason: str | None, state: dict):
        rated = state["rated"]
        if not reason or not rated:  # e.g. the radio was reset by `like`: nothing to store
            return {page.reason: gr.update()}
        try:  # a new row: feedback is append-only and the latest rating of a message counts
            service.rate(rated["message_id"], rated["rating"], reason)
        except UserError as exc:
            _fail(exc)
        gr.Info("Thanks for telling us why.")
        return {page.reason: gr.update(visible=False)}

    def rewrite(text: str, history: list, state: dict):
        last = max((i for i, m in enumerate(history) if m["role"] == "assistant" and state["ids"][i]), default=None)
        if last is None:
            raise gr.Error("there is no answer to improve yet")
        try:
            service.rewrite(state["ids"][last], text)
        except UserError as exc:
            _fail(exc)
        history = list(history)
        history[last] = {"role": "assistant", "content": text.strip()}
        gr.Info("Saved. The tutor will learn from your answer, and this conversation goes on from it.")
        return {page.chatbot: history}

    def new_conversation():
        return {page.chatbot: [], page.state: _empty_state(), page.panel: gr.update(visible=False),
                page.reason: gr.update(visible=False), page.message: "", page.badge: _badge_html(service)}

    def version_badge():
        return {page.badge: _badge_html(service)}

    # Each event's outputs are every component its handler's dicts may name.
    chat_outputs = [page.chatbot, page.state, page.message, page.badge, page.better]
    page.message.submit(send, [page.message, page.chatbot, page.state], chat_outputs, api_visibility="private")
    page.send_btn.click(send, [page.message, page.chatbot, page.state], chat_outputs, api_visibility="private")
    page.compare_btn.click(compare, [page.message, page.k, page.chatbot, page.state],
                           [page.chatbot, page.state, page.message, page.panel, *page.boxes, page.choice,
                            page.order], api_visibility="private")
    page.pick_btn.click(pick, [page.choice, page.order, page.chatbot, page.state],
                        [page.chatbot, page.state, page.panel, page.better], api_visibility="private")
    page.chatbot.like(like, [page.state], [page.state, page.reason], api_visibility="private")
    page.reason.change(give_reason, [page.reason, page.state], [page.reason], api_visibility="private")
    page.rewrite_btn.click(rewrite, [page.better, page.chatbot, page.state], [page.chatbot],
                           api_visibility="private")
    page.new_btn.click(new_conversation, None,
                       [page.chatbot, page.state, page.panel, page.reason, page.message, page.badge],
                       api_visibility="private")
    gr.Timer(10).tick(version_badge, None, [page.badge], api_visibility="private", show_progress="hidden")

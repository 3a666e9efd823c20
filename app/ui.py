"""The learner-facing page: chat with streaming, thumbs with reasons, compare mode, rewrites, past conversations.

`build_demo(service)` returns a gr.Blocks; all per-user state lives in gr.State, nothing global.
`_layout` builds the components into a `Page` first; `_connect` then defines the handlers as closures over
it. Every handler returns (or yields) a dict keyed by the components it updates, so a handler and the
`outputs=` of its event cannot drift apart by position: a component left out of the dict is left as it is.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from dataclasses import dataclass

import gradio as gr

from app.api import register_api, session_actor
from app.dashboard import build_tab
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
#conversations input {text-overflow: ellipsis; padding-right: 28px;}  /* clear of the arrow */
footer {display:none !important;}
"""
CONSENT_NOTICE = ("### Before you start\n"
                  "Your tutor learns from the conversations and the feedback of its learners. May we keep "
                  "yours to improve it? Names, e-mail addresses, phone numbers and addresses are removed "
                  "first. If you say no, you can still chat; nothing of yours is used for training. You "
                  "can download or delete your data at any time under *My data*.")
MAX_LISTED = 50  # the newest conversations in the dropdown; each label costs one history read
INTRO = ("Ask about maths, science, languages, programming or history. Your tutor explains step by step. "
         "Rate answers with 👍/👎, compare two answers, or write a better one: every piece of feedback "
         "helps the tutor improve.")


def _empty_state() -> dict:
    return {"conversation_id": None, "ids": [], "comparison": None, "rated": None}


def _fail(exc: UserError):
    raise gr.Error(str(exc), print_exception=False)


def _conversation_label(conversation: dict, first_message: str, me: str) -> str:
    """Start time (UTC), then the first question cut short; another user's conversation names its owner."""
    started = conversation["created_at"][:16].replace("T", " ")
    text = " ".join(first_message.split())
    text = text if len(text) <= 40 else text[:39] + "…"
    owner = "" if conversation["user"] == me else f"{conversation['user']}: "
    return f"{started} · {owner}{text}"


def _badge_html(service: TutorService) -> str:
    return f"<span class='version-badge'>Tutor model <b>{service.engine.version}</b></span>"


@dataclass
class Page:
    """The components of the page, the keys of the handlers' update dicts."""
    consent_panel: gr.Column
    consent_yes: gr.Button
    consent_no: gr.Button
    export_btn: gr.Button
    export_file: gr.File
    delete_conv_btn: gr.Button
    delete_all_btn: gr.Button
    delete_all_sure: gr.Checkbox
    state: gr.State
    badge: gr.HTML
    chatbot: gr.Chatbot
    panel: gr.Column
    boxes: list[gr.Markdown]  # one per candidate, in LABELS order
    choice: gr.Radio
    order: gr.Textbox
    pick_btn: gr.Button
    skip_btn: gr.Button
    message: gr.Textbox
    send_btn: gr.Button
    k: gr.Dropdown
    compare_btn: gr.Button
    new_btn: gr.Button
    reason: gr.Radio
    better: gr.Textbox
    rewrite_btn: gr.Button
    conversations: gr.Dropdown  # the user's past conversations (and, for a teacher, her learners')
    recheck_panel: gr.Column  # now and then: an earlier comparison asked again, order flipped
    recheck_question: gr.Markdown
    recheck_boxes: list[gr.Markdown]
    recheck_buttons: list[gr.Button]  # A, B, not now
    recheck_state: gr.State  # the comparison asked about


def build_demo(service: TutorService, login_required: bool = False, registry=None,
               retrain_command: list[str] | None = None) -> gr.Blocks:
    """The page; with the model registry, also the teachers' tab (app/dashboard.py), whose "Retrain now"
    runs `retrain_command` when given."""
    actor = session_actor(service, login_required)
    with gr.Blocks(title="Tutor", analytics_enabled=False) as demo:
        # First, so the contract's endpoint names are not taken by UI events.
        register_api(service, login_required=login_required)
        with gr.Tabs():
            with gr.Tab("Tutor", elem_id="tutor-tab"):
                page = _layout(_badge_html(service), login_required)
            if registry is not None:
                tab, show = build_tab(service, registry, actor, retrain_command)
        _connect(demo, service, page, actor)
        if registry is not None:
            demo.load(show, None, [tab], api_visibility="private", show_progress="hidden")
    return demo


def _layout(badge_html: str, login_required: bool) -> Page:
    state = gr.State(_empty_state())
    with gr.Row(elem_id="header"):
        gr.HTML("<div><h1>📚 Tutor</h1><p>Learn step by step, with a tutor that learns from you.</p></div>")
        with gr.Row():
            badge = gr.HTML(badge_html)
            if login_required:
                gr.Button("Log out", link="/logout", size="sm", scale=0, min_width=90, elem_id="logout")
    with gr.Column(visible=False, elem_id="consent-panel", elem_classes="compare-panel") as consent_panel:
        gr.Markdown(CONSENT_NOTICE)
        with gr.Row():
            consent_yes = gr.Button("Yes, use my feedback", variant="primary", elem_id="consent-yes")
            consent_no = gr.Button("No, just let me chat", elem_id="consent-no")
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
                order = gr.Textbox(label="Or rank them all, best first (e.g. C,A,B; equally good ones share a place: C,A=B)",
                                   visible=False)
                with gr.Row():
                    pick_btn = gr.Button("Submit my choice", variant="primary", elem_id="pick", scale=3)
                    skip_btn = gr.Button("Skip", elem_id="skip", scale=1)
            with gr.Column(visible=False, elem_id="recheck-panel", elem_classes="compare-panel") as recheck_panel:
                gr.Markdown("### A quick second look\nYou compared answers like these before. Which one is better?")
                recheck_question = gr.Markdown()
                with gr.Row():
                    recheck_boxes = [gr.Markdown(elem_classes="candidate") for _ in "AB"]
                with gr.Row():
                    recheck_buttons = [gr.Button("A is better", elem_id="recheck-a"),
                                       gr.Button("B is better", elem_id="recheck-b"),
                                       gr.Button("Not now", elem_id="recheck-skip")]
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
            conversations = gr.Dropdown([], value=None, label="Your conversations", visible=login_required,
                                        elem_id="conversations", interactive=True)
            gr.Markdown("#### Your feedback\nClick 👍 or 👎 under an answer. You can say why, too.")
            reason = gr.Radio([], label="Why?", visible=False, elem_id="reason")
            with gr.Accordion("✏️ Write a better answer", open=False):
                gr.Markdown("Improve the tutor's latest answer. It becomes an example the tutor learns from.")
                better = gr.Textbox(lines=6, show_label=False, elem_id="better")
                rewrite_btn = gr.Button("Save my better answer", elem_id="rewrite")
            with gr.Accordion("🗂️ My data", open=False):
                gr.Markdown("Download everything you wrote and rated, or delete it for good.")
                export_btn = gr.Button("Download my data (JSONL)", elem_id="export")
                export_file = gr.File(label="Your data", visible=False, interactive=False, elem_id="export-file")
                delete_conv_btn = gr.Button("Delete this conversation", elem_id="delete-conversation")
                delete_all_sure = gr.Checkbox(label="Yes, delete everything", value=False, elem_id="delete-sure")
                delete_all_btn = gr.Button("Delete all my data", variant="stop", elem_id="delete-all")
            gr.Markdown("<small>Conversations and feedback are stored to improve the tutor, unless you said "
                        "no. Personal details are removed before anything is used for training.</small>")
    return Page(consent_panel=consent_panel, consent_yes=consent_yes, consent_no=consent_no,
                export_btn=export_btn, export_file=export_file, delete_conv_btn=delete_conv_btn, delete_all_btn=delete_all_btn,
                delete_all_sure=delete_all_sure,
                state=state, badge=badge, chatbot=chatbot, panel=panel, boxes=boxes, choice=choice, order=order,
                pick_btn=pick_btn, skip_btn=skip_btn, message=message, send_btn=send_btn, k=k, compare_btn=compare_btn,
                new_btn=new_btn, reason=reason, better=better, rewrite_btn=rewrite_btn,
                conversations=conversations, recheck_panel=recheck_panel, recheck_question=recheck_question,
                recheck_boxes=recheck_boxes, recheck_buttons=recheck_buttons, recheck_state=gr.State(None))


def _connect(demo: gr.Blocks, service: TutorService, page: Page, actor) -> None:
    """The handlers, closures over `page`, and the events that call them. Each takes the session's
    account from its `gr.Request`, never from the page."""

    def me(request: gr.Request):
        try:
            return actor(request)
        except UserError as exc:
            _fail(exc)

    def ensure_conversation(state: dict, request: gr.Request) -> dict:
        if not state["conversation_id"]:
            try:
                created = service.new_conversation(me(request), "", "chat")
            except UserError as exc:
                _fail(exc)
            state = {**state, "conversation_id": created["conversation_id"]}
        return state

    def send(message: str, history: list, state: dict, request: gr.Request):
        try:
            service.check_message(message)  # before a conversation row is created for nothing
        except UserError as exc:
            _fail(exc)
        if state["conversation_id"] and not state["comparison"]:
            try:
                offered = service.offers_comparison(me(request), state["conversation_id"])
            except UserError as exc:
                _fail(exc)
            if offered:  # now and then the app asks for a choice instead of giving one answer
                try:
                    yield from compare(message, "2", history, state, request, offered=True)
                    return
                except gr.Error:  # e.g. the tutor is busy, or the quota ran out since: one answer, as asked
                    pass
        state = ensure_conversation(state, request)
        stream = service.chat(me(request), state["conversation_id"], message)
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

    def show_comparison(result: dict, chatbot: list, state: dict) -> dict:
        """The panel with each candidate's text so far; the choice only once all are complete."""
        candidates, done = result["candidates"], result.get("done", True)
        boxes = {box: gr.update(visible=False, value="") for box in page.boxes[len(candidates):]}
        boxes |= {box: gr.update(visible=True, value=f"**Answer {label}**\n\n{c['text'] or '…'}")
                  for box, label, c in zip(page.boxes, LABELS, candidates)}
        choices = [(f"{LABELS[i]} is best", LABELS[i]) for i in range(len(candidates))]
        choices += [("They are equally good", "tie"), ("Both are bad", "both_bad")]
        return {page.chatbot: chatbot, page.state: {**state, "comparison": result if done else None},
                page.message: "", page.panel: gr.update(visible=True), **boxes,
                page.choice: gr.update(choices=choices if done else [], value=None, interactive=done),
                page.order: gr.update(visible=done and len(candidates) > 2, value=""),
                page.pick_btn: gr.update(interactive=done), page.skip_btn: gr.update(interactive=done)}

    def compare(message: str, k: str, history: list, state: dict, request: gr.Request, offered: bool = False):
        try:
            service.check_message(message)
        except UserError as exc:
            _fail(exc)
        state = ensure_conversation(state, request)
        waiting = history + [{"role": "user", "content": message.strip()}]
        note = {"comparison_id": None, "done": False, "candidates": [{"text": ""} for _ in range(int(k))]}
        if not offered:  # asked for: the empty panel at once; an offer waits until the tutor has taken the turn
            yield show_comparison(note, waiting, state)
        try:  # both answers grow side by side; leaving the page stops all of them and stores nothing
            for n, chunk in enumerate(service.compare_stream(me(request), state["conversation_id"], message,
                                                             int(k), offered=offered)):
                if offered and n == 0:  # announced only now: a busy tutor gives one answer without a word
                    gr.Info("Two answers this time: pick the one that helps you learn best, or skip.")
                if chunk["done"]:
                    state = {**state, "ids": state["ids"] + [None]}
                    chunk = {**chunk, "offered": offered, "question": message.strip()}
                yield show_comparison(chunk, waiting, state)
        except UserError as exc:  # e.g. the tutor is busy: put the page back as it was, message included
            yield {page.chatbot: history, page.state: state, page.message: message,
                   page.panel: gr.update(visible=False)}
            _fail(exc)

    def skip(history: list, state: dict, request: gr.Request):
        comparison = state["comparison"]
        if not comparison:
            raise gr.Error("there is no open comparison")
        try:
            service.abandon(me(request), comparison["comparison_id"])
        except UserError as exc:
            _fail(exc)
        ids = state["ids"][:-1]  # the question leaves the conversation with its answers
        page_now = {page.chatbot: history[:-1], page.state: {**state, "ids": ids, "comparison": None},
                    page.panel: gr.update(visible=False)}
        if comparison.get("offered"):  # the learner sent it for one answer: it waits in the box for them
            gr.Info("Skipped. Your question is back in the box: press Send for one answer.")
            return {**page_now, page.message: comparison["question"]}
        return page_now

    def ask_again(actor, just_decided: str) -> dict:
        """Now and then after a pick: an earlier two-answer comparison, order flipped."""
        recheck = service.recheck_after_pick(actor, just_decided)
        if recheck is None:
            return {page.recheck_panel: gr.update(visible=False)}
        question = next((m["content"] for m in reversed(recheck["context"]) if m["role"] == "user"), "")
        return {page.recheck_panel: gr.update(visible=True),
                page.recheck_question: f"**The question was:** {question}",
                **{box: f"**Answer {c['label']}**\n\n{c['text']}" for box, c in zip(page.recheck_boxes,
                                                                                 recheck["candidates"])},
                page.recheck_state: recheck["comparison_id"]}

    def answer_again(choice: str):
        def handler(comparison_id: str | None, request: gr.Request):
            if comparison_id and choice:
                try:
                    service.answer_recheck(me(request), comparison_id, choice)
                except UserError as exc:
                    _fail(exc)
                gr.Info("Thank you: that helps us trust the feedback.")
            return {page.recheck_panel: gr.update(visible=False), page.recheck_state: None}
        return handler

    def pick(choice: str | None, order: str, history: list, state: dict, request: gr.Request):
        comparison = state["comparison"]
        if not comparison:
            raise gr.Error("there is no open comparison")
        decision = (order or "").strip() or choice
        if not decision:
            raise gr.Error("choose the best answer first")
        try:
            winner = service.pick(me(request), comparison["comparison_id"], decision)["winner"]
        except UserError as exc:
            _fail(exc)
        text = next(c["text"] for c in comparison["candidates"] if c["message_id"] == winner)
        history = history + [{"role": "assistant", "content": text}]
        state = {**state, "ids": state["ids"] + [winner], "comparison": None}
        gr.Info("Thanks! The conversation goes on from the answer you chose.")
        return {page.chatbot: history, page.state: state, page.panel: gr.update(visible=False),
                page.better: gr.update(value=text), **ask_again(me(request), comparison["comparison_id"])}

    def like(data: gr.LikeData, state: dict, request: gr.Request):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        message_id = state["ids"][index] if 0 <= index < len(state["ids"]) else None
        if not message_id:
            raise gr.Error("this answer is not saved yet; wait until it is complete")
        rating = "up" if data.liked in (True, "Like", "like") else "down"
        try:
            service.rate(me(request), message_id, rating, "")
        except UserError as exc:
            _fail(exc)
        reasons = REASONS_UP if rating == "up" else REASONS_DOWN
        label = "What was good about it? (optional)" if rating == "up" else "What went wrong? (optional)"
        return {page.state: {**state, "rated": {"message_id": message_id, "rating": rating}},
                page.reason: gr.update(visible=True, choices=list(reasons), value=None, label=label)}

    def give_reason(reason: str | None, state: dict, request: gr.Request):
        rated = state["rated"]
        if not reason or not rated:  # e.g. the radio was reset by `like`: nothing to store
            return {page.reason: gr.update()}
        try:  # a new row: feedback is append-only and the latest rating of a message counts
            service.rate(me(request), rated["message_id"], rated["rating"], reason)
        except UserError as exc:
            _fail(exc)
        gr.Info("Thanks for telling us why.")
        return {page.reason: gr.update(visible=False)}

    def rewrite(text: str, history: list, state: dict, request: gr.Request):
        last = max((i for i, m in enumerate(history) if m["role"] == "assistant" and state["ids"][i]), default=None)
        if last is None:
            raise gr.Error("there is no answer to improve yet")
        try:
            service.rewrite(me(request), state["ids"][last], text)
        except UserError as exc:
            _fail(exc)
        history = list(history)
        history[last] = {"role": "assistant", "content": text.strip()}
        gr.Info("Saved. The tutor will learn from your answer, and this conversation goes on from it.")
        return {page.chatbot: history}

    def new_conversation():
        return {page.chatbot: [], page.state: _empty_state(), page.panel: gr.update(visible=False),
                page.reason: gr.update(visible=False), page.message: "", page.badge: _badge_html(service)}

    def list_conversations(state: dict, request: gr.Request):
        """The dropdown's choices, newest first, with the open conversation selected if it is listed."""
        actor = me(request)
        if actor.is_local:  # one local user: no accounts, no list
            return {page.conversations: gr.update()}
        choices = []
        for conversation in reversed(service.conversations(actor)[-MAX_LISTED:]):
            if not conversation["turns"]:
                continue  # created, then nothing was said in it
            try:
                first = next((m["content"] for m in service.history(actor, conversation["conversation_id"])
                              if m["role"] == "user"), "")
            except UserError:  # deleted since it was listed
                continue
            choices.append((_conversation_label(conversation, first, actor.name), conversation["conversation_id"]))
        selected = state["conversation_id"] if state["conversation_id"] in {c[1] for c in choices} else None
        return {page.conversations: gr.update(choices=choices, value=selected)}

    def open_conversation(conversation_id: str | None, request: gr.Request):
        if not conversation_id:
            return {page.chatbot: gr.update()}
        try:  # a conversation the user may not read is refused like an unknown one, and nothing is shown
            messages = service.history(me(request), conversation_id)
        except UserError as exc:  # a notice, not gr.Error: that would mark every output, the textbox too
            gr.Warning(str(exc))
            return {page.chatbot: gr.update()}
        history = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = [m["message_id"] if m["role"] == "assistant" else None for m in messages]
        latest = next((m["content"] for m in reversed(history) if m["role"] == "assistant"), "")
        state = {**_empty_state(), "conversation_id": conversation_id, "ids": ids}
        opened = {**new_conversation(), page.chatbot: history, page.better: gr.update(value=latest), page.state: state}
        try:
            waiting = service.open_comparison(me(request), conversation_id)
        except UserError:  # a teacher reading a learner's conversation: only its owner may pick
            waiting = None
        if waiting:  # left undecided last time: pick now or skip it
            opened |= show_comparison(waiting, history, state)
        return opened

    def load_page(request: gr.Request):
        """The consent notice if it is unanswered, and the conversation `?conversation=<id>` names."""
        return {**ask_consent(request), **open_conversation(request.query_params.get("conversation"), request)}

    def version_badge():
        return {page.badge: _badge_html(service)}

    def ask_consent(request: gr.Request):
        return {page.consent_panel: gr.update(visible=service.consent(me(request)) is None)}

    def give_consent(choice: str):
        def handler(request: gr.Request):
            service.set_consent(me(request), choice)
            gr.Info("Thank you. You can change your mind under My data." if choice == "given" else
                    "Understood: you can chat, and nothing of yours is used for training.")
            return {page.consent_panel: gr.update(visible=False)}
        return handler

    def export(request: gr.Request):
        records = service.export_data(me(request))
        folder = tempfile.mkdtemp(prefix="tutor-export-")
        path = os.path.join(folder, "my_tutor_data.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return {page.export_file: gr.update(value=path, visible=True)}

    def delete_conversation(state: dict, request: gr.Request):
        if not state["conversation_id"]:
            raise gr.Error("there is no conversation to delete yet")
        try:
            service.delete_conversation(me(request), state["conversation_id"])
        except UserError as exc:
            _fail(exc)
        gr.Info("This conversation is deleted.")
        return new_conversation()

    def delete_all(sure: bool, request: gr.Request):
        if not sure:
            raise gr.Error("tick 'Yes, delete everything' first")
        result = service.delete_user_data(me(request))
        gr.Info(f"Deleted {result['deleted_conversations']} conversation(s) and all feedback on them.")
        return {**new_conversation(), page.delete_all_sure: False}

    # Each event's outputs are every component its handler's dicts may name.
    chat_outputs = [page.chatbot, page.state, page.message, page.badge, page.better]
    fresh_page = [page.chatbot, page.state, page.panel, page.reason, page.message, page.badge]
    opened = fresh_page + [page.better, *page.boxes, page.choice, page.order, page.pick_btn, page.skip_btn]

    def relist(event) -> None:
        """The dropdown follows every event that starts, fills, opens or ends a conversation."""
        event.success(list_conversations, [page.state], [page.conversations], api_visibility="private",
                      show_progress="hidden")

    comparison_outputs = [page.chatbot, page.state, page.message, page.panel, *page.boxes, page.choice,
                          page.order, page.pick_btn, page.skip_btn]
    sent_outputs = list(dict.fromkeys(chat_outputs + comparison_outputs))  # a message may become a comparison
    relist(page.message.submit(send, [page.message, page.chatbot, page.state], sent_outputs,
                               api_visibility="private"))
    relist(page.send_btn.click(send, [page.message, page.chatbot, page.state], sent_outputs,
                               api_visibility="private"))
    page.conversations.input(open_conversation, [page.conversations], opened, api_visibility="private")
    page.compare_btn.click(compare, [page.message, page.k, page.chatbot, page.state], comparison_outputs,
                           api_visibility="private", show_progress="hidden")
    page.skip_btn.click(skip, [page.chatbot, page.state], [page.chatbot, page.state, page.panel, page.message],
                        api_visibility="private")
    relist(page.pick_btn.click(pick, [page.choice, page.order, page.chatbot, page.state],
                               [page.chatbot, page.state, page.panel, page.better, page.recheck_panel,
                                page.recheck_question, *page.recheck_boxes, page.recheck_state],
                               api_visibility="private"))
    for button, choice in zip(page.recheck_buttons, ("A", "B", "")):
        button.click(answer_again(choice), [page.recheck_state], [page.recheck_panel, page.recheck_state],
                     api_visibility="private")
    page.chatbot.like(like, [page.state], [page.state, page.reason], api_visibility="private")
    page.reason.change(give_reason, [page.reason, page.state], [page.reason], api_visibility="private")
    page.rewrite_btn.click(rewrite, [page.better, page.chatbot, page.state], [page.chatbot],
                           api_visibility="private")
    relist(page.new_btn.click(new_conversation, None, fresh_page, api_visibility="private"))
    page.consent_yes.click(give_consent("given"), None, [page.consent_panel], api_visibility="private")
    page.consent_no.click(give_consent("declined"), None, [page.consent_panel], api_visibility="private")
    page.export_btn.click(export, None, [page.export_file], api_visibility="private")
    relist(page.delete_conv_btn.click(delete_conversation, [page.state], fresh_page, api_visibility="private"))
    relist(page.delete_all_btn.click(delete_all, [page.delete_all_sure], fresh_page + [page.delete_all_sure],
                                     api_visibility="private"))
    relist(demo.load(load_page, None, [page.consent_panel, *opened], api_visibility="private",
                     show_progress="hidden"))
    gr.Timer(10).tick(version_badge, None, [page.badge], api_visibility="private", show_progress="hidden")

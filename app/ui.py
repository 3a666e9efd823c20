"""The learner-facing page: chat with streaming, thumbs with reasons, compare mode, rewrites.

`build_demo(service)` returns a gr.Blocks; all per-user state lives in gr.State, nothing global.
"""
from __future__ import annotations

import itertools

import gradio as gr

from app.api import register_api
from app.service import REASONS_DOWN, REASONS_UP, TutorService, UserError

LABELS = "ABCD"
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


def build_demo(service: TutorService) -> gr.Blocks:
    def version_badge() -> str:
        return f"<span class='version-badge'>Tutor model <b>{service.engine.version}</b></span>"

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
            yield history, {**state, "ids": ids}, "", version_badge(), gr.update()
        yield history, {**state, "ids": ids}, "", version_badge(), gr.update(value=history[-1]["content"])

    def compare(message: str, k: str, history: list, state: dict):
        try:
            service.check_message(message)
        except UserError as exc:
            _fail(exc)
        state = ensure_conversation(state)
        waiting = history + [{"role": "user", "content": message.strip()}]
        note = gr.update(visible=True, value=f"*Writing {k} answers for you to compare…*")
        yield (waiting, state, "", gr.update(visible=True), note, *[gr.update(visible=False)] * 3,
               gr.update(choices=[], value=None), gr.update(visible=False))
        try:
            result = service.compare(state["conversation_id"], message, int(k))
        except UserError as exc:  # e.g. the tutor is busy: put the page back as it was, message included
            yield (history, state, message, gr.update(visible=False), *[gr.update()] * 4, gr.update(), gr.update())
            _fail(exc)
        candidates = result["candidates"]
        history = waiting
        state = {**state, "ids": state["ids"] + [None], "comparison": result}
        boxes = [gr.update(visible=i < len(candidates),
                           value=f"**Answer {LABELS[i]}**\n\n{candidates[i]['text']}" if i < len(candidates) else "")
                 for i in range(4)]
        choices = [(f"{LABELS[i]} is best", LABELS[i]) for i in range(len(candidates))]
        choices += [("They are equally good", "tie"), ("Both are bad", "both_bad")]
        yield (history, state, "", gr.update(visible=True), *boxes,
               gr.update(choices=choices, value=None), gr.update(visible=len(candidates) > 2, value=""))

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
        return history, state, gr.update(visible=False), gr.update(value=text)

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
        return {**state, "rated": {"message_id": message_id, "rating": rating}}, gr.update(
            visible=True, choices=list(reasons), value=None, label=label)

    def give_reason(reason: str | None, state: dict):
        rated = state["rated"]
        if not reason or not rated:
            return gr.update()
        try:  # a new row: feedback is append-only and the latest rating of a message counts
            service.rate(rated["message_id"], rated["rating"], reason)
        except UserError as exc:
            _fail(exc)
        gr.Info("Thanks for telling us why.")
        return gr.update(visible=False)

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
        return history

    def new_conversation():
        return [], _empty_state(), gr.update(visible=False), gr.update(visible=False), "", version_badge()

    with gr.Blocks(title="Tutor") as demo:
        register_api(service)  # first, so the contract's endpoint names are not taken by UI events
        state = gr.State(_empty_state())
        with gr.Row(elem_id="header"):
            gr.HTML("<div><h1>📚 Tutor</h1><p>Learn step by step, with a tutor that learns from you.</p></div>")
            badge = gr.HTML(version_badge())
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chatbot", height="60vh", show_label=False, layout="bubble",
                                     placeholder=f"**Welcome!** {INTRO}", buttons=["copy"],
                                     feedback_options=("Like", "Dislike"))
                # Right under the chat, where the learner is looking, not below the input.
                with gr.Column(visible=False, elem_id="compare-panel", elem_classes="compare-panel") as panel:
                    gr.Markdown("### Which answer helps you learn best?")
                    with gr.Row():
                        boxes = [gr.Markdown(elem_classes="candidate", visible=False) for _ in range(4)]
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

        outputs = [chatbot, state, message, badge, better]
        message.submit(send, [message, chatbot, state], outputs, api_visibility="private")
        send_btn.click(send, [message, chatbot, state], outputs, api_visibility="private")
        compare_btn.click(compare, [message, k, chatbot, state],
                          [chatbot, state, message, panel, *boxes, choice, order], api_visibility="private")
        pick_btn.click(pick, [choice, order, chatbot, state], [chatbot, state, panel, better],
                       api_visibility="private")
        chatbot.like(like, [state], [state, reason], api_visibility="private")
        reason.change(give_reason, [reason, state], [reason], api_visibility="private")
        rewrite_btn.click(rewrite, [better, chatbot, state], [chatbot], api_visibility="private")
        new_btn.click(new_conversation, None, [chatbot, state, panel, reason, message, badge],
                      api_visibility="private")
        gr.Timer(10).tick(version_badge, None, badge, api_visibility="private", show_progress="hidden")
    return demo

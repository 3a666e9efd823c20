"""The named API endpoints of CONTRACT.md, registered on a Blocks with `gr.api`.

Each endpoint is a thin typed wrapper over TutorService; a UserError becomes a `gr.Error` whose
message the client sees as is.
"""
from __future__ import annotations

import functools
import inspect
from typing import Iterator

import gradio as gr

from app.accounts import LOCAL, Account
from app.service import TutorService, UserError


def as_gradio_error(fn):
    """Turns UserError into gr.Error for plain functions and generators alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def session_actor(service: TutorService, login_required: bool):
    """The account of a request's session: the one local user when the server has no accounts."""
    def actor(request: gr.Request | None) -> Account:
        if not login_required:
            return LOCAL
        account = service.accounts.get(getattr(request, "username", None))
        if account is None:  # not logged in, or the account was disabled since
            raise UserError("please log in first")
        return account
    return actor


def register_api(service: TutorService, login_required: bool = False, concurrency_limit: int | None = 64) -> None:
    """Must be called inside a `gr.Blocks` context. No endpoint takes a user from its arguments:
    the session's account is the user (with accounts), and every id is checked against it."""
    actor = session_actor(service, login_required)

    @as_gradio_error
    def new_conversation(user: str = "", purpose: str = "chat", request: gr.Request = None) -> dict:
        return service.new_conversation(actor(request), user, purpose)

    @as_gradio_error
    def chat(conversation_id: str, message: str, request: gr.Request = None) -> Iterator[dict]:
        yield from service.chat(actor(request), conversation_id, message)

    @as_gradio_error
    def compare(conversation_id: str, message: str, k: int = 2, request: gr.Request = None) -> dict:
        return service.compare(actor(request), conversation_id, message, k)

    @as_gradio_error
    def pick(comparison_id: str, choice: str, request: gr.Request = None) -> dict:
        return service.pick(actor(request), comparison_id, choice)

    @as_gradio_error
    def rate(message_id: str, rating: str, reason: str = "", request: gr.Request = None) -> dict:
        return service.rate(actor(request), message_id, rating, reason)

    @as_gradio_error
    def rewrite(message_id: str, text: str, request: gr.Request = None) -> dict:
        return service.rewrite(actor(request), message_id, text)

    @as_gradio_error
    def status(request: gr.Request = None) -> dict:
        return service.status(actor(request))

    @as_gradio_error
    def history(conversation_id: str, request: gr.Request = None) -> list:
        return service.history(actor(request), conversation_id)

    @as_gradio_error
    def conversations(request: gr.Request = None) -> list:
        return service.conversations(actor(request))

    @as_gradio_error
    def consent(choice: str, request: gr.Request = None) -> dict:
        return service.set_consent(actor(request), choice)

    @as_gradio_error
    def export_data(user: str = "", request: gr.Request = None) -> list:
        return service.export_data(actor(request), user)

    @as_gradio_error
    def delete_conversation(conversation_id: str, request: gr.Request = None) -> dict:
        return service.delete_conversation(actor(request), conversation_id)

    @as_gradio_error
    def delete_data(user: str = "", confirm: str = "", request: gr.Request = None) -> dict:
        if confirm != "delete":  # a whole user's data goes only when the caller says so in words
            raise UserError("to delete all data, pass confirm='delete'")
        return service.delete_user_data(actor(request), user)

    @as_gradio_error
    def exclude(kind: str, target: str, reason: str = "", request: gr.Request = None) -> dict:
        return service.exclude(actor(request), kind, target, reason)

    @as_gradio_error
    def recheck(request: gr.Request = None) -> dict:
        return service.recheck(actor(request)) or {}

    @as_gradio_error
    def answer_recheck(comparison_id: str, choice: str, request: gr.Request = None) -> dict:
        return service.answer_recheck(actor(request), comparison_id, choice)

    for fn in (new_conversation, chat, compare, pick, rate, rewrite, status, history, conversations, consent,
               export_data, delete_conversation, delete_data, exclude, recheck, answer_recheck):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=concurrency_limit)

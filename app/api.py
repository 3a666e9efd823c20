"""The named API endpoints of CONTRACT.md, registered on a Blocks with `gr.api`.

Each endpoint is a thin typed wrapper over TutorService; a UserError becomes a `gr.Error` whose
message the client sees as is. `gr.api` passes the request's JSON through unchecked, so `typed`
checks every argument against the endpoint's annotation before any work: a number, a list, a
lone surrogate or a megabyte where a string belongs gets a clear error, never an internal one.
"""
from __future__ import annotations

import functools
import inspect
from typing import Iterator

import gradio as gr

from app.accounts import LOCAL, Account
from app.service import TutorService, UserError


MAX_ARGUMENT_CHARS = 20_000  # beyond any field's own limit (the service's are smaller): refused unread


def _check_argument(name: str, value, kind) -> object:
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string, not {type(value).__name__}")
        if len(value) > MAX_ARGUMENT_CHARS:
            raise UserError(f"{name} is longer than {MAX_ARGUMENT_CHARS:,} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no valid text can hold it
            raise UserError(f"{name} is not valid text (it holds a broken character)") from None
        if "\x00" in value:
            raise UserError(f"{name} must not contain NUL characters")
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{name} must be a whole number, not {type(value).__name__}")
    return value


def typed(fn):
    """Checks each argument of `fn` against its str/int annotation before calling it."""
    signature = inspect.signature(fn)
    kinds = {name: {"str": str, "int": int}.get(p.annotation, p.annotation)
             for name, p in signature.parameters.items()}

    def checked(args, kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if kinds[name] in (str, int):
                bound.arguments[name] = _check_argument(name, value, kinds[name])
        return bound.args, bound.kwargs

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            args, kwargs = checked(args, kwargs)
            yield from fn(*args, **kwargs)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = checked(args, kwargs)
        return fn(*args, **kwargs)
    return wrapper


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

    def new_conversation(user: str = "", purpose: str = "chat", request: gr.Request = None) -> dict:
        return service.new_conversation(actor(request), user, purpose)

    def chat(conversation_id: str, message: str, request: gr.Request = None) -> Iterator[dict]:
        yield from service.chat(actor(request), conversation_id, message)

    def compare(conversation_id: str, message: str, k: int = 2, request: gr.Request = None) -> Iterator[dict]:
        yield from service.compare_stream(actor(request), conversation_id, message, k)

    def abandon(comparison_id: str, request: gr.Request = None) -> dict:
        return service.abandon(actor(request), comparison_id)

    def pick(comparison_id: str, choice: str, request: gr.Request = None) -> dict:
        return service.pick(actor(request), comparison_id, choice)

    def rate(message_id: str, rating: str, reason: str = "", request: gr.Request = None) -> dict:
        return service.rate(actor(request), message_id, rating, reason)

    def rewrite(message_id: str, text: str, request: gr.Request = None) -> dict:
        return service.rewrite(actor(request), message_id, text)

    def status(request: gr.Request = None) -> dict:
        return service.status(actor(request))

    def history(conversation_id: str, request: gr.Request = None) -> list:
        return service.history(actor(request), conversation_id)

    def conversations(request: gr.Request = None) -> list:
        return service.conversations(actor(request))

    def consent(choice: str, request: gr.Request = None) -> dict:
        return service.set_consent(actor(request), choice)

    def export_data(user: str = "", request: gr.Request = None) -> list:
        return service.export_data(actor(request), user)

    def delete_conversation(conversation_id: str, request: gr.Request = None) -> dict:
        return service.delete_conversation(actor(request), conversation_id)

    def delete_data(user: str = "", confirm: str = "", request: gr.Request = None) -> dict:
        if confirm != "delete":  # a whole user's data goes only when the caller says so in words
            raise UserError("to delete all data, pass confirm='delete'")
        return service.delete_user_data(actor(request), user)

    def exclude(kind: str, target: str, reason: str = "", request: gr.Request = None) -> dict:
        return service.exclude(actor(request), kind, target, reason)

    def recheck(request: gr.Request = None) -> dict:
        return service.recheck(actor(request)) or {}

    def answer_recheck(comparison_id: str, choice: str, request: gr.Request = None) -> dict:
        return service.answer_recheck(actor(request), comparison_id, choice)

    for fn in (new_conversation, chat, compare, abandon, pick, rate, rewrite, status, history, conversations, consent,
               export_data, delete_conversation, delete_data, exclude, recheck, answer_recheck):
        gr.api(as_gradio_error(typed(fn)), api_name=fn.__name__, concurrency_limit=concurrency_limit)

"""The named API endpoints of CONTRACT.md, registered on a Blocks with `gr.api`.

Each endpoint is a thin typed wrapper over TutorService; a UserError becomes a `gr.Error` whose
message the client sees as is.
"""
from __future__ import annotations

import functools
import inspect
from typing import Iterator

import gradio as gr

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


def register_api(service: TutorService, concurrency_limit: int | None = 64) -> None:
    """Must be called inside a `gr.Blocks` context."""

    @as_gradio_error
    def new_conversation(user: str = "", purpose: str = "chat") -> dict:
        return service.new_conversation(user, purpose)

    @as_gradio_error
    def chat(conversation_id: str, message: str) -> Iterator[dict]:
        yield from service.chat(conversation_id, message)

    @as_gradio_error
    def compare(conversation_id: str, message: str, k: int = 2) -> dict:
        return service.compare(conversation_id, message, k)

    @as_gradio_error
    def pick(comparison_id: str, choice: str) -> dict:
        return service.pick(comparison_id, choice)

    @as_gradio_error
    def rate(message_id: str, rating: str, reason: str = "") -> dict:
        return service.rate(message_id, rating, reason)

    @as_gradio_error
    def rewrite(message_id: str, text: str) -> dict:
        return service.rewrite(message_id, text)

    def status() -> dict:
        return service.status()

    for fn in (new_conversation, chat, compare, pick, rate, rewrite, status):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=concurrency_limit)

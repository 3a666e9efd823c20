"""What the endpoints do, independent of Gradio: validate, generate, store.

Every check runs before the first write, so bad input raises `UserError` and leaves the database
as it was. A reply is stored (user turn and answer together, in one transaction) only once it is
complete; a client that goes away mid-reply cancels its generation and leaves no half turn behind.
"""
from __future__ import annotations

import random
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from app.engine import EngineBusy, GenerationEngine
from core.chat_format import TUTOR_SYSTEM_PROMPT, PromptTooLong
from app.store import Store

PURPOSES = ("chat", "eval")
RATINGS = ("up", "down")
# Offered by the UI; /rate also accepts free text up to MAX_REASON_CHARS.
REASONS_DOWN = ("wrong", "unclear", "gave the answer away", "too long", "off-topic", "other")
REASONS_UP = ("clear", "encouraging", "good hint", "good example")


class UserError(ValueError):
    """Bad input or a request that cannot be served now; the message is shown to the user as is."""


@dataclass
class Limits:
    max_message_chars: int = 4000  # a long question fits easily; a pasted book does not
    max_reason_chars: int = 500
    max_rewrite_chars: int = 8000
    max_user_chars: int = 200
    max_candidates: int = 4


class TutorService:
    def __init__(self, store: Store, engine: GenerationEngine, limits: Limits | None = None,
                 system_prompt: str = TUTOR_SYSTEM_PROMPT, rng: random.Random | None = None) -> None:
        self.store, self.engine = store, engine
        self.limits = limits or Limits()
        self.system_prompt = system_prompt
        self.rng = rng or random.Random()
        self._busy: set[str] = set()  # conversations with a reply being written
        self._busy_lock = threading.Lock()

    # -- conversations ---------------------------------------------------------------------------
    def new_conversation(self, user: str = "", purpose: str = "chat") -> dict:
        if purpose not in PURPOSES:
            raise UserError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
        if len(user or "") > self.limits.max_user_chars:
            raise UserError(f"user name is longer than {self.limits.max_user_chars} characters")
        return {"conversation_id": self.store.new_conversation(user or "", purpose, self.system_prompt)}

    def chat(self, conversation_id: str, message: str) -> Iterator[dict]:
        """Streams {"message_id", "text", "model_version", "done"}; `text` is the reply so far."""
        message = self.check_message(message)
        messages = self._context(conversation_id, message)
        with self._turn(conversation_id):
            request = self._submit(messages)
            message_id = uuid.uuid4().hex
            tokens: list[int] = []
            try:
                with as_user_error(PromptTooLong):  # the engine finds that the prompt cannot fit
                    for chunk in request.token_chunks():
                        tokens.extend(chunk)
                        text = _decode(request, tokens)
                        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                            continue
                        yield {"message_id": message_id, "text": text,
                               "model_version": request.model_version, "done": False}
            finally:
                request.cancel()  # no-op when finished; stops the row when the client went away
            if request.finish_reason == "cancelled":
                return
            text = _decode(request, tokens)
            self.store.add_turn(conversation_id, message, text, message_id=message_id,
                                model_version=request.model_version, generation=self._generation(request),
                                context=request.context)
            yield {"message_id": message_id, "text": text, "model_version": request.model_version, "done": True}

    def compare(self, conversation_id: str, message: str, k: int = 2) -> dict:
        """k answers to the same turn, sampled in one batch, stored in random order until picked."""
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= self.limits.max_candidates:
            raise UserError(f"k must be a whole number from 2 to {self.limits.max_candidates}, not {k!r}")
        message = self.check_message(message)
        messages = self._context(conversation_id, message)
        with self._turn(conversation_id):
            requests = [self._submit(messages) for _ in range(k)]
            try:
                with as_user_error(PromptTooLong):
                    texts = [_decode(r, list(r.tokens())) for r in requests]
            finally:
                for r in requests:
                    r.cancel()
            candidates = [{"text": t, "model_version": r.model_version, "generation": self._generation(r),
                           "context": r.context} for t, r in zip(texts, requests)]
            self.rng.shuffle(candidates)
            comparison_id, ids = self.store.add_comparison(conversation_id, message, requests[0].context, candidates)
        return {"comparison_id": comparison_id,
                "candidates": [{"message_id": i, "text": c["text"], "model_version": c["model_version"]}
                               for i, c in zip(ids, candidates)]}

    # -- feedback --------------------------------------------------------------------------------
    def pick(self, comparison_id: str, choice: str) -> dict:
        with as_user_error(LookupError, ValueError):
            decision = self.store.decide_comparison(str(comparison_id), str(choice))
        return {"ok": True, "winner": decision["winner"]}

    def rate(self, message_id: str, rating: str, reason: str = "") -> dict:
        if rating not in RATINGS:
            raise UserError(f"rating must be 'up' or 'down', not {rating!r}")
        reason = (reason or "").strip()
        if len(reason) > self.limits.max_reason_chars:
            raise UserError(f"reason is longer than {self.limits.max_reason_chars} characters")
        with as_user_error(LookupError, ValueError):
            self.store.add_rating(message_id, rating, reason)
        return {"ok": True}

    def rewrite(self, message_id: str, text: str) -> dict:
        text = (text or "").strip()
        if not text:
            raise UserError("the rewritten answer is empty")
        if len(text) > self.limits.max_rewrite_chars:
            raise UserError(f"the rewritten answer is longer than {self.limits.max_rewrite_chars} characters")
        with as_user_error(LookupError, ValueError):
            self.store.add_rewrite(message_id, text)
        return {"ok": True}

    def status(self) -> dict:
        return {"model_version": self.engine.version, "feedback": self.store.feedback_counts(),
                "last_cycle": self.store.last_cycle(), "load": self.engine.load_stats()}

    def history(self, conversation_id: str) -> list[dict]:
        with as_user_error(LookupError, ValueError):
            return self.store.history(conversation_id)

    # -- helpers ---------------------------------------------------------------------------------
    def check_message(self, message: str) -> str:
        if not isinstance(message, str) or not message.strip():
            raise UserError("the message is empty")
        if len(message) > self.limits.max_message_chars:
            raise UserError(f"the message is {len(message):,} characters; the limit is "
                            f"{self.limits.max_message_chars:,}")
        return message.strip()

    def _context(self, conversation_id: str, message: str) -> list[dict]:
        conversation = self.store.conversation(str(conversation_id))
        if conversation is None:
            raise UserError(f"no conversation with id {str(conversation_id)[:64]!r}")
        if self.store.undecided_comparison(conversation_id):
            raise UserError("pick the best answer of the open comparison before going on")
        turns = [{"role": m["role"], "content": m["content"]} for m in self.store.history(conversation_id)]
        return [{"role": "system", "content": conversation["system_prompt"]}, *turns,
                {"role": "user", "content": message}]

    def _submit(self, messages: list[dict]):
        try:
            return self.engine.submit(messages)
        except EngineBusy as exc:
            raise UserError(str(exc)) from None

    def _turn(self, conversation_id: str):
        return _ConversationTurn(self, conversation_id)

    def _generation(self, request) -> dict:
        return {**request.sampling.as_dict(), "finish_reason": request.finish_reason}


class _ConversationTurn:
    """Only one reply at a time per conversation: two would both answer the same history."""

    def __init__(self, service: TutorService, conversation_id: str) -> None:
        self.service, self.conversation_id = service, conversation_id

    def __enter__(self):
        with self.service._busy_lock:
            if self.conversation_id in self.service._busy:
                raise UserError("the tutor is still answering in this conversation")
            self.service._busy.add(self.conversation_id)

    def __exit__(self, *exc):
        with self.service._busy_lock:
            self.service._busy.discard(self.conversation_id)


@contextmanager
def as_user_error(*kinds: type[Exception]):
    """Errors of these kinds, raised by the store (LookupError for an unknown id, ValueError for an
    invalid value) or the engine (PromptTooLong), become a UserError with the same message."""
    try:
        yield
    except UserError:
        raise
    except kinds as exc:
        # KeyError quotes its message; args[0] is the text itself.
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None


def _decode(request, tokens: list[int]) -> str:
    return request.tokenizer.decode(tokens, skip_special_tokens=True).strip()
